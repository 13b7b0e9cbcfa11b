"""MLET: multi-layer embedding training for TorchRec tables (``../shared/METHODS.md``, "MLET").

"Enhancing Cross-Category Learning in Recommendation Systems with
Multi-Layer Embedding Training" (ACML 2023). Table ``t`` (``n × d``) is trained as a
product ``W_t V_t``: ``W_t`` is an ``n × k`` TorchRec table (inner dimension
``k ≥ d``) and ``V_t`` a dense ``k × d`` parameter. The pooled output of a bag is

    pool_{r ∈ bag}(W_t[r]) · V_t  ==  pool_{r ∈ bag}(W_t[r] · V_t)

for sum pooling, mean pooling and per-sample weighted sums (pooling is linear), so
the module runs an ordinary :class:`~torchrec.EmbeddingBagCollection` of width ``k``
(``.inner``, which ``DistributedModelParallel`` shards like any EBC, trained by any
fused or in-backward optimizer) and multiplies each pooled ``k``-vector by ``V_t``.
``V_t`` gets a dense gradient every step: this is the cross-category update of the
paper. After training, :func:`collapse` (or :func:`collapse_sharded` for a sharded
model) exports a stock ``EmbeddingBagCollection`` holding ``W_t V_t``.

This module imports torchrec (``import torchrec_adaptive`` itself does not); import
it as ``torchrec_adaptive.mlet``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import DataType

__all__ = [
    "MLETConfig",
    "MLETEmbeddingBagCollection",
    "collapse",
    "collapse_sharded",
    "gather_inner_weights",
]


@dataclasses.dataclass(frozen=True)
class MLETConfig:
    """How one table is factorized.

    Args:
        inner_dim (int): ``k``, the width of ``W_t`` and the number of rows of ``V_t``.
            The paper uses ``k ≥ d`` (over-parameterization; quality grows with ``k``
            and saturates).
        v_init_std (float): standard deviation of the Gaussian init of ``V_t``. The
            paper uses 0.25 for DLRM and 0.5 for the other models (DCN, NFM, AutoInt,
            ...); too small slows the updates down (the re-weighting factors of its
            Theorem 1 vanish), too large hurts convergence. Default 0.5; pass 0.25 for
            DLRM.
        w_init (str): ``"xavier_uniform"`` (default, the paper's choice for the first
            layer): ``W_t ~ U(±sqrt(6 / (n + k)))``, Glorot's bound for a linear layer
            from an ``n``-way one-hot input to ``k`` outputs, written into the inner
            table's ``weight_init_min/max`` so TorchRec's sharded kernels use it too.
            ``"table"``: keep the table config's own init (``init_fn`` or
            ``weight_init_min/max``; TorchRec's default ``U(±sqrt(1/n))``).
        allow_narrow (bool): allow ``k < d`` (a low-rank factorization, which is not
            MLET); without it ``k < d`` raises ``ValueError``.
    """

    inner_dim: int
    v_init_std: float = 0.5
    w_init: Literal["xavier_uniform", "table"] = "xavier_uniform"
    allow_narrow: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.inner_dim, bool) or not isinstance(self.inner_dim, int) or self.inner_dim < 1:
            raise ValueError(f"MLETConfig.inner_dim must be a positive int, got {self.inner_dim!r}")
        if not (isinstance(self.v_init_std, (int, float)) and math.isfinite(self.v_init_std) and self.v_init_std > 0):
            raise ValueError(f"MLETConfig.v_init_std must be a finite float > 0, got {self.v_init_std!r}")
        if self.w_init not in ("xavier_uniform", "table"):
            raise ValueError(f"MLETConfig.w_init must be 'xavier_uniform' or 'table', got {self.w_init!r}")


def _copy_config(cfg: EmbeddingBagConfig, **changes: object) -> EmbeddingBagConfig:
    """A copy that shares no mutable field with ``cfg`` (TorchRec fills empty feature_names in place)."""
    return dataclasses.replace(cfg, feature_names=list(cfg.feature_names) or [cfg.name], **changes)  # type: ignore[arg-type]


def _inner_config(cfg: EmbeddingBagConfig, mlet: MLETConfig) -> EmbeddingBagConfig:
    k, n = mlet.inner_dim, cfg.num_embeddings
    if mlet.w_init == "table":
        return _copy_config(cfg, embedding_dim=k)  # init_fn was already resolved from the config's bounds
    bound = math.sqrt(6.0 / (n + k))
    return _copy_config(cfg, embedding_dim=k, weight_init_min=-bound, weight_init_max=bound, init_fn=None)


class _Projections(nn.ParameterDict):
    """The V_t, with a ``reset_parameters`` so that a module built on ``meta`` gets its
    Gaussian init when DistributedModelParallel materializes it (DMP allocates meta
    parameters with ``empty_like`` and then calls ``reset_parameters`` of their module;
    without it V would keep whatever the allocation held)."""

    def __init__(self, stds: Dict[str, float]) -> None:
        super().__init__()
        self._stds = dict(stds)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, v in self.items():
            if v.device.type != "meta":
                nn.init.normal_(v, 0.0, self._stds[name])


class MLETEmbeddingBagCollection(nn.Module):
    """An ``EmbeddingBagCollection`` whose selected tables are trained as ``W_t V_t``.

    Args:
        tables (List[EmbeddingBagConfig]): the tables as they will be served (dim ``d``).
        mlet (MLETConfig | Mapping[str, MLETConfig]): one config for every table, or a
            config per table name; tables not named pass through unchanged (a plain
            table of dim ``d`` in ``.inner``).
        is_weighted (bool): as ``EmbeddingBagCollection`` (per-sample weights; the
            weighted sum is linear, so the factorization stays exact).
        device (Optional[torch.device]): device of ``.inner`` and of ``V``.

    Attributes:
        inner (EmbeddingBagCollection): same table names and features, dims ``k`` for
            MLET tables; shard it (path ``"<module path>.inner"`` in a plan), give its
            parameters any optimizer.
        v (nn.ParameterDict): ``V_t`` ``[k, d]`` per MLET table, a dense parameter
            (DMP replicates it with DDP; train it with a dense optimizer).

    ``forward(kjt)`` returns a ``KeyedTensor`` with the keys and per-key dims of
    ``EmbeddingBagCollection(tables)``.

    Initialization (paper, section 4): the first layer (``W_t``, the table) uses
    Xavier/Glorot init and the second (``V_t``) a zero-mean Gaussian whose std must
    not be too small (0.25 for DLRM, 0.5 otherwise). We read "Xavier" as Glorot's
    uniform bound ``sqrt(6 / (fan_in + fan_out))`` with ``fan_in = n`` (one-hot input)
    and ``fan_out = k``, expressed as the inner table's ``weight_init_min/max`` so
    that the unsharded EBC and TorchRec's sharded kernels (which re-initialize
    tables from these bounds) draw from the same distribution. ``V_t`` is drawn from
    torch's global generator; under DMP, DDP broadcasts rank 0's copy.

    Example::

        tables = [EmbeddingBagConfig(name="t0", num_embeddings=1000, embedding_dim=16, feature_names=["f0"])]
        emb = MLETEmbeddingBagCollection(tables, MLETConfig(inner_dim=64, v_init_std=0.25))
        apply_optimizer_in_backward(torchrec_adaptive.AdamAR, emb.inner.parameters(), {"lr": 1e-3})
        dense_opt = torch.optim.Adam(emb.v.parameters(), lr=1e-3)
        ...
        serving_ebc = collapse(emb)  # stock EmbeddingBagCollection(tables) with W_t V_t
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], mlet: Union[MLETConfig, Mapping[str, MLETConfig]],
                 is_weighted: bool = False, device: Optional[torch.device] = None) -> None:
        super().__init__()
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        if isinstance(mlet, MLETConfig):
            per_table: Dict[str, MLETConfig] = {n: mlet for n in names}
        else:
            unknown = sorted(set(mlet) - set(names))
            if unknown:
                raise ValueError(f"MLET configs name tables that do not exist: {unknown} (tables: {names})")
            per_table = dict(mlet)
            for n, c in per_table.items():
                if not isinstance(c, MLETConfig):
                    raise ValueError(f"table {n!r}: expected an MLETConfig, got {type(c).__name__}")
        self._configs: List[EmbeddingBagConfig] = [_copy_config(t) for t in tables]
        self._mlet: Dict[str, MLETConfig] = {}
        inner_tables: List[EmbeddingBagConfig] = []
        for cfg in self._configs:
            m = per_table.get(cfg.name)
            if m is None:
                inner_tables.append(_copy_config(cfg))
                continue
            if m.inner_dim < cfg.embedding_dim and not m.allow_narrow:
                raise ValueError(f"table {cfg.name!r}: MLET inner_dim {m.inner_dim} < embedding_dim "
                                 f"{cfg.embedding_dim}; MLET needs k >= d (pass allow_narrow=True for a low-rank "
                                 f"factorization)")
            if cfg.data_type != DataType.FP32:
                raise ValueError(f"table {cfg.name!r}: MLET supports FP32 tables only, got {cfg.data_type}")
            self._mlet[cfg.name] = m
            inner_tables.append(_inner_config(cfg, m))
        self.inner = EmbeddingBagCollection(tables=inner_tables, is_weighted=is_weighted, device=device)
        self.v = _Projections({cfg.name: self._mlet[cfg.name].v_init_std for cfg in self._configs
                               if cfg.name in self._mlet})
        for cfg in self._configs:
            m = self._mlet.get(cfg.name)
            if m is not None:
                self.v[cfg.name] = nn.Parameter(torch.empty(m.inner_dim, cfg.embedding_dim, device=self.inner.device))
        self.v.reset_parameters()
        self._is_weighted = is_weighted
        self._table_of_key: Dict[str, str] = {f: cfg.name for cfg in self._configs for f in cfg.feature_names}
        self._dim_of_key: Dict[str, int] = {f: cfg.embedding_dim for cfg in self._configs for f in cfg.feature_names}
        self._keys: List[str] = [f for cfg in self._configs for f in cfg.feature_names]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The served tables (dim ``d``), as given (copies)."""
        return [_copy_config(c) for c in self._configs]

    def mlet_configs(self) -> Dict[str, MLETConfig]:
        """Table name -> MLETConfig, for the factorized tables only."""
        return dict(self._mlet)

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.inner(features)
        if not isinstance(pooled, KeyedTensor):  # a sharded inner EBC returns a LazyAwaitable[KeyedTensor]
            pooled = pooled.wait()
        return self.project(pooled)

    def project(self, pooled: KeyedTensor) -> KeyedTensor:
        """Multiplies each MLET key's pooled ``k``-vector by its table's ``V_t``.

        Args:
            pooled (KeyedTensor): the inner EBC's output (any key order).

        Returns:
            KeyedTensor: keys in table order, dims ``d``.
        """
        by_key = pooled.to_dict()
        missing = [k for k in self._keys if k not in by_key]
        if missing:
            raise KeyError(f"pooled output lacks keys {missing}")
        outs: List[torch.Tensor] = []
        for key in self._keys:
            x = by_key[key]
            table = self._table_of_key[key]
            if table in self.v:
                v = self.v[table]
                x = x.to(v.dtype) @ v
            outs.append(x)
        return KeyedTensor(keys=list(self._keys), length_per_key=[self._dim_of_key[k] for k in self._keys],
                           values=torch.cat(outs, dim=1))


def _collapsed_ebc(module: MLETEmbeddingBagCollection, inner_weights: Mapping[str, torch.Tensor],
                   device: Optional[torch.device]) -> EmbeddingBagCollection:
    configs = module.embedding_bag_configs()
    out = EmbeddingBagCollection(tables=configs, is_weighted=module.is_weighted(), device=device)
    with torch.no_grad():
        for cfg in configs:
            w = inner_weights[cfg.name].detach()
            if cfg.name in module.v:
                v = module.v[cfg.name].detach()
                w = (w.to(device=v.device, dtype=torch.float64) @ v.to(torch.float64))
            dst = out.embedding_bags[cfg.name].weight
            if tuple(w.shape) != tuple(dst.shape):
                raise ValueError(f"table {cfg.name!r}: collapsed weight has shape {tuple(w.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(w.to(device=dst.device, dtype=dst.dtype))
    return out


def collapse(module: MLETEmbeddingBagCollection, device: Optional[torch.device] = None) -> EmbeddingBagCollection:
    """Exports an unsharded MLET module as a stock ``EmbeddingBagCollection``.

    MLET tables become ``W_t V_t`` (``n × d``, product taken in float64, stored FP32);
    other tables are copied. The result is ``EmbeddingBagCollection(tables)`` for the
    original configs, so its ``state_dict`` loads into one built with stock TorchRec.

    Args:
        module (MLETEmbeddingBagCollection): trained, with a plain (unsharded) ``inner``.
        device (Optional[torch.device]): device of the result (default: ``V``'s / the
            inner EBC's device).

    Returns:
        EmbeddingBagCollection: outputs equal ``module(kjt)`` to float tolerance.
    """
    if not isinstance(module.inner, EmbeddingBagCollection):
        raise TypeError(f"module.inner is a {type(module.inner).__name__}, not an EmbeddingBagCollection; for a "
                        f"model sharded by DistributedModelParallel call collapse_sharded on every rank")
    weights = {n: bag.weight for n, bag in module.inner.embedding_bags.items()}
    return _collapsed_ebc(module, weights, device or module.inner.device)


def gather_inner_weights(module: MLETEmbeddingBagCollection, dst: Optional[int] = None,
                         group: Optional[dist.ProcessGroup] = None) -> Optional[Dict[str, torch.Tensor]]:
    """Full ``W_t`` of every table of a sharded ``module.inner`` (collective: call on every rank).

    Reads the sharded EBC's ``state_dict`` (a ``ShardedTensor`` per table, whatever the
    plan: table-, row-, column-wise or mixed). With ``dst=None`` every rank receives
    every full table (each rank writes its local shards into a zero tensor, then one
    ``all_reduce(SUM)`` per table: shards do not overlap, so the sum is exact); with
    ``dst=r`` only rank ``r`` does (``ShardedTensor.gather``) and the others get ``None``.
    Tables held as plain tensors (data-parallel) are returned as they are.

    Args:
        module (MLETEmbeddingBagCollection): its ``inner`` sharded by DMP (or plain).
        dst (Optional[int]): destination rank, or ``None`` for all ranks.
        group (Optional[dist.ProcessGroup]): the group of the all-reduce (``dst=None``)
            and of ``dst``'s rank; default each ShardedTensor's own process group (the
            default group for the rank of ``dst``).

    Returns:
        Optional[Dict[str, torch.Tensor]]: table name -> ``[n, k]`` on CPU.
    """
    from .collectives import collective_device
    from .distributed._torchrec_compat import ShardedTensor, process_group_of

    state = module.inner.state_dict()
    prefix, suffix = "embedding_bags.", ".weight"
    out: Dict[str, torch.Tensor] = {}
    is_dst = dst is None or not dist.is_initialized() or dist.get_rank(group) == dst
    for cfg in module.embedding_bag_configs():
        key = f"{prefix}{cfg.name}{suffix}"
        if key not in state:
            raise KeyError(f"table {cfg.name!r}: no {key!r} in the sharded module's state_dict "
                           f"(keys: {sorted(state)[:8]}...)")
        value = state[key]
        if not isinstance(value, ShardedTensor):
            out[cfg.name] = value.detach().cpu().clone()
            continue
        pg = group if group is not None else process_group_of(value)
        shape = tuple(value.metadata().size)
        dtype = value.metadata().tensor_properties.dtype
        device = collective_device(pg)  # CUDA under NCCL, else CPU (what the collectives need)
        if dst is None:
            full = torch.zeros(shape, dtype=dtype, device=device)
            for shard in value.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                r1, c1 = shard.metadata.shard_sizes
                full[r0: r0 + r1, c0: c0 + c1] = shard.tensor.detach().to(device)
            dist.all_reduce(full, op=dist.ReduceOp.SUM, group=pg)
            out[cfg.name] = full.cpu()
        else:
            full = torch.empty(shape, dtype=dtype, device=device) if is_dst else None
            value.gather(dst=dst, out=full, dtype=dtype)
            if full is not None:
                out[cfg.name] = full.cpu()
    return out if is_dst else None


def collapse_sharded(module: MLETEmbeddingBagCollection, dst: Optional[int] = None,
                     group: Optional[dist.ProcessGroup] = None,
                     device: Optional[torch.device] = None) -> Optional[EmbeddingBagCollection]:
    """:func:`collapse` for a module whose ``inner`` was sharded by DMP (collective).

    Gathers ``W_t`` with :func:`gather_inner_weights` and multiplies by ``V_t`` (DMP
    keeps ``V`` replicated, so every rank's copy is the same). Call it on every rank;
    with ``dst=r`` only rank ``r`` gets the EBC (others ``None``), with ``dst=None``
    every rank does. Reach the module through DMP as ``model.module.<path>``.

    Returns:
        Optional[EmbeddingBagCollection]: on CPU unless ``device`` is given.
    """
    weights = gather_inner_weights(module, dst=dst, group=group)
    if weights is None:
        return None
    return _collapsed_ebc(module, weights, device or torch.device("cpu"))
