"""The optimizer classes users name: ``RowWiseAdagrad``, ``Adam``, ``AdamAR``, ``RowWiseRMSpropAR``.

They play two roles:

* the *name* a TorchRec user passes to ``apply_optimizer_in_backward``; the
  sharder turns class + kwargs into a :class:`RuleConfig` for the fused kernel;
* a real ``torch.optim.Optimizer`` for unsharded parameters (an unsharded
  ``EmbeddingBagCollection``, a plain ``nn.EmbeddingBag``), running the very same
  chain on the rows of the step's lookups, with the same occurrence counts as the
  fused kernel (duplicates counted), so an unsharded model trains exactly as the
  sharded one. A sparse gradient (``nn.EmbeddingBag(sparse=True)``) carries the
  lookups itself; a dense one does not, so the lookups of the ``nn.EmbeddingBag``
  holding the table are recorded by :mod:`~torchrec_adaptive.rules.occurrences`
  (nothing for the user to do). A table updated from a dense gradient with no
  ``nn.EmbeddingBag`` lookup seen falls back to "rows with a nonzero gradient, one
  occurrence each", with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor

from . import occurrences
from .apply import RowUpdate, allocate_row_state, update_rows
from .base import RowChain
from .configs import AdamARConfig, AdamConfig, RowWiseAdagradConfig, RowWiseRMSpropARConfig, RuleConfig
from .slot_names import COUNT, with_current_names
from .transforms import scale_by_row_frequency


def _touched_rows(grad: Tensor, looked_up: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    """rows, coalesced grad rows and occurrences of one step.

    A sparse gradient lists every lookup. A dense one is read at the rows the step
    looked up (``looked_up``: rows and counts recorded by :mod:`.occurrences`), so a
    row is touched and counted exactly as in the fused kernel; without them, a row
    is touched when its gradient row is nonzero and counts once.
    """
    if grad.is_sparse:
        idx = grad._indices()[0]
        rows, inverse, counts = torch.unique(idx, sorted=True, return_inverse=True, return_counts=True)
        g = torch.zeros(rows.numel(), grad.shape[1], dtype=grad.dtype, device=grad.device)
        g.index_add_(0, inverse, grad._values())
        return rows, g, counts.to(torch.float32)
    nonzero = grad.ne(0).any(dim=1)
    if looked_up is None:
        rows = nonzero.nonzero().squeeze(1)
        return rows, grad.index_select(0, rows), torch.ones(rows.numel(), device=grad.device)
    rows, counts = looked_up
    nonzero[rows] = False
    if bool(nonzero.any()):
        raise ValueError(
            f"the gradient of a table of shape {tuple(grad.shape)} reaches rows no lookup of this step touched "
            f"(e.g. row {int(nonzero.nonzero()[0])}): the table is also used outside its nn.EmbeddingBag, "
            "which a lazy row-wise optimizer cannot honour; the update was refused"
        )
    return rows, grad.index_select(0, rows), counts.to(torch.float32)


class AdaptiveRowOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running a row chain on 2-D parameters (one table each)."""

    config_type: ClassVar[type[RuleConfig]] = RuleConfig

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> None:
        from ..kernels.inputs import KernelOptions  # kernels import rules: not at module level

        # bounds_check / nonfinite are the kernel's per-table options (the sharder reads them
        # from these kwargs); unsharded, nonfinite="skip" skips the table's update with a warning.
        self.kernel_options, kwargs = KernelOptions.split(kwargs)
        self.config = self.rule_config(**kwargs)
        defaults = self.config.to_kwargs()
        defaults["epoch"] = 1
        super().__init__(params, defaults)
        self._chains: dict[int, RowChain] = {}
        self._warned_dense = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dim() == 2 and p.device.type != "meta":  # a meta table is sharded, never stepped here
                occurrences.track(p)  # exact counts from a dense gradient (see the module docstring)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                occurrences.discard(p)

    @classmethod
    def rule_config(cls, **kwargs: Any) -> RuleConfig:
        """Validated config for these kwargs; what the fused kernel of a shard runs."""
        return cls.config_type.from_kwargs(**kwargs)

    def set_epoch(self, epoch: int) -> None:
        for group in self.param_groups:
            group["epoch"] = int(epoch)

    def _chain_for(self, p: Tensor) -> RowChain:
        if id(p) not in self._chains:
            self._chains[id(p)] = self.config.build()
        return self._chains[id(p)]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            for p in group["params"]:
                looked_up = occurrences.take(p)  # taken first: a refused step's lookups are dropped with it
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"{type(self).__name__} updates embedding tables (2-D), got shape {tuple(p.shape)}")
                grad = p.grad
                if not torch.isfinite(grad._values() if grad.is_sparse else grad).all():
                    if self.kernel_options.nonfinite == "skip":
                        warnings.warn(f"{type(self).__name__}: non-finite gradient for a table of shape "
                                      f"{tuple(p.shape)}; its update was skipped", RuntimeWarning, stacklevel=2)
                        continue
                    raise FloatingPointError(
                        f"{type(self).__name__}: non-finite gradient for a table of shape {tuple(p.shape)}; "
                        "the update was refused and weights/state are unchanged"
                    )
                chain = self._chain_for(p)
                state = self.state[p]
                if not state:
                    state.update(allocate_row_state(chain.slots(), p.shape[0], p.shape[1], p.device))
                self._refresh_frequency_threshold(chain, state, group["step"])
                if looked_up is None and not grad.is_sparse:
                    self._warn_dense_counts(p)
                rows, g, occ = _touched_rows(grad, looked_up)
                lr = torch.full((rows.numel(), 1), group["lr"] * group["lr_multiplier"], device=p.device)
                update_rows(chain, p.data, state, RowUpdate(rows, g, occ, lr, base_lr=group["lr"]), group["step"], group["epoch"])
        return loss

    def _warn_dense_counts(self, p: Tensor) -> None:
        if not self._warned_dense:
            self._warned_dense = True
            warnings.warn(
                f"{type(self).__name__}: a table of shape {tuple(p.shape)} got a dense gradient and no nn.EmbeddingBag "
                "lookup of it was seen, so each row with a nonzero gradient counts one occurrence (the fused kernel "
                "counts every lookup, duplicates included); look it up through nn.EmbeddingBag or use sparse=True",
                RuntimeWarning, stacklevel=3,
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, except that the row slots keep their own dtypes: torch casts every
        state tensor to the parameter's dtype, which would turn s_r (int64) and c_r
        (float64) into float32, exact only to 2^24. Float32 counts of older state load,
        and so do slots saved under their previous names (``slot_names.PREVIOUS_NAMES``)."""
        saved = {index: with_current_names(slots) if isinstance(slots, dict) else slots
                 for index, slots in state_dict.get("state", {}).items()}
        state_dict = {**state_dict, "state": saved}
        super().load_state_dict(state_dict)
        dtypes = {s.name: s.dtype for s in self.config.build().slots() if s.dtype != torch.float32}
        params = [p for g in self.param_groups for p in g["params"]]
        for index, slots in saved.items():
            p = params[index]
            for name, dtype in dtypes.items():
                value = slots.get(name)
                if isinstance(value, Tensor):
                    self.state[p][name] = value.to(device=p.device, dtype=dtype)

    def _refresh_frequency_threshold(self, chain: RowChain, state: dict[str, Tensor], step: int) -> None:
        fal = self.config.fal
        if fal is None or not fal.tau_is_ratio or (step - 1) % fal.tau_refresh_steps:
            return
        for t in chain.transforms:
            if isinstance(t, scale_by_row_frequency):
                t.tau_by_table = count_quantile(state[COUNT], fal.tau).reshape(1)


def count_quantile(counts: Tensor, q: float) -> Tensor:
    """The q-quantile of the nonzero counts (1.0 when no row was seen yet), interpolated
    linearly as ``torch.quantile`` does. Without a host sync (FAL re-estimates it inside a
    GPU step): the counts are sorted, the nonzero ones are the last ``seen`` of them, and
    the quantile's position among them is computed on the device (no boolean mask, whose
    size is data, and no size limit, unlike ``torch.quantile``)."""
    ordered = torch.sort(counts.reshape(-1).float()).values
    if ordered.numel() == 0:
        return torch.ones((), dtype=counts.dtype, device=counts.device)
    seen = (ordered > 0).sum()
    rank = (seen - 1).clamp(min=0).float() * q  # as torch.quantile: q * (n - 1), in float32
    below = rank.long()
    first = ordered.numel() - seen
    lo = ordered.gather(0, (first + below).clamp(max=ordered.numel() - 1).reshape(1))
    hi = ordered.gather(0, (first + torch.minimum(below + 1, (seen - 1).clamp(min=0))).clamp(
        max=ordered.numel() - 1).reshape(1))
    value = torch.lerp(lo, hi, (rank - below).reshape(1)).reshape(())
    return torch.where(seen > 0, value, 1.0).to(counts.dtype)


class RowWiseAdagrad(AdaptiveRowOptimizer):
    """Row-wise Adagrad, FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (kwargs of :class:`RowWiseAdagradConfig`)."""

    config_type = RowWiseAdagradConfig


class Adam(AdaptiveRowOptimizer):
    """Lazy Adam with global-step bias correction (kwargs of :class:`AdamConfig`)."""

    config_type = AdamConfig


class AdamAR(AdaptiveRowOptimizer):
    """AdamAR: Adam moments + adaptive decay by idle time (kwargs of :class:`AdamARConfig`)."""

    config_type = AdamARConfig


class RowWiseRMSpropAR(AdaptiveRowOptimizer):
    """FBGEMM's ROWWISE_RMSPROP_AR: row-wise RMSprop + its adaptive decay (kwargs of :class:`RowWiseRMSpropARConfig`)."""

    config_type = RowWiseRMSpropARConfig


ADAPTIVE_OPTIMIZERS: tuple[type[AdaptiveRowOptimizer], ...] = (RowWiseAdagrad, Adam, AdamAR, RowWiseRMSpropAR)


def is_adaptive_optimizer(cls: Any) -> bool:
    """True for our optimizer classes (what the sharder routes to our kernel)."""
    return isinstance(cls, type) and issubclass(cls, AdaptiveRowOptimizer)


def config_from_optimizer(cls: type, kwargs: dict[str, Any]) -> RuleConfig:
    """The kernel config for ``apply_optimizer_in_backward(cls, ..., kwargs)``."""
    if not is_adaptive_optimizer(cls):
        raise TypeError(f"{cls!r} is not a torchrec_adaptive optimizer; use one of {[c.__name__ for c in ADAPTIVE_OPTIMIZERS]}")
    from ..kernels.inputs import KernelOptions

    _, rule_kwargs = KernelOptions.split(dict(kwargs))  # the kernel options are validated, not the rule's
    return cls.rule_config(**rule_kwargs)  # type: ignore[attr-defined]
