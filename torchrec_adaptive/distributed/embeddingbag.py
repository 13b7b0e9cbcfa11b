"""Sharder and sharded module that put our kernel under TorchRec's EmbeddingBagCollection.

Written against torchrec 1.8.0 (``torchrec/distributed/embeddingbag.py``). Nothing in
TorchRec is patched; what reaches a TorchRec internal goes through ``_torchrec_compat.py``
(the seam: each private named once, with a canary test). The public route first:

* ``__init__``: tables whose optimizer (from ``apply_optimizer_in_backward``) is one
  of ours are re-planned to ``EmbeddingComputeKernel.CUSTOMIZED_KERNEL`` when the
  plan says ``fused`` (what TorchRec's default planner picks; ``dense`` under
  data_parallel), as an :class:`AdaptiveParameterSharding`: TorchRec's CUSTOMIZED_KERNEL
  route (torchrec PR #2887, as NVIDIA's dynamicemb uses it) passes its
  ``get_additional_fused_params`` (the table's RuleConfig and KernelOptions) into the
  group's fused params, so tables with different rules land in different kernel groups.
  ``DistributedModelParallel(model, sharders=sharders())`` works without a custom plan.
* ``create_grouped_sharding_infos`` (public): TorchRec casts the optimizer class to an
  FBGEMM ``EmbOptimType`` unless the kwargs hold an ``"optimizer"`` key; our tables show
  it ``{"optimizer": <name>}`` for the call (the seam's ``present_optimizer_kwargs``), so
  the user's kwargs never reach FBGEMM and are never mutated.
* lookups: the stock shardings build ``GroupedPooledEmbeddingsLookup``, which refuses
  CUSTOMIZED_KERNEL; :meth:`create_lookup_for` builds our subclass with the same arguments.
* ShardedTensor bookkeeping of our tables: TorchRec's own (the seam's
  ``ShardedEBCHooks._initialize_torch_state``).
* ``init_data_parallel`` / ``sharded_parameter_names`` (public): TorchRec wraps every
  data-parallel lookup in DDP. Our data-parallel tables are updated in backward from
  the gathered global batch (``replicated.py``) and have no gradient for DDP, so their
  weights stay out of every DDP (the lookup's and DMP's); their replicas start from
  rank 0's values, as DDP would have made them.
* ``update_shards`` (public; ``DistributedModelParallel.reshard``): refused at once for
  a module holding our tables, naming them, before anything changes (TorchRec rebuilds
  every table of the module on FBGEMM's kernel and moves FBGEMM's state only); reshard
  through a checkpoint instead (``checkpoint.save``, a new DMP with the new plan,
  ``checkpoint.load``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Set, Type

import torch
from torch import nn
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

from ..rules.configs import RuleConfig
from ..rules.optimizers import config_from_optimizer, is_adaptive_optimizer
from ..kernels.inputs import KernelOptions
from ._torchrec_compat import (
    ShardedEBCHooks,
    ddp_ignore,
    lookup_args,
    optimizer_class_of,
    optimizer_kwargs_of,
    present_optimizer_kwargs,
)
from .inputs import FeatureCheck, check_features
from .kernel import ADAPTIVE_OPTIONS_KEY, ADAPTIVE_RULE_KEY, AdaptiveGroupedPooledEmbeddingsLookup
from .replicated import ReplicatedLookup, ddp_names_of_replicas, has_other_parameters, replicas_of

CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
DATA_PARALLEL = ShardingType.DATA_PARALLEL.value
# Kernels a plan may name for one of our tables; all run our kernel. Under
# data_parallel TorchRec's sharders and planner only know ``dense``.
_ROUTABLE_KERNELS = {EmbeddingComputeKernel.FUSED.value, CUSTOMIZED}
_ROUTABLE_DP_KERNELS = _ROUTABLE_KERNELS | {EmbeddingComputeKernel.DENSE.value}


def adaptive_table_names(module: EmbeddingBagCollectionInterface) -> List[str]:
    """Tables of an (unsharded) EBC whose in-backward optimizer is one of ours."""
    params = dict(module.named_parameters())
    return [
        c.name for c in module.embedding_bag_configs()
        if is_adaptive_optimizer(optimizer_class_of(params.get(f"embedding_bags.{c.name}.weight", torch.empty(0))))
    ]


@dataclasses.dataclass
class AdaptiveParameterSharding(ParameterSharding):
    """One of our tables' ParameterSharding: TorchRec's CUSTOMIZED_KERNEL route.

    TorchRec (``add_params_from_parameter_sharding``) adds what
    :meth:`get_additional_fused_params` returns to the table's fused params for
    ``compute_kernel == "customized_kernel"`` (torchrec PR #2887; NVIDIA's dynamicemb
    plugs its kernel in the same way, ``DynamicEmbParameterSharding``): our kernel reads
    the rule and the kernel options there (``kernel.rule_of`` / ``options_of``).
    """

    customized_compute_kernel: Optional[str] = "torchrec_adaptive"
    rule: Optional[RuleConfig] = None
    kernel_options: Optional[KernelOptions] = None

    def get_additional_fused_params(self) -> Dict[str, Any]:
        return {ADAPTIVE_RULE_KEY: self.rule, ADAPTIVE_OPTIONS_KEY: self.kernel_options}


def _table_rule(module: EmbeddingBagCollectionInterface, table: str,
                default_options: Optional[KernelOptions]) -> tuple[RuleConfig, KernelOptions]:
    """The rule and kernel options of one of our tables, from its ``apply_optimizer_in_backward`` kwargs."""
    param = dict(module.named_parameters())[f"embedding_bags.{table}.weight"]
    try:
        options, rule_kwargs = KernelOptions.split(optimizer_kwargs_of(param), default_options)
        rule = config_from_optimizer(optimizer_class_of(param), rule_kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise type(e)(f"table {table!r}: {e}") from e
    return rule, options


def _route_tables(module: EmbeddingBagCollectionInterface, plan: Dict[str, ParameterSharding],
                  default_options: Optional[KernelOptions] = None) -> Dict[str, ParameterSharding]:
    """A copy of the plan with our tables on CUSTOMIZED_KERNEL (the caller's plan is not mutated)."""
    ours = set(adaptive_table_names(module))
    out = dict(plan)
    for name, ps in plan.items():
        if name in ours:
            routable = _ROUTABLE_DP_KERNELS if ps.sharding_type == DATA_PARALLEL else _ROUTABLE_KERNELS
            if ps.compute_kernel not in routable:
                raise ValueError(f"table {name!r} uses a torchrec_adaptive optimizer, which runs on our kernel; "
                                 f"the plan asks for compute kernel {ps.compute_kernel!r} (use 'fused' or {CUSTOMIZED!r})")
            rule, options = _table_rule(module, name, default_options)
            fields = {f.name: getattr(ps, f.name) for f in dataclasses.fields(ParameterSharding)}
            out[name] = AdaptiveParameterSharding(**{**fields, "compute_kernel": CUSTOMIZED},
                                                  rule=rule, kernel_options=options)
        elif ps.compute_kernel == CUSTOMIZED:
            raise ValueError(f"table {name!r} is planned on {CUSTOMIZED!r} but its optimizer is not a "
                             "torchrec_adaptive one (apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ...))")
    return out


def _feature_checks(module: EmbeddingBagCollectionInterface,
                    default_options: Optional[KernelOptions]) -> Dict[str, FeatureCheck]:
    """Per input feature of our tables: its table, global rows and bounds_check mode."""
    params = dict(module.named_parameters())
    ours = set(adaptive_table_names(module))
    out: Dict[str, FeatureCheck] = {}
    for config in module.embedding_bag_configs():
        if config.name not in ours:
            continue
        kwargs = optimizer_kwargs_of(params[f"embedding_bags.{config.name}.weight"])
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
        sharding_type = ShardingType.TABLE_ROW_WISE
    elif isinstance(sharding, RwPooledEmbeddingSharding):
        sharding_type = ShardingType.ROW_WISE
    args = lookup_args(sharding)
    if not any(c.compute_kernel == EmbeddingComputeKernel.CUSTOMIZED_KERNEL for c in args.grouped_configs):
        return sharding.create_lookup()
    if isinstance(sharding, DpPooledEmbeddingSharding):
        # TorchRec's DP lookup has no sharding type (and passes scale_weight_gradients=False);
        # ours names it, so that our kernel builds replicas.
        return AdaptiveGroupedPooledEmbeddingsLookup(
            grouped_configs=args.grouped_configs, pg=args.env.process_group, device=args.device,
            sharding_type=ShardingType.DATA_PARALLEL, scale_weight_gradients=False, env=args.env,
        )
    if not isinstance(sharding, (TwPooledEmbeddingSharding, CwPooledEmbeddingSharding,  # TwCw subclasses Cw
                                 RwPooledEmbeddingSharding, TwRwPooledEmbeddingSharding)):
        raise NotImplementedError(f"{type(sharding).__name__} is not supported for torchrec_adaptive tables")
    return AdaptiveGroupedPooledEmbeddingsLookup(
        grouped_configs=args.grouped_configs, pg=args.pg, device=args.device, sharding_type=sharding_type,
        env=args.env,
    )


class ShardedAdaptiveEmbeddingBagCollection(ShardedEBCHooks):
    """``ShardedEmbeddingBagCollection`` whose tables with our optimizers run our fused kernel."""

    def __init__(self, module: EmbeddingBagCollectionInterface,
                 table_name_to_parameter_sharding: Dict[str, ParameterSharding], env: ShardingEnv,
                 fused_params: Optional[Dict[str, Any]] = None, device: Optional[torch.device] = None,
                 **kwargs: Any) -> None:
        defaults = (fused_params or {}).get(ADAPTIVE_OPTIONS_KEY)
        checks = _feature_checks(module, defaults)
        super().__init__(module, _route_tables(module, table_name_to_parameter_sharding, defaults), env,
                         fused_params=fused_params, device=device, **kwargs)
        self._adaptive_checks = checks
        self._adaptive_weighted = module.is_weighted()
        self._adaptive_tables = sorted(name for name, ps in self.module_sharding_plan.items()
                                       if ps.compute_kernel == CUSTOMIZED)

    def input_dist(self, ctx: Any, features: Any) -> Any:
        """TorchRec's, after checking our tables' features in global table space (``inputs.py``)."""
        if isinstance(features, KeyedJaggedTensor):
            features = check_features(features, self._adaptive_checks, self._adaptive_weighted)
        return super().input_dist(ctx, features)

    @classmethod
    def create_grouped_sharding_infos(cls, module: EmbeddingBagCollectionInterface,  # type: ignore[override]
                                      table_name_to_parameter_sharding: Dict[str, ParameterSharding], prefix: str,
                                      fused_params: Optional[Dict[str, Any]], suffix: Optional[str] = "weight") -> Any:
        # Our defaults travel in the sharder's fused params; FBGEMM's tables must never see them
        # (each of our tables has its options on its AdaptiveParameterSharding).
        stock = dict(fused_params or {})
        stock.pop(ADAPTIVE_OPTIONS_KEY, None)
        params = dict(module.named_parameters())
        ours = []
        for name, ps in table_name_to_parameter_sharding.items():
            if isinstance(ps, AdaptiveParameterSharding):
                param = params[prefix + name + (f".{suffix}" if suffix else "")]
                ours.append((param, f"torchrec_adaptive.{optimizer_class_of(param).__name__}"))  # type: ignore[union-attr]
        with present_optimizer_kwargs(ours):
            return super().create_grouped_sharding_infos(module, table_name_to_parameter_sharding, prefix,
                                                         stock, suffix)

    def create_lookup_for(self, sharding: EmbeddingSharding) -> nn.Module:
        return _lookup_for(sharding)

    def init_data_parallel(self) -> None:
        """TorchRec's, except for data-parallel lookups holding our tables: their weights
        never get a gradient (the update happens in backward, from the gathered batch), so
        DDP must not hold them. A lookup with only our tables is not given to DDP at all
        (:class:`ReplicatedLookup` stands in); one that also holds stock dense tables is,
        with our parameters and buffers on DDP's ignore list. Either way our replicas start
        from rank 0's weights, as DDP's constructor would have made them."""
        without_ddp: Set[int] = set()
        for i, (sharding, lookup) in enumerate(zip(self.embedding_shardings(), self.lookups())):
            kernels = replicas_of(lookup) if isinstance(sharding, DpPooledEmbeddingSharding) else []
            if not kernels:
                continue
            for kernel in kernels:
                kernel.replicas.broadcast_from_first(kernel.weights.detach())  # type: ignore[union-attr]
            ignore = ddp_names_of_replicas(lookup)
            if has_other_parameters(lookup, ignore):
                ddp_ignore(lookup, sorted(ignore))
            else:
                self.replace_lookup(i, ReplicatedLookup(lookup))
                without_ddp.add(i)
        self.init_data_parallel_skipping(without_ddp)

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

    def update_shards(self, changed_sharding_params: Dict[str, ParameterSharding], env: ShardingEnv,
                      device: Optional[torch.device]) -> None:
        """``DistributedModelParallel.reshard`` (TorchRec's dynamic sharding) ends here. Refused
        at once, before anything changes, for a module holding our tables: TorchRec rebuilds
        every table of the module from the new plan (ours on FBGEMM's kernel, which cannot take
        our rules) and moves only FBGEMM's optimizer state, so our tables would lose their
        state (moments, c_r, s_r, the step k) even when they do not move."""
        if self._adaptive_tables:
            moving = sorted(set(changed_sharding_params) & set(self._adaptive_tables))
            raise NotImplementedError(
                f"DistributedModelParallel.reshard is not supported for an EmbeddingBagCollection holding "
                f"torchrec_adaptive tables {self._adaptive_tables} (asked to move {sorted(changed_sharding_params)}"
                f"{f', of which ours: {moving}' if moving else ''}): TorchRec's update_shards rebuilds every table of "
                f"the module on FBGEMM's kernel and moves FBGEMM's optimizer state only. Nothing was changed. "
                f"Reshard through a checkpoint instead: torchrec_adaptive.distributed.checkpoint.save(model, path), "
                f"then a new DistributedModelParallel with the new plan and checkpoint.load(model, path).")
        super().update_shards(changed_sharding_params, env, device)  # type: ignore[arg-type]


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
                 sharded_module_order_overwrite: Optional[List[str]] = None, **kwargs: Any) -> None:
        super().__init__(fused_params=fused_params, sharded_module_order_overwrite=sharded_module_order_overwrite,
                         **kwargs)
        self.sharded_module_order_overwrite = sharded_module_order_overwrite
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
            sharded_module_order_overwrite=self.sharded_module_order_overwrite,
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
