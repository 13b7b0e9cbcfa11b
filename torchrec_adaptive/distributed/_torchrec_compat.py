"""The one place torchrec_adaptive names TorchRec / PyTorch internals (supported: torchrec 1.8.x).

Everything else in the package reaches TorchRec through its public API, or through the
functions and hook classes below. Each private is named once, with why we need it and
what breaks if it changes; ``tests/distributed/test_torchrec_compat.py`` has one canary
per private (it exists, with the fields or signature we use), so a TorchRec upgrade
fails there first, with a message naming the supported version. A port to another
TorchRec changes this file (and :data:`SUPPORTED_TORCHREC`) only; docs/torchrec_1_9.md
lists what 1.9 changes in these surfaces.

What the public API (and the ``CUSTOMIZED_KERNEL`` route of torchrec PR #2887) carries
is used directly elsewhere: the plan names ``customized_kernel`` on an
:class:`~torchrec_adaptive.distributed.embeddingbag.AdaptiveParameterSharding` whose
``get_additional_fused_params`` hands each table's rule and kernel options to our
kernel; ``create_grouped_sharding_infos``, ``input_dist``, ``init_data_parallel``,
``sharded_parameter_names``, ``named_parameters_by_table``, ``update_shards`` and the
sharder's ``shard`` / ``sharding_types`` / ``compute_kernels`` are public overrides.

Two temporary state swaps remain, each because TorchRec 1.8 offers no public path
(see :func:`present_optimizer_kwargs` and :meth:`ShardedEBCHooks._initialize_torch_state`);
a third (``init_data_parallel``) has a public path from TorchRec 1.9 on
(``mark_data_parallel_skip_grad_sync``), see :meth:`ShardedEBCHooks.init_data_parallel_skipping`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# --------------------------------------------------------------------------- version
# The TorchRec versions this file was written and tested against: [lowest, first unsupported).
SUPPORTED_TORCHREC = ("1.8.0", "1.9.0")
SUPPORTED_TORCHREC_TEXT = f"torchrec >={SUPPORTED_TORCHREC[0]},<{SUPPORTED_TORCHREC[1]}"
# Set to 1 to import anyway (e.g. while porting: the canaries then say what changed).
SKIP_VERSION_CHECK_ENV = "TORCHREC_ADAPTIVE_SKIP_VERSION_CHECK"


class UnsupportedTorchRecVersion(ImportError):
    """The installed TorchRec is outside the range this package was written against."""


def _version_tuple(version: str) -> Tuple[int, int, int]:
    """``"1.8.0"`` -> (1, 8, 0); a pre-release or local build (1.9.0a0, 1.8.0+cpu) counts as its release."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        raise UnsupportedTorchRecVersion(f"cannot read the installed torchrec version {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def installed_torchrec_version() -> Optional[str]:
    """The installed torchrec's version (its distribution's, or ``torchrec.__version__`` for a
    source checkout), or None if torchrec is not installed."""
    for name in ("torchrec", "torchrec-nightly"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if importlib.util.find_spec("torchrec") is None:
        return None
    import torchrec

    return str(getattr(torchrec, "__version__", "unknown"))


def check_torchrec_version(version: Optional[str] = None) -> str:
    """Raise :class:`UnsupportedTorchRecVersion` unless ``version`` (default: the installed
    torchrec) is in :data:`SUPPORTED_TORCHREC`. Returns the version checked."""
    version = installed_torchrec_version() if version is None else version
    if version is None:
        raise UnsupportedTorchRecVersion(
            f"torchrec_adaptive.distributed needs TorchRec ({SUPPORTED_TORCHREC_TEXT}), which is not installed; "
            "install it with scripts/bootstrap.sh, or `pip install torchrec-adaptive[cpu]` (see README.md)")
    lo, hi = (_version_tuple(v) for v in SUPPORTED_TORCHREC)
    if not lo <= _version_tuple(version) < hi:
        if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
            return version
        raise UnsupportedTorchRecVersion(
            f"torchrec_adaptive.distributed supports {SUPPORTED_TORCHREC_TEXT}, but torchrec {version} is installed. "
            f"It plugs into TorchRec internals that change between releases (listed in "
            f"torchrec_adaptive/distributed/_torchrec_compat.py; docs/torchrec_1_9.md says what 1.9 changes). "
            f"Install torchrec=={SUPPORTED_TORCHREC[0]} (scripts/bootstrap.sh), or set {SKIP_VERSION_CHECK_ENV}=1 "
            f"to try anyway and run tests/distributed/test_torchrec_compat.py to see what differs.")
    return version


check_torchrec_version()

# TorchRec imports only after the version check (an unsupported TorchRec fails with the message above).
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup  # noqa: E402
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, ShardingType  # noqa: E402
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection  # noqa: E402
from torchrec.distributed.planner.enumerators import GUARDED_COMPUTE_KERNELS as _GUARDED  # noqa: E402
from torchrec.distributed.planner.shard_estimators import _calculate_optimizer_sizes  # noqa: E402
from torchrec.distributed.sharding.twrw_sharding import TwRwPooledEmbeddingSharding  # noqa: E402
from torchrec.distributed.types import ShardedTensor  # noqa: E402

CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
FUSED = EmbeddingComputeKernel.FUSED.value


# ------------------------------------------------ optimizers applied in backward (PyTorch)
# ``apply_optimizer_in_backward`` (TorchRec's public one delegates to
# ``torch.distributed.optim._apply_optimizer_in_backward``) records its arguments on each
# parameter as ``_optimizer_classes`` / ``_optimizer_kwargs`` and the optimizers it built as
# ``_in_backward_optimizers``; TorchRec's sharders read the first two, and TorchRec's fused
# kernels mark their weights with the third. No public getter exists. If renamed: our tables
# are no longer recognised (they would be planned on FBGEMM, which refuses our classes).

def optimizer_class_of(param: Optional[torch.Tensor]) -> Optional[type]:
    """The class given to ``apply_optimizer_in_backward`` for this parameter, if any."""
    classes = getattr(param, "_optimizer_classes", None)
    return classes[0] if classes else None


def optimizer_kwargs_of(param: Optional[torch.Tensor]) -> Dict[str, Any]:
    """A copy of the kwargs given to ``apply_optimizer_in_backward`` for this parameter ({} if none)."""
    kwargs = getattr(param, "_optimizer_kwargs", None)
    return dict(kwargs[0]) if kwargs else {}


def in_backward_optimizers(param: torch.Tensor) -> List[Any]:
    """The optimizers applied to ``param`` in backward (ours, FBGEMM's fused views, torch's)."""
    return list(getattr(param, "_in_backward_optimizers", []))


def mark_updated_in_backward(param: torch.Tensor, optimizer: Any) -> None:
    """Mark ``param`` as updated in backward by ``optimizer``, as TorchRec's fused kernels do:
    DMP keeps such parameters away from DDP and from its dense optimizer."""
    param._in_backward_optimizers = [optimizer]  # type: ignore[attr-defined]


@contextlib.contextmanager
def present_optimizer_kwargs(params: List[Tuple[torch.Tensor, str]]) -> Iterator[None]:
    """Temporarily show TorchRec ``{"optimizer": <name>}`` as the kwargs of our tables' weights.

    State swap, justified: ``ShardedEmbeddingBagCollection.create_grouped_sharding_infos``
    (1.8.0) reads ``param._optimizer_kwargs[0]``, casts the optimizer class to an FBGEMM
    ``EmbOptimType`` unless that dict has an ``"optimizer"`` key (it raises "Cannot cast ...
    to an EmbOptimType" for ours), and mutates the dict in place (adds "optimizer", renames
    "lr"). No public argument replaces the kwargs TorchRec reads, so for the call's duration
    each of our weights shows a fresh ``{"optimizer": name}`` (the rule itself travels on the
    public route, ``ParameterSharding.get_additional_fused_params``); the user's dicts are
    restored untouched. ``params``: (weight, optimizer name) pairs. If TorchRec stops reading
    ``_optimizer_kwargs``, the swap is a no-op and our tables fail to plan (canary).
    """
    saved: List[Tuple[torch.Tensor, Any]] = []
    try:
        for param, name in params:
            saved.append((param, getattr(param, "_optimizer_kwargs", None)))
            param._optimizer_kwargs = [{"optimizer": name}]  # type: ignore[attr-defined]
        yield
    finally:
        for param, kwargs in saved:
            if kwargs is None:
                del param._optimizer_kwargs  # type: ignore[attr-defined]
            else:
                param._optimizer_kwargs = kwargs  # type: ignore[attr-defined]


# ------------------------------------------------------------ sharding internals (TorchRec)

@dataclasses.dataclass(frozen=True)
class LookupArgs:
    """What each ``*PooledEmbeddingSharding.create_lookup`` of torchrec 1.8.0 passes to its lookup."""

    grouped_configs: List[Any]
    pg: Optional[dist.ProcessGroup]
    device: Optional[torch.device]
    env: Any


def lookup_args(sharding: Any) -> LookupArgs:
    """The arguments TorchRec's sharding would give its lookup.

    The shardings keep them in private fields (``_grouped_embedding_configs`` or, for
    table-row-wise, ``_grouped_embedding_configs_per_rank[_rank]``; ``_pg``, ``_device``,
    ``_env``) and build ``GroupedPooledEmbeddingsLookup`` in ``create_lookup`` without a hook
    for the lookup class. If a field is renamed, sharding a model with our tables fails here
    (AttributeError); the canary names the field.
    """
    if isinstance(sharding, TwRwPooledEmbeddingSharding):
        configs = sharding._grouped_embedding_configs_per_rank[sharding._rank]
    else:
        configs = getattr(sharding, "_grouped_embedding_configs", [])
    env = sharding._env
    pg = getattr(sharding, "_pg", None)
    return LookupArgs(grouped_configs=configs, pg=pg if pg is not None else env.process_group,
                      device=sharding._device, env=env)


def ddp_ignore(module: nn.Module, names: List[str]) -> None:
    """Keep ``names`` (parameters and buffers of ``module``) out of the DDP that will wrap it.

    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` is PyTorch's only
    way to do that (DDP takes no ignore list); TorchRec's ``init_data_parallel`` builds the DDP.
    If it disappears, a data-parallel lookup mixing stock dense tables and ours fails to shard.
    """
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def sharded_lookups(module: nn.Module) -> List[nn.Module]:
    """The lookups of a TorchRec sharded embedding module (DDP-wrapped ones unwrapped).

    torchrec 1.8.0 keeps them in a plain list ``_lookups``, invisible to ``modules()``; MEDA,
    diagnostics and Helen find the embedding kernels through here. If renamed: they find no
    sharded kernel (Helen raises "found no torchrec_adaptive embedding kernel").
    """
    out = []
    for lookup in getattr(module, "_lookups", None) or []:
        if isinstance(lookup, nn.Module):
            out.append(getattr(lookup, "module", lookup))  # DDP / ReplicatedLookup wrap data-parallel ones
    return out


class GroupedLookupHooks(GroupedPooledEmbeddingsLookup):
    """TorchRec's pooled lookup with a public hook for the kernel of a ``customized_kernel`` group.

    torchrec 1.8.0 builds each group's kernel in the private ``_create_embedding_kernel`` and
    raises for ``CUSTOMIZED_KERNEL`` (NVIDIA's dynamicemb overrides the same method). If its
    signature changes, building our lookup fails with a TypeError (canary checks it).
    """

    def create_customized_kernel(self, config: Any, device: Optional[torch.device],
                                 pg: Optional[dist.ProcessGroup], sharding_type: Optional[ShardingType]) -> nn.Module:
        raise NotImplementedError

    def _create_embedding_kernel(self, config: Any, device: Optional[torch.device], pg: Optional[dist.ProcessGroup],
                                 sharding_type: Optional[ShardingType], env: Any) -> Any:
        if config.compute_kernel == EmbeddingComputeKernel.CUSTOMIZED_KERNEL:
            return self.create_customized_kernel(config, device, pg, sharding_type)
        return super()._create_embedding_kernel(config, device, pg, sharding_type, env)


class ShardedEBCHooks(ShardedEmbeddingBagCollection):
    """TorchRec's sharded EBC with its private hooks turned into named methods."""

    def create_lookup_for(self, sharding: Any) -> nn.Module:
        """The lookup of one sharding (default: TorchRec's)."""
        return sharding.create_lookup()

    def _create_lookups(self) -> None:
        # torchrec 1.8.0: the private step of __init__ that builds one lookup per sharding into
        # ``_lookups``. The public alternative, overriding ``create_embedding_bag_sharding`` with a
        # subclass of each of the five sharding classes (dynamicemb does it for row-wise), reads
        # the same private sharding fields (lookup_args). If renamed: our tables get TorchRec's
        # lookup, which raises for customized_kernel.
        for sharding in self._embedding_shardings:
            self._lookups.append(self.create_lookup_for(sharding))

    def embedding_shardings(self) -> List[Any]:
        """The module's shardings, one per lookup (``_embedding_shardings``, no public getter)."""
        return list(self._embedding_shardings)

    def lookups(self) -> List[nn.Module]:
        """The module's lookups as stored (possibly DDP-wrapped), one per sharding."""
        return list(self._lookups)

    def replace_lookup(self, index: int, lookup: nn.Module) -> None:
        self._lookups[index] = lookup

    def init_data_parallel_skipping(self, skip: Set[int]) -> None:
        """TorchRec's ``init_data_parallel``, except that the lookups at ``skip`` get no DDP.

        State swap, justified: torchrec 1.8.0 wraps every lookup whose sharding is
        ``DpPooledEmbeddingSharding`` in DDP, and nothing public exempts one; the skipped
        entries of ``_embedding_shardings`` read None for the call's duration and are
        restored. TorchRec 1.9 adds ``mark_data_parallel_skip_grad_sync`` (module-wide): the
        public path after a port. If TorchRec reads the list differently, DDP wraps (and
        rejects) our replicas: the data-parallel tests fail.
        """
        shardings = self._embedding_shardings
        self._embedding_shardings = [None if i in skip else s for i, s in enumerate(shardings)]  # type: ignore[misc]
        try:
            ShardedEmbeddingBagCollection.init_data_parallel(self)
        finally:
            self._embedding_shardings = shardings

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        # State swap, justified: torchrec 1.8.0's private ``_initialize_torch_state`` skips the
        # ShardedTensor bookkeeping of CUSTOMIZED_KERNEL tables ("should be implemented in child
        # class"); our kernel returns ShardedTensors like FBGEMM's, so TorchRec's own code runs
        # with ``module_sharding_plan`` showing our tables as ``fused`` and is then restored.
        # Without it row-wise weights reach state_dict as one rank's local tensor (DCP drops the
        # rest). If the method is renamed, the checkpoint/resharding tests fail.
        real_plan = self.module_sharding_plan
        self.module_sharding_plan = type(real_plan)({  # type: ignore[call-arg]
            name: dataclasses.replace(ps, compute_kernel=FUSED) if ps.compute_kernel == CUSTOMIZED else ps
            for name, ps in real_plan.items()
        })
        try:
            super()._initialize_torch_state(skip_registering)
        finally:
            self.module_sharding_plan = real_plan


# ------------------------------------------------------------------------- planner

# Compute kernels TorchRec's enumerator offers only when asked (torchrec 1.8.0 keeps the set in
# ``planner.enumerators``, undocumented). Our constraints leave them off stock tables, as
# TorchRec's own defaults do; if renamed, planning with adaptive_constraints fails on import.
GUARDED_COMPUTE_KERNELS: Set[Any] = set(_GUARDED)


def torchrec_optimizer_bytes(shard_bytes: int, optimizer_class: Optional[type], shape: torch.Size) -> int:
    """The optimizer-state bytes TorchRec's storage estimator counts for one shard.

    ``planner.shard_estimators._calculate_optimizer_sizes`` (private) is how the estimator
    sizes an optimizer's state (one weight-sized state for classes it does not know); we
    subtract it and add what our kernel allocates. If it changes, our tables' storage
    estimates are off by TorchRec's guess (tests/distributed/test_planner_estimates.py).
    """
    return _calculate_optimizer_sizes([shard_bytes], optimizer_class, shape)[0]


# --------------------------------------------------------------- ShardedTensor (PyTorch)

def process_group_of(tensor: ShardedTensor) -> Optional[dist.ProcessGroup]:
    """The process group a ShardedTensor's shards live on (``_process_group``: ShardedTensor has
    no public getter). If renamed: MLET's gather needs an explicit ``group``."""
    return tensor._process_group


# ----------------------------------------------- autograd (PyTorch), outside this package's
# distributed/: kernels/batched.py queues its end-of-backward callback on
# ``torch.autograd.Variable._execution_engine.queue_callback`` (no public equivalent); kernels/
# must import without TorchRec, so that use stays there, with its canary in the compat tests.

__all__ = [
    "CUSTOMIZED",
    "FUSED",
    "GUARDED_COMPUTE_KERNELS",
    "GroupedLookupHooks",
    "LookupArgs",
    "SKIP_VERSION_CHECK_ENV",
    "SUPPORTED_TORCHREC",
    "ShardedEBCHooks",
    "ShardedTensor",
    "UnsupportedTorchRecVersion",
    "check_torchrec_version",
    "ddp_ignore",
    "in_backward_optimizers",
    "installed_torchrec_version",
    "lookup_args",
    "mark_updated_in_backward",
    "optimizer_class_of",
    "optimizer_kwargs_of",
    "present_optimizer_kwargs",
    "process_group_of",
    "sharded_lookups",
    "torchrec_optimizer_bytes",
]
