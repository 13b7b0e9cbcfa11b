"""Data-parallel tables on our kernel: every replica applies the update of the global batch.

TorchRec trains a data-parallel table by wrapping its lookup in DDP, which all-reduces
the dense weight gradient. Our optimizers update rows inside the kernel's backward
(fused): there is no weight gradient to all-reduce, and an averaged gradient would not
carry what AdamAR and FAL read anyway (which rows the global batch touched at step k,
and how often: s_r, c_r). So each replica runs our kernel on its local batch, and in
its backward :class:`DataParallelReplicas` all-gathers what the update reads of every
replica's batch: per dim group the lookup ids, bag lengths, per-sample weights and
the bags' pooled-output gradients. Each replica then runs the single-process update
on the concatenation (rank order): every replica applies the same update, the one
single-process training applies for the global batch (same step k, same c_r and s_r),
and the replicas stay bit-identical.

Three collectives per backward and kernel, none of them of table size: the sizes
(plus a non-finite flag, so that every replica refuses or skips the same step), then
the ids and lengths (int64) and the gradients and weights (float), each padded to the
longest rank (gloo's ``all_gather`` takes equal sizes only). ``dist.all_gather`` runs on
gloo and NCCL alike; tensors stay on the kernel's device.

Gradient convention, the same as our model-parallel shardings: TorchRec's model-parallel
output all-to-all divides the output gradient by the world size in backward
(``comm_ops.get_gradient_division()``, on by default) and sums the ranks'
contributions; the gathered gradients are divided the same way, so a table's update
does not depend on the sharding type the planner picked. Stock TorchRec
data-parallel tables get DDP's average instead: the same numbers while gradient
division is on, but with it off they stay averaged while ours (like every
model-parallel table) get the sum.
"""

from __future__ import annotations

from itertools import chain
from typing import Any, List, Optional, Sequence, Set

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec.distributed.comm_ops import get_gradient_division

from ..kernels.batched import AdaptiveTBE, GroupBatch, GroupLookups


def _all_gather_padded(t: Tensor, sizes: Sequence[int], group: Optional[dist.ProcessGroup]) -> List[Tensor]:
    """Every rank's 1-D ``t`` in rank order (rank r's has ``sizes[r]`` elements, known to all)."""
    longest = max(sizes)
    if longest == 0:  # every rank knows it: no collective on any
        return [t[:0] for _ in sizes]
    padded = t.new_zeros(longest)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=group)
    return [o[:n] for o, n in zip(out, sizes)]


