"""Two-rank gloo harness: sharded training vs the same kernel trained in one process.

Every rank builds the same EBC and data (fixed seeds), trains it sharded with
DistributedModelParallel for ``steps`` steps on its half of each global batch, and
trains a single-process reference (``AdaptiveTBE`` over all tables,
same rule) on the whole global batch. The loss is a per-rank mean, so with
TorchRec's default gradient division (by world size) the sharded gradient equals the
reference's global-mean gradient. Each rank then checks its own shards of the
weights and of every optimizer state against the matching slice of the reference.
A data-parallel table is a plain tensor on every rank, checked whole.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from torchrec_adaptive.kernels import AdaptiveTBE, TableSpec
from torchrec_adaptive.rules import config_from_optimizer

WORLD_SIZE = 2
BATCH_PER_RANK = 8

# (name, rows, dim, features): t0 is looked up by two features; dims differ so the
# kernel holds two dim-groups; column-wise needs dims divisible by world*4.
TABLES: List[Tuple[str, int, int, List[str]]] = [
    ("t0", 40, 8, ["f0", "f1"]),
    ("t1", 61, 16, ["f2"]),
    ("t2", 30, 8, ["f3"]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ebc() -> EmbeddingBagCollection:
    torch.manual_seed(0)
    return EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f) for n, r, d, f in TABLES],
        device=torch.device("cpu"),
    )


def feature_rows() -> List[Tuple[str, int]]:
    return [(f, r) for _, r, _, fs in TABLES for f in fs]


def global_batches(steps: int, batch: int, seed: int = 1) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """Per step, per feature: lengths [batch] and Zipf-ish ids (small ids are hot; duplicates happen)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths, ids = [], []
        for _, rows in feature_rows():
            ln = torch.randint(0, 4, (batch,), generator=g)
            u = torch.rand(int(ln.sum()), generator=g)
            lengths.append(ln)
            ids.append((rows * u.pow(3)).long().clamp(max=rows - 1))
        out.append((lengths, ids))
    return out


def kjt_for(lengths: List[torch.Tensor], ids: List[torch.Tensor], lo: int, hi: int) -> KeyedJaggedTensor:
    """Rows [lo, hi) of a global batch as a KJT (feature-major)."""
    vals, lens = [], []
    for ln, v in zip(lengths, ids):
        offs = torch.cat([torch.zeros(1, dtype=torch.long), ln.cumsum(0)])
        vals.append(v[offs[lo]: offs[hi]])
        lens.append(ln[lo:hi])
    return KeyedJaggedTensor(keys=[f for f, _ in feature_rows()], values=torch.cat(vals), lengths=torch.cat(lens))


def head_weight(dim_sum: int) -> torch.Tensor:
    return torch.randn(dim_sum, generator=torch.Generator().manual_seed(7))


def loss_of(pooled: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-sample nonlinear loss, averaged over the batch given."""
    return torch.tanh(pooled @ w).sub(0.3).pow(2).mean()


class Wrapper(nn.Module):
    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        # In feature order: a sharded EBC orders its output keys by where the tables
        # sit (table_wise with t0 on rank 1 gives f2, f0, f1, f3).
        pooled = self.ebc(kjt).to_dict()
        return torch.cat([pooled[f] for f, _ in feature_rows()], dim=1)


def per_param_sharding(sharding_type: str) -> Dict[str, Any]:
    if sharding_type == "table_wise":
        return {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=1)}
    if sharding_type == "row_wise":
        return {n: row_wise() for n, *_ in TABLES}
    if sharding_type == "column_wise":
        return {"t0": column_wise(ranks=[0, 1]), "t1": column_wise(ranks=[1, 0]), "t2": table_wise(rank=0)}
    if sharding_type == "table_row_wise":
        return {n: table_row_wise(host_index=0) for n, *_ in TABLES}
    if sharding_type == "mixed":
        return {"t0": row_wise(), "t1": column_wise(ranks=[0, 1]), "t2": table_wise(rank=1)}
    if sharding_type == "data_parallel":  # one replicated kernel holding both dim groups
        return {n: data_parallel() for n, *_ in TABLES}
    if sharding_type == "dp_mixed":  # a replicated table next to row-wise and table-wise ones
        return {"t0": row_wise(), "t1": data_parallel(), "t2": table_wise(rank=1)}
    raise ValueError(sharding_type)


def replicated_tables(sharding_type: str) -> List[str]:
    """The tables :func:`per_param_sharding` makes data-parallel."""
    return {"data_parallel": [n for n, *_ in TABLES], "dp_mixed": ["t1"]}.get(sharding_type, [])


def _check_close(name: str, local: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Raises unless ``local`` equals ``ref`` to ``tol``; returns the max abs difference."""
    if local.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(local.shape)} vs reference {tuple(ref.shape)}")
    diff = (local.double() - ref.double()).abs().max().item() if local.numel() else 0.0
    if not diff <= tol:
        raise AssertionError(f"{name}: max abs diff {diff:.3g} > {tol}")
    return diff


