"""Sharder and sharded module that put our kernel under TorchRec's EmbeddingBagCollection.

Written against torchrec 1.8.0 (``torchrec/distributed/embeddingbag.py``); every hook
below is an override in a subclass, nothing in TorchRec is patched:

* ``__init__``: tables whose optimizer (from ``apply_optimizer_in_backward``) is one
  of ours are re-planned to ``EmbeddingComputeKernel.CUSTOMIZED_KERNEL`` when the
  plan says ``fused`` (what TorchRec's default planner picks; ``dense`` under
  data_parallel), so ``DistributedModelParallel(model, sharders=sharders())`` works
  without a custom plan.
* ``create_grouped_sharding_infos``: TorchRec casts the optimizer class to an FBGEMM
  ``EmbOptimType`` unless the kwargs hold an ``"optimizer"`` key ("Cannot cast ... to
  an EmbOptimType"); for our tables we hand it ``{"optimizer": <name>, rule key:
  RuleConfig}`` instead of the user's kwargs, so those kwargs never reach FBGEMM, and
  tables with different rules land in different kernel groups (TorchRec groups by
  fused params).
* ``_create_lookups``: the stock shardings build ``GroupedPooledEmbeddingsLookup``,
  which refuses CUSTOMIZED_KERNEL; we build our subclass with the same arguments.
* ``_initialize_torch_state``: TorchRec skips ShardedTensor bookkeeping for
  CUSTOMIZED_KERNEL (embeddingbag.py ~line 1197); without it row-wise weights reach
  ``state_dict`` as plain local tensors and DCP keeps one rank's shard. Our kernel
  wrapper already returns ShardedTensors like FBGEMM's, so we let TorchRec's own code
  run with our tables presented as ``fused``.
* ``init_data_parallel`` / ``sharded_parameter_names``: TorchRec wraps every
  data-parallel lookup in DDP. Our data-parallel tables are updated in backward from
  the gathered global batch (``replicated.py``) and have no gradient for DDP, so their
  weights stay out of every DDP (the lookup's and DMP's); their replicas start from
  rank 0's values, as DDP would have made them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Set, Type

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embedding_sharding import EmbeddingSharding
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, ShardingType
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.sharding.dp_sharding import DpPooledEmbeddingSharding
from torchrec.distributed.sharding.rw_sharding import RwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.sharding.twrw_sharding import TwRwPooledEmbeddingSharding
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..rules.optimizers import config_from_optimizer, is_adaptive_optimizer
from ..kernels.inputs import KernelOptions
from .inputs import FeatureCheck, check_features
from .kernel import ADAPTIVE_OPTIONS_KEY, ADAPTIVE_RULE_KEY, AdaptiveGroupedPooledEmbeddingsLookup
from .replicated import ReplicatedLookup, ddp_names_of_replicas, has_other_parameters, replicas_of

CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
DATA_PARALLEL = ShardingType.DATA_PARALLEL.value
# Kernels a plan may name for one of our tables; all run our kernel. Under
# data_parallel TorchRec's sharders and planner only know ``dense``.
_ROUTABLE_KERNELS = {EmbeddingComputeKernel.FUSED.value, CUSTOMIZED}
_ROUTABLE_DP_KERNELS = _ROUTABLE_KERNELS | {EmbeddingComputeKernel.DENSE.value}


def optimizer_class_of(param: torch.Tensor) -> Optional[type]:
    """The class given to ``apply_optimizer_in_backward`` for this table weight, if any."""
    classes = getattr(param, "_optimizer_classes", None)
    return classes[0] if classes else None


def adaptive_table_names(module: EmbeddingBagCollectionInterface) -> List[str]:
    """Tables of an (unsharded) EBC whose in-backward optimizer is one of ours."""
    params = dict(module.named_parameters())
    return [
        c.name for c in module.embedding_bag_configs()
        if is_adaptive_optimizer(optimizer_class_of(params.get(f"embedding_bags.{c.name}.weight", torch.empty(0))))
    ]


def _route_tables(module: EmbeddingBagCollectionInterface,
                  plan: Dict[str, ParameterSharding]) -> Dict[str, ParameterSharding]:
    """A copy of the plan with our tables on CUSTOMIZED_KERNEL (the caller's plan is not mutated)."""
    ours = set(adaptive_table_names(module))
    out = dict(plan)
    for name, ps in plan.items():
        if name in ours:
            routable = _ROUTABLE_DP_KERNELS if ps.sharding_type == DATA_PARALLEL else _ROUTABLE_KERNELS
            if ps.compute_kernel not in routable:
                raise ValueError(f"table {name!r} uses a torchrec_adaptive optimizer, which runs on our kernel; "
                                 f"the plan asks for compute kernel {ps.compute_kernel!r} (use 'fused' or {CUSTOMIZED!r})")
            out[name] = dataclasses.replace(ps, compute_kernel=CUSTOMIZED)
        elif ps.compute_kernel == CUSTOMIZED:
            raise ValueError(f"table {name!r} is planned on {CUSTOMIZED!r} but its optimizer is not a "
                             "torchrec_adaptive one (apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ...))")
    return out


@contextlib.contextmanager
def _adaptive_fused_params(module: EmbeddingBagCollectionInterface, prefix: str, suffix: Optional[str],
                           default_options: Optional[KernelOptions] = None) -> Iterator[None]:
    """Temporarily give our tables kwargs TorchRec passes through untouched.

    TorchRec 1.8.0 reads ``param._optimizer_kwargs[0]`` and mutates it in place
    (adds "optimizer", renames "lr"); the user's dict is swapped out and restored.
    """
    saved: List[tuple[torch.Tensor, Any]] = []
    try:
        for config in module.embedding_bag_configs():
            name = prefix + config.name + (f".{suffix}" if suffix else "")
            param = dict(module.named_parameters()).get(name)
            cls = optimizer_class_of(param) if param is not None else None
            if param is None or not is_adaptive_optimizer(cls):
                continue
            kwargs = dict(getattr(param, "_optimizer_kwargs", [{}])[0])
            try:
                options, rule_kwargs = KernelOptions.split(kwargs, default_options)
                rule = config_from_optimizer(cls, rule_kwargs)  # type: ignore[arg-type]
            except (TypeError, ValueError) as e:
                raise type(e)(f"table {config.name!r}: {e}") from e
            saved.append((param, param._optimizer_kwargs))  # type: ignore[attr-defined]
            param._optimizer_kwargs = [{"optimizer": f"torchrec_adaptive.{cls.__name__}",  # type: ignore[union-attr]
                                        ADAPTIVE_RULE_KEY: rule, ADAPTIVE_OPTIONS_KEY: options}]
        yield
    finally:
        for param, kwargs in saved:
            param._optimizer_kwargs = kwargs  # type: ignore[attr-defined]


def _feature_checks(module: EmbeddingBagCollectionInterface,
                    default_options: Optional[KernelOptions]) -> Dict[str, FeatureCheck]:
    """Per input feature of our tables: its table, global rows and bounds_check mode."""
    params = dict(module.named_parameters())
    ours = set(adaptive_table_names(module))
    out: Dict[str, FeatureCheck] = {}
    for config in module.embedding_bag_configs():
        if config.name not in ours:
            continue
        kwargs = getattr(params[f"embedding_bags.{config.name}.weight"], "_optimizer_kwargs", [{}])[0]
        try:
            options, _ = KernelOptions.split(kwargs, default_options)
        except ValueError as e:
            raise ValueError(f"table {config.name!r}: {e}") from e
        for feature in config.feature_names or [config.name]:
            out[feature] = FeatureCheck(config.name, config.num_embeddings, options.bounds_check)
    return out


def _lookup_for(sharding: EmbeddingSharding) -> nn.Module:
    """Same arguments as each torchrec 1.8.0 ``*PooledEmbeddingSharding.create_lookup``, our lookup class."""
    sharding_type: Optional[ShardingType] = None
    if isinstance(sharding, TwRwPooledEmbeddingSharding):
        configs = sharding._grouped_embedding_configs_per_rank[sharding._rank]
        sharding_type = ShardingType.TABLE_ROW_WISE
    else:
        configs = getattr(sharding, "_grouped_embedding_configs", [])
        if isinstance(sharding, RwPooledEmbeddingSharding):
            sharding_type = ShardingType.ROW_WISE
    if not any(c.compute_kernel == EmbeddingComputeKernel.CUSTOMIZED_KERNEL for c in configs):
        return sharding.create_lookup()
    if isinstance(sharding, DpPooledEmbeddingSharding):
        # TorchRec's DP lookup has no sharding type (and passes scale_weight_gradients=False);
        # ours names it, so that our kernel builds replicas.
        env = sharding._env  # type: ignore[attr-defined]
        return AdaptiveGroupedPooledEmbeddingsLookup(
            grouped_configs=configs, pg=env.process_group, device=sharding._device,  # type: ignore[attr-defined]
            sharding_type=ShardingType.DATA_PARALLEL, scale_weight_gradients=False, env=env,
        )
    if not isinstance(sharding, (TwPooledEmbeddingSharding, CwPooledEmbeddingSharding,  # TwCw subclasses Cw
                                 RwPooledEmbeddingSharding, TwRwPooledEmbeddingSharding)):
        raise NotImplementedError(f"{type(sharding).__name__} is not supported for torchrec_adaptive tables")
    return AdaptiveGroupedPooledEmbeddingsLookup(
        grouped_configs=configs, pg=sharding._pg, device=sharding._device,  # type: ignore[attr-defined]
        sharding_type=sharding_type, env=sharding._env,  # type: ignore[attr-defined]
    )


class ShardedAdaptiveEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    """``ShardedEmbeddingBagCollection`` whose tables with our optimizers run our fused kernel."""

    def __init__(self, module: EmbeddingBagCollectionInterface,
                 table_name_to_parameter_sharding: Dict[str, ParameterSharding], env: ShardingEnv,
                 fused_params: Optional[Dict[str, Any]] = None, device: Optional[torch.device] = None,
                 **kwargs: Any) -> None:
        checks = _feature_checks(module, (fused_params or {}).get(ADAPTIVE_OPTIONS_KEY))
        super().__init__(module, _route_tables(module, table_name_to_parameter_sharding), env,
                         fused_params=fused_params, device=device, **kwargs)
        self._adaptive_checks = checks
        self._adaptive_weighted = module.is_weighted()

    def input_dist(self, ctx: Any, features: Any) -> Any:
        """TorchRec's, after checking our tables' features in global table space (``inputs.py``)."""
        if isinstance(features, KeyedJaggedTensor):
            features = check_features(features, self._adaptive_checks, self._adaptive_weighted)
        return super().input_dist(ctx, features)

    @classmethod
    def create_grouped_sharding_infos(cls, module: EmbeddingBagCollectionInterface,  # type: ignore[override]
                                      table_name_to_parameter_sharding: Dict[str, ParameterSharding], prefix: str,
                                      fused_params: Optional[Dict[str, Any]], suffix: Optional[str] = "weight") -> Any:
        # Our defaults travel in the sharder's fused params; FBGEMM's tables must never see them.
        stock = dict(fused_params or {})
        defaults = stock.pop(ADAPTIVE_OPTIONS_KEY, None)
        with _adaptive_fused_params(module, prefix, suffix, defaults):
            return super().create_grouped_sharding_infos(module, table_name_to_parameter_sharding, prefix,
                                                         stock, suffix)

    def _create_lookups(self) -> None:
        for sharding in self._embedding_shardings:
            self._lookups.append(_lookup_for(sharding))

    def init_data_parallel(self) -> None:
        """TorchRec's, except for data-parallel lookups holding our tables: their weights
        never get a gradient (the update happens in backward, from the gathered batch), so
        DDP must not hold them. A lookup with only our tables is not given to DDP at all
        (:class:`ReplicatedLookup` stands in); one that also holds stock dense tables is,
        with our parameters and buffers on DDP's ignore list. Either way our replicas start
        from rank 0's weights, as DDP's constructor would have made them."""
        without_ddp: Set[int] = set()
        for i, (sharding, lookup) in enumerate(zip(self._embedding_shardings, self._lookups)):
            kernels = replicas_of(lookup) if isinstance(sharding, DpPooledEmbeddingSharding) else []
            if not kernels:
                continue
            for kernel in kernels:
                kernel.replicas.broadcast_from_first(kernel.weights.detach())  # type: ignore[union-attr]
            ignore = ddp_names_of_replicas(lookup)
            if has_other_parameters(lookup, ignore):
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(lookup, sorted(ignore))
            else:
                self._lookups[i] = ReplicatedLookup(lookup)
                without_ddp.add(i)
        shardings = self._embedding_shardings
        self._embedding_shardings = [None if i in without_ddp else s for i, s in enumerate(shardings)]  # type: ignore[misc]
        try:
            super().init_data_parallel()
        finally:
            self._embedding_shardings = shardings

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """Parameters DMP keeps out of its DDP: TorchRec's list (every parameter of this
        module), plus our data-parallel tables by name, stated here because DDP must never
        all-reduce or apply them, whatever TorchRec's default becomes."""
        names = list(super().sharded_parameter_names(prefix))
        yield from names
        dp = [name for name, ps in self.module_sharding_plan.items()
              if ps.sharding_type == DATA_PARALLEL and ps.compute_kernel == CUSTOMIZED]
        for name in dp:
            key = f"{prefix}.embedding_bags.{name}.weight" if prefix else f"embedding_bags.{name}.weight"
            if key not in names:
                yield key

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        real_plan = self.module_sharding_plan
        self.module_sharding_plan = type(real_plan)({  # type: ignore[call-arg]
            name: dataclasses.replace(ps, compute_kernel=EmbeddingComputeKernel.FUSED.value)
            if ps.compute_kernel == CUSTOMIZED else ps
            for name, ps in real_plan.items()
        })
        try:
            super()._initialize_torch_state(skip_registering)
        finally:
            self.module_sharding_plan = real_plan


class AdaptiveEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """EBC sharder for models mixing our optimizers with TorchRec/FBGEMM ones.

    What it offers differs from torchrec 1.8.0's EBC sharder, because a sharder's
    offer is per sharding type, not per table, and TorchRec's default planner must
    be able to plan every table of a plain ``DistributedModelParallel(model,
    sharders=sharders())`` call:

    * row_wise and table_row_wise also on CPU (TorchRec offers them on CUDA only;
      our kernel is device-agnostic);
    * data_parallel as TorchRec does (kernel ``dense``, plus ``customized_kernel`` with
      ``offer_customized_kernel=True``); our tables planned there run as replicas of
      our kernel (``replicated.py``). ``offer_data_parallel=False`` takes data_parallel
      off the offer for every table of the EBC (a sharder's offer is per type), e.g.
      to keep the default planner from replicating small tables;
    * no grid sharding (our lookup does not implement it);
    * ``customized_kernel`` only with ``offer_customized_kernel=True``, because
      TorchRec's default perf estimator raises on it; without it the planner plans
      our tables ``fused`` (``dense`` under data_parallel) and the sharded module
      reroutes them.
    """

    def __init__(self, fused_params: Optional[Dict[str, Any]] = None, *, offer_customized_kernel: bool = False,
                 offer_data_parallel: bool = True, bounds_check: str = "error", nonfinite: str = "raise",
                 backend: Optional[str] = None, sync_check_interval: int = 1, validate_offsets: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(fused_params=fused_params, **kwargs)
        self._offer_customized_kernel = offer_customized_kernel
        self._offer_data_parallel = offer_data_parallel
        # Defaults for our tables; a table's own optimizer kwargs override them.
        self._kernel_options = KernelOptions(bounds_check=bounds_check, nonfinite=nonfinite, backend=backend,
                                             sync_check_interval=sync_check_interval, validate_offsets=validate_offsets)

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = [t for t in super().sharding_types(compute_device_type) if t != ShardingType.GRID_SHARD.value]
        if not self._offer_data_parallel:
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        if self._offer_customized_kernel:
            kernels.append(CUSTOMIZED)
        return kernels

    def shard(self, module: EmbeddingBagCollection, params: Dict[str, ParameterSharding], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> ShardedEmbeddingBagCollection:
        fused_params = {**(self.fused_params or {}), ADAPTIVE_OPTIONS_KEY: self._kernel_options}
        return ShardedAdaptiveEmbeddingBagCollection(
            module=module, table_name_to_parameter_sharding=params, env=env, fused_params=fused_params,
            device=device, qcomm_codecs_registry=self.qcomm_codecs_registry, module_fqn=module_fqn,
            sharded_module_order_overwrite=self._sharded_module_order_overwrite,
        )

    @property
    def sharded_module_type(self) -> Type[ShardedEmbeddingBagCollection]:
        return ShardedAdaptiveEmbeddingBagCollection


def sharders(*, offer_customized_kernel: bool = False, offer_data_parallel: bool = True,
             bounds_check: str = "error", nonfinite: str = "raise", backend: Optional[str] = None,
             sync_check_interval: int = 1, validate_offsets: bool = True) -> List[ModuleSharder[nn.Module]]:
    """Our EBC sharder plus TorchRec's default sharders for every other module type.

    ``bounds_check`` / ``nonfinite`` / ``backend`` / ``sync_check_interval`` / ``validate_offsets``:
    defaults for our tables (see ``KernelOptions``, validated here); a table's own
    ``apply_optimizer_in_backward`` kwargs of the same names override them."""
    ours = AdaptiveEmbeddingBagCollectionSharder(offer_customized_kernel=offer_customized_kernel,
                                                 offer_data_parallel=offer_data_parallel,
                                                 bounds_check=bounds_check, nonfinite=nonfinite, backend=backend,
                                                 sync_check_interval=sync_check_interval,
                                                 validate_offsets=validate_offsets)
    rest = [s for s in get_default_sharders() if s.module_type is not EmbeddingBagCollection]
    return [ours, *rest]  # type: ignore[list-item]
