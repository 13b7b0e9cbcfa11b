"""What happens to rare and frequent rows: per-table row statistics, gathered across ranks.

Buckets are powers of two of the count c_r (and of the idle steps I_r): bucket 0
holds 0, bucket i holds [2^(i-1), 2^i), the last bucket is open-ended. Per table:

* ``count_hist``: rows per c_r bucket; ``never_touched``: the fraction with c_r = 0;
* ``idle_hist``: touched rows per I_r = k - s_r - 1 bucket (k: the current step);
* ``sq_norm_by_count``: sum of ||theta_r||^2 per c_r bucket (exact under any sharding);
* ``norm_by_count``: sum of ||theta_r|| per c_r bucket, the AdamAR paper's quantity
  (NaN for column-sharded tables, whose row norms no single rank sees).

Only tables trained by torchrec_adaptive keep c_r and s_r (FBGEMM's do not).
Collective when torch.distributed is initialized: call on every rank. A
data-parallel table is counted once (its first replica), not once per rank.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from .collectives import collective_device
from .rules.slot_names import COUNT, LAST_STEP

NUM_BUCKETS = 24


def _bucket(x: Tensor) -> Tensor:
    """0 for 0, i for [2^(i-1), 2^i), clipped to the last bucket."""
    b = torch.floor(torch.log2(x.clamp(min=1).double())).long() + 1
    return torch.where(x <= 0, torch.zeros_like(b), b).clamp(max=NUM_BUCKETS - 1)


def _local_rows(model: nn.Module) -> list[tuple[str, Tensor, Tensor, Tensor, int, bool, bool]]:
    """(table, weight, counts, last_step, k, full width?, first column shard?) per shard with row history."""
    from .distributed.shards import adaptive_kernels, adaptive_row_optimizers, unsharded_table_names

    out: list[tuple[str, Tensor, Tensor, Tensor, int, bool, bool]] = []
    names = unsharded_table_names(model)
    for m in adaptive_kernels(model):
        if m.replicas is not None and m.replicas.index != 0:  # the same rows as replica 0's
            continue
        for spec, w, st in zip(m.layout.tables, m.split_embedding_weights(), m.get_optimizer_state()):
            full = spec.col_offset == 0 and spec.dim == (spec.global_dim or spec.dim)
            primary = spec.col_offset == 0
            out.append((spec.table_name, w, st[COUNT], st[LAST_STEP], m.optimizer_step, full, primary))
    for p, opt in adaptive_row_optimizers(model):
        if opt.state.get(p):
            st = opt.state[p]
            name = names.get(id(p), f"param{len(out)}")
            out.append((name, p.detach(), st[COUNT], st[LAST_STEP],
                        int(opt.param_groups[0].get("step", 0)), True, True))
    return out


@torch.no_grad()
def row_statistics(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Per-table row statistics of ``model`` (see the module docstring), summed over ranks."""
    local: dict[str, Tensor] = {}
    width = 4 * NUM_BUCKETS + 3  # count, idle, sq norm, norm histograms; rows, untouched, column-sharded
    # On the rows' device (a GPU's rows are never copied to the host), with fixed-size
    # histograms (index_add_ into NUM_BUCKETS bins: unlike bincount or a boolean mask, no
    # output size the host must wait for), then on the device the process group reduces on
    # (NCCL: the rank's GPU). Nothing is read on the host here; the caller reads the result.
    where = collective_device()
    for name, w, counts, last, k, full, primary in _local_rows(model):
        v = local.setdefault(name, torch.zeros(width, dtype=torch.float64, device=w.device))
        cb = _bucket(counts)
        sq = w.double().pow(2).sum(dim=1)
        v[2 * NUM_BUCKETS : 3 * NUM_BUCKETS].index_add_(0, cb, sq)
        if primary:  # row-level quantities once per row, not once per column shard
            touched = (counts > 0).double()
            v[:NUM_BUCKETS].index_add_(0, cb, torch.ones_like(touched))
            v[NUM_BUCKETS : 2 * NUM_BUCKETS].index_add_(0, _bucket(k - last - 1), touched)  # touched rows only
            v[-3] += counts.numel()
            v[-2] += counts.numel() - touched.sum()
        if full:
            v[3 * NUM_BUCKETS : 4 * NUM_BUCKETS].index_add_(0, cb, sq.sqrt())
        else:
            v[-1] += 1
    names = sorted(local)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, names)
        names = sorted(set().union(*gathered))
        zeros = torch.zeros(width, dtype=torch.float64, device=where)
        stacked = (torch.stack([local[n].to(where) if n in local else zeros for n in names]) if names
                   else torch.zeros(0, width, dtype=torch.float64, device=where))
        torch.distributed.all_reduce(stacked)
        local = dict(zip(names, stacked))
    out: dict[str, dict[str, Tensor]] = {}
    for n in names:
        v = local[n]
        norm = v[3 * NUM_BUCKETS : 4 * NUM_BUCKETS]
        norm = torch.where(v[-1] > 0, torch.full_like(norm, float("nan")), norm)  # column-sharded: unknown
        out[n] = {
            "count_hist": v[:NUM_BUCKETS].long(),
            "idle_hist": v[NUM_BUCKETS : 2 * NUM_BUCKETS].long(),
            "sq_norm_by_count": v[2 * NUM_BUCKETS : 3 * NUM_BUCKETS],
            "norm_by_count": norm,
            "rows": v[-3].long(),
            "never_touched": v[-2] / v[-3].clamp(min=1),
        }
    return out


def statistics_to_json(stats: dict[str, dict[str, Tensor]]) -> str:
    """One JSON object (lists and floats), e.g. for a metrics JSON-lines file."""
    return json.dumps({t: {k: v.tolist() for k, v in d.items()} for t, d in stats.items()})