def _ref_slice(ref: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    if ref.dim() == 1:  # per-row state: TorchRec lays CW copies end to end, so wrap around the table
        start = offsets[0] % ref.shape[0]
        return ref[start: start + sizes[0]]
    return ref[offsets[0]: offsets[0] + sizes[0], offsets[1]: offsets[1] + sizes[1]]


def compare_sharded(name: str, value: Any, ref: torch.Tensor, tol: float, replicated: bool = False,
                    diffs: Optional[List[float]] = None) -> int:
    """Checks every local shard (``replicated``: the whole plain tensor every rank holds);
    returns how many were checked, appending each max abs difference to ``diffs``."""
    found = diffs if diffs is not None else []
    if replicated:
        if isinstance(value, ShardedTensor) or not isinstance(value, torch.Tensor):
            raise AssertionError(f"{name}: a data-parallel table's value should be a plain tensor, got {type(value).__name__}")
        found.append(_check_close(f"{name} (replicated)", value, ref, tol))
        return 1
    if isinstance(value, ShardedTensor):
        n = 0
        for shard in value.local_shards():
            md = shard.metadata
            found.append(_check_close(f"{name}@{md.shard_offsets}", shard.tensor,
                                      _ref_slice(ref, md.shard_offsets, md.shard_sizes), tol))
            n += 1
        return n
    raise AssertionError(f"{name}: expected a ShardedTensor, got {type(value).__name__}")


def shard_with_plan(model: nn.Module, ebc: EmbeddingBagCollection, per_param: Dict[str, Any]) -> DistributedModelParallel:
    """``model`` (holding ``ebc`` as ``model.ebc``) under DMP on the default group, with ``per_param``
    as ``ebc``'s plan and our sharders."""
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders

    world = dist.get_world_size()
    module_plan = construct_module_sharding_plan(ebc, per_param_sharding=per_param, local_size=world, world_size=world,
                                                 device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=torch.device("cpu"), plan=ShardingPlan({"ebc": module_plan}),
                                    sharders=sharders())


def train_and_compare(rank: int, sharding_type: str, opt_cls: type, opt_kwargs: Dict[str, Any], steps: int,
                      tol: float, pooling_check: bool = True,
                      after_step: Optional[Callable[[nn.Module, KeyedJaggedTensor], None]] = None) -> Dict[str, Any]:
    """Trains ``steps`` steps sharded and in one process; checks every local shard (see the module docstring),
    and that the replicas of data-parallel tables are bit-identical across ranks. ``after_step(model, kjt)``
    runs on the sharded model after each step (e.g. an evaluation pass, which must change nothing)."""
    t0 = time.perf_counter()
    ebc = make_ebc()
    init = {k: v.detach().clone() for k, v in ebc.state_dict().items()}
    apply_optimizer_in_backward(opt_cls, ebc.embedding_bags.parameters(), dict(opt_kwargs))
    model = shard_with_plan(Wrapper(ebc), ebc, per_param_sharding(sharding_type))
    # DMP re-initializes sharded tables on CPU; load the unsharded init (tests TorchRec's load path too).
    model.load_state_dict({f"ebc.{k}": v for k, v in init.items()})

    # Reference: one kernel over all tables, global batches.
    specs = [TableSpec(n, r, d) for n, r, d, _ in TABLES]
    ftm = [i for i, (_, _, _, fs) in enumerate(TABLES) for _ in fs]
    ref = AdaptiveTBE(specs, config_from_optimizer(opt_cls, dict(opt_kwargs)), feature_table_map=ftm)
    with torch.no_grad():
        for (n, *_), w in zip(TABLES, ref.split_embedding_weights()):
            w.copy_(init[f"embedding_bags.{n}.weight"])

    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    data = global_batches(steps, WORLD_SIZE * BATCH_PER_RANK)
    lo, hi = rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK
    t_setup = time.perf_counter() - t0
    for step, (lengths, ids) in enumerate(data):
        out = model(kjt_for(lengths, ids, lo, hi))
        g = kjt_for(lengths, ids, 0, WORLD_SIZE * BATCH_PER_RANK)
        ref_out = ref(g.values(), g.offsets())
        if step == 0 and pooling_check:
            _check_close("pooled output (step 0)", out, ref_out[lo:hi].detach(), tol)
        loss_of(out, w_head).backward()
        loss_of(ref_out, w_head).backward()
        if after_step is not None:
            after_step(model, kjt_for(lengths, ids, lo, hi))
    t_train = time.perf_counter() - t0 - t_setup

    moved = max((w - init[f"embedding_bags.{n}.weight"]).abs().max().item()
                for (n, *_), w in zip(TABLES, ref.split_embedding_weights()))
    if not moved > 1e-3:
        raise AssertionError(f"the reference barely trained (max weight change {moved:.2g}); the test would be vacuous")
    diffs: List[float] = []
    replicated = replicated_tables(sharding_type)
    checked = check_against_reference(model, ref, steps, tol, replicated=replicated, diffs=diffs)
    identical = assert_replicas_identical(model, replicated)
    return {"checked": checked, "max_diff": max(diffs), "replicas_identical": identical,
            "setup_s": round(t_setup, 2), "train_s": round(t_train, 2)}


def _replicated_values(model: nn.Module, table: str) -> Dict[str, torch.Tensor]:
    """A data-parallel table's weight, every optimizer state and its step k, as plain tensors."""
    out = {"weight": model.state_dict()[f"ebc.embedding_bags.{table}.weight"]}
    for k, v in model.fused_optimizer.state_dict()["state"][f"ebc.embedding_bags.{table}.weight"].items():
        out[k] = v["step"] if isinstance(v, dict) else v
    return out


def assert_replicas_identical(model: nn.Module, tables: Sequence[str]) -> int:
    """Every rank's replica of each data-parallel table (weights, states, step k) is bit-identical
    to rank 0's (collective). Returns how many tensors were compared."""
    n = 0
    for table in tables:
        for key, value in sorted(_replicated_values(model, table).items()):
            assert not isinstance(value, ShardedTensor), f"{table} {key} is a ShardedTensor, not a replica"
            first = value.detach().clone()
            dist.broadcast(first, src=0)
            if not torch.equal(first, value):
                diff = (first.double() - value.double()).abs().max().item()
                raise AssertionError(f"{table} {key}: rank {dist.get_rank()}'s replica differs from rank 0's by {diff:.3g}")
            n += 1
    return n


def check_against_reference(model: nn.Module, ref: AdaptiveTBE, steps: int, tol: float,
                            tables: Sequence[str] = tuple(n for n, *_ in TABLES), replicated: Collection[str] = (),
                            diffs: Optional[List[float]] = None) -> int:
    """Every local shard of the weights and of every optimizer state of ``model`` equals the
    matching slice of the single-process kernel ``ref`` (tables in ``TABLES`` order), and
    each table's step k is ``steps``; ``replicated`` tables (data-parallel) are checked whole.
    Returns how many shards were compared; each max abs difference goes to ``diffs``."""
    checked = 0
    sd = model.state_dict()
    for i, n in enumerate(tables):
        checked += compare_sharded(f"weight {n}", sd[f"ebc.embedding_bags.{n}.weight"], ref.split_embedding_weights()[i],
                                   tol, n in replicated, diffs)
    ost = model.fused_optimizer.state_dict()["state"]
    ref_states = ref.get_optimizer_state()
    for i, n in enumerate(tables):
        key = f"ebc.embedding_bags.{n}.weight"
        if key not in ost:  # no shard of this table on this rank (table-wise)
            if sd[key].local_shards():
                raise AssertionError(f"{n} has local weight shards but no optimizer state")
            continue
        states = ost[key]
        expected = {f"{n}.{k}" for k in ref_states[i]} | {f"{n}.optimizer_step"}
        if set(states) != expected:
            raise AssertionError(f"optimizer state keys of {n}: {sorted(states)} != {sorted(expected)}")
        for k, v in ref_states[i].items():
            checked += compare_sharded(f"{n}.{k}", states[f"{n}.{k}"], v, tol, n in replicated, diffs)
        got_step = int(states[f"{n}.optimizer_step"]["step"])
        if got_step != steps:
            raise AssertionError(f"{n}.optimizer_step = {got_step}, expected {steps}")
    return checked


def _entry(rank: int, world: int, port: int, fn: Callable[..., Dict[str, Any]], args: tuple, q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        q.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Dict[str, Any]], *args: Any, world: int = WORLD_SIZE, timeout: float = 120.0) -> List[Dict[str, Any]]:
    """Runs ``fn(rank, *args)`` on ``world`` gloo ranks; raises with the ranks' tracebacks on failure."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: Dict[int, Any] = {}
    errors: List[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks did not finish in {timeout}s")
            try:
                rank, status, payload = q.get(timeout=min(remaining, 5.0))
            except Exception:  # queue.Empty; check for ranks that died without reporting
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    raise RuntimeError(f"rank process exited with code {dead[0].exitcode} without a report")
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # the other rank may hang in a collective
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


# ---------------------------------------------------------------- pitfalls
def _mixed_model() -> Wrapper:
    """t0, t1: AdamAR (ours); t2: TorchRec's RowWiseAdagrad (FBGEMM fused)."""
    import torchrec.optim as trec_optim

    import torchrec_adaptive as ta

    ebc = make_ebc()
    apply_optimizer_in_backward(ta.AdamAR, [ebc.embedding_bags["t0"].weight, ebc.embedding_bags["t1"].weight],
                                {"lr": 1e-3, "alpha": 1e-3})
    apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, [ebc.embedding_bags["t2"].weight], {"lr": 0.02})
    return Wrapper(ebc)