class DataParallelReplicas:
    """The replicas of one data-parallel kernel group over ``pg`` (a ``ReplicaSync``)."""

    def __init__(self, pg: Optional[dist.ProcessGroup]) -> None:
        self.pg = pg
        self.index = dist.get_rank(pg)
        self.world = dist.get_world_size(pg)

    def gradient_scale(self) -> float:
        """What TorchRec's model-parallel output dist multiplies the output gradient by."""
        return 1.0 / self.world if get_gradient_division() else 1.0

    def gather(self, batches: List[GroupBatch], nonfinite: bool) -> tuple[List[GroupBatch], List[int]]:
        """Every replica's batches, concatenated per dim group in rank order, gradients scaled
        by :meth:`gradient_scale`; and the replicas whose output gradient is non-finite."""
        if self.world == 1:
            return self._scaled(batches), [self.index] if nonfinite else []
        some = batches[0].bag_grads
        weighted = any(b.lookups.per_sample_weights is not None for b in batches)
        header = [int(nonfinite), int(weighted)]
        for b in batches:
            header += [b.lookups.indices.numel(), b.lookups.bag_lengths.numel()]
        headers = [torch.empty(len(header), dtype=torch.int64, device=some.device) for _ in range(self.world)]
        dist.all_gather(headers, torch.tensor(header, dtype=torch.int64, device=some.device), group=self.pg)
        sizes = [h.tolist() for h in headers]
        any_weighted = any(s[1] for s in sizes)
        lookups = [s[2::2] for s in sizes]  # [rank][group]
        bags = [s[3::2] for s in sizes]
        dims = [b.bag_grads.shape[1] for b in batches]

        ints = torch.cat([t for b in batches for t in (b.lookups.indices.long(), b.lookups.bag_lengths.long())])
        floats = [b.bag_grads.reshape(-1) for b in batches]
        if any_weighted:  # a replica without weights contributes ones (what no weights means)
            floats += [b.lookups.per_sample_weights.to(some.dtype) if b.lookups.per_sample_weights is not None
                       else some.new_ones(b.lookups.indices.numel()) for b in batches]
        int_parts = _all_gather_padded(ints, [sum(lk) + sum(bg) for lk, bg in zip(lookups, bags)], self.pg)
        float_sizes = [sum(n * d for n, d in zip(bg, dims)) + (sum(lk) if any_weighted else 0)
                       for lk, bg in zip(lookups, bags)]
        float_parts = _all_gather_padded(torch.cat(floats), float_sizes, self.pg)

        per_group: List[List[List[Tensor]]] = [[[], [], [], []] for _ in batches]  # ids, lengths, grads, weights
        for r in range(self.world):
            ids_lengths = torch.split(int_parts[r], [n for pair in zip(lookups[r], bags[r]) for n in pair])
            grad_sizes = [n * d for n, d in zip(bags[r], dims)]
            pieces = torch.split(float_parts[r], grad_sizes + (lookups[r] if any_weighted else []))
            for g, d in enumerate(dims):
                per_group[g][0].append(ids_lengths[2 * g])
                per_group[g][1].append(ids_lengths[2 * g + 1])
                per_group[g][2].append(pieces[g].view(-1, d))
                if any_weighted:
                    per_group[g][3].append(pieces[len(dims) + g])
        out = []
        for ids, lengths, grads, weights in per_group:
            bag_lengths = torch.cat(lengths)
            offsets = torch.zeros(bag_lengths.numel() + 1, dtype=torch.long, device=bag_lengths.device)
            torch.cumsum(bag_lengths, 0, out=offsets[1:])
            psw = torch.cat(weights) if any_weighted else None
            out.append(GroupBatch(GroupLookups(torch.cat(ids), offsets, bag_lengths, psw), torch.cat(grads)))
        return self._scaled(out), [r for r, s in enumerate(sizes) if s[0]]

    def _scaled(self, batches: List[GroupBatch]) -> List[GroupBatch]:
        scale = self.gradient_scale()
        if scale == 1.0:
            return batches
        return [GroupBatch(b.lookups, b.bag_grads * scale) for b in batches]

    @torch.no_grad()
    def broadcast_from_first(self, tensor: Tensor) -> None:
        """Give every replica the first one's values (what DDP does to the parameters it wraps)."""
        if self.world > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.pg, 0) if self.pg is not None else 0, group=self.pg)


class ReplicatedLookup(nn.Module):
    """Stands where TorchRec puts ``DistributedDataParallel(lookup)`` for a data-parallel
    lookup that holds only our tables: DDP would hold weights that never get a gradient
    (and refuses a module without any). TorchRec reaches the lookup as ``.module``
    (``_initialize_torch_state``) or calls its methods (``flush``, ``purge``): both reach
    the wrapped lookup."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet
                raise
            return getattr(super().__getattr__("module"), name)


def replicas_of(lookup: nn.Module) -> List[AdaptiveTBE]:
    """Our kernels in a lookup that run as data-parallel replicas."""
    return [m for m in lookup.modules() if isinstance(m, AdaptiveTBE) and m.replicas is not None]


def ddp_names_of_replicas(lookup: nn.Module) -> Set[str]:
    """Every name under which ``DistributedDataParallel(lookup)`` would see a parameter or
    buffer of our replicated kernels.

    DDP names parameters in two ways, ``lookup.named_parameters()`` and
    ``f"{module name}.{name}"`` over each module's ``named_parameters(recurse=False)``;
    TorchRec's lookup and our kernel wrapper override these (per-table views, not the
    flat buffer), so a name is ours when its tensor shares storage with our kernels.
    """
    ours = {t.untyped_storage().data_ptr() for k in replicas_of(lookup) for t in chain(k.parameters(), k.buffers())}

    def is_ours(t: Tensor) -> bool:
        return t.untyped_storage().data_ptr() in ours

    names = {f"{mn}.{pn}" for mn, m in lookup.named_modules() for pn, p in m.named_parameters(recurse=False) if is_ours(p)}
    names |= {n for n, t in chain(lookup.named_parameters(), lookup.named_buffers()) if is_ours(t)}
    return names


def has_other_parameters(lookup: nn.Module, ignore: Set[str]) -> bool:
    """Whether DDP has anything to do for ``lookup`` besides what ``ignore`` names."""
    return any(p.requires_grad and n not in ignore for n, p in lookup.named_parameters())


__all__ = ["DataParallelReplicas", "ReplicatedLookup", "ddp_names_of_replicas", "has_other_parameters", "replicas_of"]