def _train_steps(model: nn.Module, rank: int, steps: int) -> float:
    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    loss = torch.zeros(())
    for lengths, ids in global_batches(steps, WORLD_SIZE * BATCH_PER_RANK):
        loss = loss_of(model(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)), w_head)
        loss.backward()
    return loss.item()


def _kernels_of(model: nn.Module) -> Dict[str, Any]:
    """table name -> (kernel module type name, fused params) of the sharded EBC."""
    from torch.nn.parallel import DistributedDataParallel

    out: Dict[str, Any] = {}
    for lookup in model.module.ebc._lookups:  # type: ignore[union-attr]
        lookup = lookup.module if isinstance(lookup, DistributedDataParallel) else lookup
        for emb in lookup._emb_modules:
            for t in emb.config.embedding_tables:
                out[t.name] = (type(emb).__name__, dict(emb.config.fused_params or {}))
    return out


# TorchRec's own kernels for a table trained by an FBGEMM optimizer: fused, or dense when replicated.
_STOCK_KERNELS = ("BatchedFusedEmbeddingBag", "BatchedDenseEmbeddingBag")


def pitfall_worker(rank: int) -> Dict[str, Any]:
    """Checks the plain route, the EmbOptimType cast, and kwargs isolation in a mixed model."""
    from torchrec.distributed.sharding_plan import get_default_sharders

    import torchrec_adaptive as ta
    from torchrec_adaptive.distributed import ADAPTIVE_RULE_KEY, plan, sharders

    env = ShardingEnv.from_process_group(dist.group.WORLD)
    cpu = torch.device("cpu")
    # 1. Stock sharders cannot take our optimizer class: that is the pitfall.
    try:
        DistributedModelParallel(_mixed_model(), env=env, device=cpu, sharders=get_default_sharders())
        raise AssertionError("stock TorchRec accepted a torchrec_adaptive optimizer; the pitfall test is stale")
    except ValueError as e:
        if "Cannot cast" not in str(e):
            raise
    # 2. The plain route from the README: no plan, our sharders.
    ebc = make_ebc()
    apply_optimizer_in_backward(ta.AdamAR, ebc.parameters(), {"lr": 1e-3, "alpha": 1e-3})
    model = DistributedModelParallel(Wrapper(ebc), env=env, device=cpu, sharders=sharders())
    kernels = _kernels_of(model)
    assert all(k == "ShardedAdaptiveTBE" for k, _ in kernels.values()), kernels
    loss = _train_steps(model, rank, 3)
    assert torch.isfinite(torch.tensor(loss))
    plain_plan = {n: ps.compute_kernel for n, ps in model.module.ebc.module_sharding_plan.items()}
    assert set(plain_plan.values()) == {"customized_kernel"}, plain_plan
    # 3. Mixed model, default planner: our kwargs reach only our kernel, FBGEMM's only FBGEMM.
    #    (The sharder offers data_parallel, so TorchRec's planner may replicate the small stock
    #    table on its dense kernel under DDP, as stock TorchRec would: still TorchRec's kernel.)
    model = DistributedModelParallel(_mixed_model(), env=env, device=cpu, sharders=sharders())
    kernels = _kernels_of(model)
    for t in ("t0", "t1"):
        kind, fp = kernels.get(t, (None, {}))
        if kind is not None:  # tables placed on the other rank are checked there
            assert kind == "ShardedAdaptiveTBE", (t, kind)
            rule = fp[ADAPTIVE_RULE_KEY]
            assert rule == ta.AdamAR.rule_config(lr=1e-3, alpha=1e-3), rule
    if "t2" in kernels:
        kind, fp = kernels["t2"]
        assert kind in _STOCK_KERNELS, kind
        leaked = {"alpha", ADAPTIVE_RULE_KEY} & set(fp)
        assert not leaked, f"our kwargs reached FBGEMM: {leaked}"
    _train_steps(model, rank, 3)
    keys = {k for k in model.fused_optimizer.state_dict()["state"]}
    # 4. The planner helper names customized_kernel and keeps FBGEMM tables on TorchRec's kernels
    #    ("fused", or "dense" where it replicates them).
    mixed = _mixed_model()
    sharding_plan = plan(mixed, dist.group.WORLD, batch_size=BATCH_PER_RANK)
    planned = {n: (ps.sharding_type, ps.compute_kernel) for n, ps in sharding_plan.plan["ebc"].items()}  # type: ignore[union-attr]
    kinds = {n: k if n != "t2" else "stock" for n, (_, k) in planned.items()}
    assert kinds == {"t0": "customized_kernel", "t1": "customized_kernel", "t2": "stock"}, planned
    assert planned["t2"][1] == ("dense" if planned["t2"][0] == "data_parallel" else "fused"), planned
    model = DistributedModelParallel(mixed, env=env, device=cpu, plan=sharding_plan, sharders=sharders())
    _train_steps(model, rank, 2)
    return {"plain_plan": plain_plan, "optimizer_keys": sorted(keys), "helper_plan": kinds, "planned": planned}


# ---------------------------------------------------------------- checkpoint
def _local_shards(model: nn.Module, replicated: Collection[str] = ()) -> Dict[str, List[torch.Tensor]]:
    """Every local shard of the weights and of the fused optimizer state, by key (copies).
    Tables in ``replicated`` (data-parallel) must be plain tensors: one "shard", the whole table."""
    out: Dict[str, List[torch.Tensor]] = {}

    def shards(key: str, table: str, v: Any) -> List[torch.Tensor]:
        if table in replicated:
            assert isinstance(v, torch.Tensor) and not isinstance(v, ShardedTensor), \
                f"{key}: a data-parallel table's value should be a plain tensor, got {type(v).__name__}"
            return [v.detach().clone()]
        assert isinstance(v, ShardedTensor), f"{key} reached state_dict as {type(v).__name__}, not a ShardedTensor"
        return [s.tensor.clone() for s in v.local_shards()]

    for k, v in model.state_dict().items():
        out[k] = shards(k, k.split(".")[-2], v)
    for param_key, states in model.fused_optimizer.state_dict()["state"].items():
        for k, v in states.items():
            key = f"{param_key}/{k}"
            out[key] = [v["step"].clone()] if isinstance(v, dict) else shards(key, param_key.split(".")[-2], v)
    return out


def dcp_worker(rank: int, sharding_type: str, path: str) -> Dict[str, Any]:
    """Save with torch.distributed.checkpoint, load into a freshly initialized model, compare, train on."""
    import torch.distributed.checkpoint as dcp

    import torchrec_adaptive as ta

    def build() -> DistributedModelParallel:
        ebc = make_ebc()
        apply_optimizer_in_backward(ta.AdamAR, ebc.embedding_bags.parameters(), {"lr": 0.05, "alpha": 1e-2})
        return shard_with_plan(Wrapper(ebc), ebc, per_param_sharding(sharding_type))

    a = build()
    _train_steps(a, rank, 3)
    dcp.save({"model": a.state_dict(), "optim": a.fused_optimizer.state_dict()}, checkpoint_id=path)
    saved = _local_shards(a)
    b = build()  # TorchRec re-initializes sharded tables randomly: b starts different from a
    if all(torch.equal(x, y) for k in saved if "/" not in k for x, y in zip(saved[k], _local_shards(b)[k])):
        raise AssertionError("the fresh model equals the trained one; the checkpoint test would be vacuous")
    state = {"model": b.state_dict(), "optim": b.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=path)
    b.load_state_dict(state["model"])
    b.fused_optimizer.load_state_dict(state["optim"])
    loaded = _local_shards(b)
    if set(loaded) != set(saved):
        raise AssertionError(f"keys differ: {sorted(set(loaded) ^ set(saved))}")
    n = 0
    for k in saved:
        for x, y in zip(saved[k], loaded[k]):
            _check_close(f"after load: {k}", y, x, 0.0)
            n += 1
    # Training on from the checkpoint must continue identically (the step k was restored).
    _train_steps(a, rank, 2)
    _train_steps(b, rank, 2)
    after_a, after_b = _local_shards(a), _local_shards(b)
    for k in after_a:
        for x, y in zip(after_a[k], after_b[k]):
            _check_close(f"after resuming: {k}", y, x, 1e-6)
    return {"shards_compared": n}
