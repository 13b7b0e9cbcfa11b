"""The per-row transforms that update rules are chained from.

Naming follows optax: ``scale_by_*`` turns the gradient into a direction,
``add_*`` changes the weights or the gradient, ``track_*`` keeps bookkeeping
state. Every formula is the one of ``shared/METHODS.md``; each transform is small
so that a rule reads as its chain (AdamAR = history + adaptive decay + Adam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import RowBatch, StateSlot
from .slot_names import ACCUMULATOR, COUNT, FIRST_MOMENT, LAST_STEP, SECOND_MOMENT


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class _Validated:
    """Validates the hyperparameters at construction (and, through ``RowChain``, on change)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        pass


class _RowDecay(_Validated):
    """A stateless transform that multiplies each touched row by ``row_keep(batch)``.

    Exposing the factor (not just applying it) lets the fused CPU loops fold every
    decay of a chain into one multiplier per row.
    """

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def row_keep(self, batch: RowBatch) -> Tensor | None:
        raise NotImplementedError

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = self.row_keep(batch)
        if keep is not None:
            batch.weight.mul_(keep.unsqueeze(1))
        return {}


def _check_weight_decay(wd: float) -> None:
    _check(wd >= 0 and math.isfinite(wd), f"weight_decay must be >= 0, got {wd}")


@dataclass
class track_row_history(_Validated):  # noqa: N801 - optax-style factory name
    """Keeps s_r (last step the row was touched) and c_r (its occurrence count).

    Publishes ``skipped`` = I_r = k - s_r - 1 (computed *before* s_r is moved to
    k, which is what the decays need) and ``count`` = c_r after this batch, with
    duplicates counted. With a half-life h, c_r <- occ + 2^(-(k - s_r)/h) c_r, as
    FBGEMM's counter-based regularization decays its counter.
    """

    half_life: float = 0.0  # 0: no decay of counts

    def validate(self) -> None:
        _check(self.half_life >= 0 and math.isfinite(self.half_life),
               f"count_half_life must be >= 0 and finite, got {self.half_life}")

    def slots(self) -> tuple[StateSlot, ...]:
        # c_r in float64: exact for integer counts up to 2^53 (float32 stops at 2^24,
        # which a hot row of a long job passes); a half-life makes it fractional.
        return (StateSlot(LAST_STEP, torch.int64), StateSlot(COUNT, torch.float64))

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        last = state[LAST_STEP]
        count = state[COUNT]
        gap = batch.step - last  # k - s_r
        batch.extras["skipped"] = gap - 1
        if self.half_life > 0:
            count = batch.occurrences + torch.exp2(-gap.to(count.dtype) / self.half_life) * count
        else:
            count = count + batch.occurrences
        batch.extras["count"] = count
        return {LAST_STEP: torch.full_like(last, batch.step), COUNT: count}


ADMITTED = "admitted"


@dataclass
class admit_by_count(_Validated):  # noqa: N801
    """Frequency admission (DeepRec's CounterFilter, dynamicemb's FrequencyAdmissionStrategy):
    a row's weights are not updated until it has been seen ``min_count`` times.

    Runs after :class:`track_row_history` and reads its ``count`` (c_r after this batch, so
    the ``min_count``-th occurrence is the first one that updates). For rows not yet admitted
    it sets the learning rate to 0 and publishes ``admitted``, which the row decays honour
    (their factor is 1 there), so *every* change of the weights waits: the update, AdamAR's
    and FBGEMM's idle-time decay, decoupled weight decay. The row's history and optimizer
    state (moments, Adagrad sum) keep accumulating, so the first admitted step is a normal one
    of the base rule. No state of its own: c_r is already a checkpointed slot. With a
    ``count_half_life`` a row whose decayed count falls below ``min_count`` stops updating
    again. Not done: reading unadmitted rows as zeros (the forward lookup belongs to every
    backend's kernel); they read their initial values.
    """

    min_count: float = 0.0  # 0 (or 1): every row admitted on its first occurrence

    def validate(self) -> None:
        _check(self.min_count >= 0 and math.isfinite(self.min_count),
               f"admit_min_count must be >= 0 and finite, got {self.min_count}")

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.min_count > 0:
            admitted = batch.extras["count"] >= self.min_count
            batch.extras[ADMITTED] = admitted
            batch.lr = batch.lr * admitted.unsqueeze(1).to(batch.lr.dtype)
        return {}


def only_admitted(batch: RowBatch, keep: Tensor | None) -> Tensor | None:
    """A decay factor with 1 for the rows :class:`admit_by_count` has not admitted yet."""
    admitted = batch.extras.get(ADMITTED)
    if keep is None or admitted is None:
        return keep
    return torch.where(admitted, keep, torch.ones_like(keep))


@dataclass
class add_adaptive_row_decay(_RowDecay):  # noqa: N801
    """AdamAR's decay of a row by how long it went untouched (seeds/adamar_*).

    ``linear`` (the seed's rule): theta_r <- (1 - min(1, alpha I_r)) theta_r.
    ``exponential``: theta_r <- (1 - alpha)^I_r theta_r, the exact lazy form of
    decaying by (1 - alpha) on every skipped step.
    ``fbgemm``: FBGEMM's ``rowwise_rmsprop_ar`` parametrization,
    shrink = max(min_shrinkage, 1 - clip(lr alpha (k - s_r), 0, 1)), with
    k - s_r = 1 on first touch, so users can match that kernel. ``lr`` there is the
    optimizer's learning rate (``RowBatch.base_lr``), not the row's lr after kappa
    and FAL: FBGEMM's kernel reads its one ``learning_rate_tensor``
    (``fbgemm_gpu/split_embedding_codegen_lookup_invokers/lookup_rowwise_rmsprop_ar.py``).
    """

    alpha: float = 1e-3
    mode: str = "linear"
    min_shrinkage: float = 0.0

    def validate(self) -> None:
        if self.mode == "fbgemm":  # lambda = lr * alpha * I: alpha is scaled by lr, any size is meaningful
            _check(self.alpha >= 0.0 and math.isfinite(self.alpha), f"alpha must be >= 0 and finite, got {self.alpha}")
        else:
            _check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        _check(self.mode in ("linear", "exponential", "fbgemm"),
               f"decay must be 'linear' or 'exponential' (interval='fbgemm' for FBGEMM's form), got {self.mode!r}")
        _check(0.0 <= self.min_shrinkage <= 1.0, f"min_shrinkage must be in [0, 1], got {self.min_shrinkage}")

    def row_keep(self, batch: RowBatch) -> Tensor | None:
        """The factor [U] each touched row's weight is multiplied by (None: 1)."""
        return only_admitted(batch, self._keep(batch))

    def _keep(self, batch: RowBatch) -> Tensor | None:
        if self.alpha == 0.0:
            return None
        skipped = batch.extras["skipped"].to(batch.lr.dtype)
        if self.mode == "linear":
            return 1.0 - torch.clamp(self.alpha * skipped, max=1.0)
        if self.mode == "exponential":
            return torch.pow(1.0 - self.alpha, skipped)
        first = batch.extras["skipped"] == batch.step - 1  # s_r == 0: never touched
        delta = torch.where(first, torch.ones_like(skipped), skipped + 1.0)
        if batch.base_lr is None:
            raise ValueError("interval='fbgemm' needs the optimizer's learning rate (RowBatch.base_lr)")
        shrink = 1.0 - torch.clamp(batch.base_lr * self.alpha * delta, 0.0, 1.0)
        return torch.clamp(shrink, min=self.min_shrinkage)


@dataclass
class add_decoupled_row_decay(_RowDecay):  # noqa: N801
    """AdamW-style decoupled weight decay on touched rows: theta <- theta - lr wd theta."""

    weight_decay: float = 0.0

    def validate(self) -> None:
        _check_weight_decay(self.weight_decay)

    def row_keep(self, batch: RowBatch) -> Tensor | None:
        """The factor [U] each touched row's weight is multiplied by (None: 1); exactly 1
        where the lr is 0 (rows not admitted yet)."""
        if self.weight_decay == 0.0:
            return None
        return 1.0 - batch.lr.squeeze(1) * self.weight_decay


@dataclass
class add_l2_to_row_grad(_Validated):  # noqa: N801
    """Coupled L2 regularization: g <- g + wd theta (FBGEMM's ``WeightDecayMode.L2``)."""

    weight_decay: float = 0.0

    def validate(self) -> None:
        _check_weight_decay(self.weight_decay)

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.weight_decay != 0.0:
            batch.grad = batch.grad.add(batch.weight, alpha=self.weight_decay)
        return {}


@dataclass
class scale_by_rowwise_adagrad(_Validated):  # noqa: N801
    """FBGEMM's EXACT_ROWWISE_ADAGRAD: G_r += mean_j g_rj^2; direction = g / (sqrt(G_r) + eps).

    The accumulation is ``G_r <- decay G_r + scale mean_j g_rj^2`` with (decay, scale) from
    :meth:`accumulation`, (1, 1) here (exact: multiplying by 1 rounds nothing), so row-wise
    RMSprop is this transform with other coefficients, and the fused CPU loop reads them too.
    """

    eps: float = 1e-8

    def validate(self) -> None:
        _check(self.eps > 0 and math.isfinite(self.eps), f"eps must be > 0, got {self.eps}")

    def slots(self) -> tuple[StateSlot, ...]:
        return (StateSlot(ACCUMULATOR, torch.float32),)

    def accumulation(self) -> tuple[float, float]:
        """(decay of the old accumulator, scale of this step's mean squared gradient)."""
        return 1.0, 1.0

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        g = batch.grad
        decay, scale = self.accumulation()
        acc = state[ACCUMULATOR] * decay + g.square().mean(dim=1) * scale
        batch.grad = g / (acc.sqrt() + self.eps).unsqueeze(1)
        return {ACCUMULATOR: acc}


@dataclass
class scale_by_rowwise_rmsprop(scale_by_rowwise_adagrad):  # noqa: N801
    """FBGEMM's row-wise RMSprop (the base of its ``ROWWISE_RMSPROP_AR``):
    v_r <- beta v_r + (1 - beta) mean_j g_rj^2; direction = g / (sqrt(v_r) + eps).

    No bias correction, as in FBGEMM: a fresh row's first step is 1/sqrt(1 - beta)
    times larger than Adagrad's. The slot is FBGEMM's ``momentum1``, where FBGEMM also keeps
    row-wise Adagrad's sum (``slot_names``).
    """

    ema_beta: float = 0.99

    def validate(self) -> None:
        super().validate()
        _check(0.0 <= self.ema_beta < 1.0, f"ema_beta must be in [0, 1), got {self.ema_beta}")

    def accumulation(self) -> tuple[float, float]:
        return self.ema_beta, 1.0 - self.ema_beta


@dataclass
class scale_by_row_adam(_Validated):  # noqa: N801
    """Lazy Adam on touched rows, bias-corrected with the *global* step k.

    m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    direction = (m / (1 - b1^k)) / (sqrt(v / (1 - b2^k)) + eps),
    i.e. ``torch.optim.Adam``'s and FBGEMM's fused ADAM's eps placement. PyTorch's
    SparseAdam adds eps before the bias correction of v; with eps=1e-8 the two
    agree to 1e-5 (shared/METHODS.md).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def validate(self) -> None:
        _check(0.0 <= self.beta1 < 1.0, f"betas[0] must be in [0, 1), got {self.beta1}")
        _check(0.0 <= self.beta2 < 1.0, f"betas[1] must be in [0, 1), got {self.beta2}")
        _check(self.eps > 0 and math.isfinite(self.eps), f"eps must be > 0, got {self.eps}")

    def slots(self) -> tuple[StateSlot, ...]:
        # TorchRec's keys for FBGEMM's ADAM state (``slot_names``): m is momentum1, v exp_avg_sq.
        return (StateSlot(FIRST_MOMENT, per_element=True), StateSlot(SECOND_MOMENT, per_element=True))

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        g = batch.grad
        m = state[FIRST_MOMENT].lerp_(g, 1.0 - self.beta1)
        v = state[SECOND_MOMENT].mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        bc1 = 1.0 - self.beta1 ** batch.step
        bc2_sqrt = math.sqrt(1.0 - self.beta2 ** batch.step)
        # (sqrt(v) / bc2_sqrt + eps) * bc1, then m / that: in place on one buffer,
        # since on CPU every fresh [U, D] tensor costs page faults.
        direction = torch.sqrt(v, out=batch.scratch("adam_direction", v)).mul_(bc1 / bc2_sqrt).add_(self.eps * bc1)
        batch.grad = torch.div(m, direction, out=direction)
        return {FIRST_MOMENT: m, SECOND_MOMENT: v}


@dataclass
class scale_by_row_frequency(_Validated):  # noqa: N801
    """FAL (seeds/pinterest_*): rare rows get a smaller learning rate.

    m_r = max(m_min, min(1, c_r / tau))^p, and in epoch e the gap decays:
    m_r(e) = 1 - (1 - m_r) delta^(e - 1). ``lr_r <- m_r(e) lr_r``. When
    ``tau_is_ratio``, tau is that quantile of the table's nonzero counts; the
    kernel refreshes it (see ``AdaptiveTBE.refresh_row_statistics``)
    into ``tau_by_table`` since a quantile needs the whole table, not the batch.
    """

    tau: float = 10.0
    tau_is_ratio: bool = False
    power: float = 1.0
    min_multiplier: float = 0.0
    epoch_decay: float = 1.0
    tau_by_table: Tensor | None = None  # [T] set by the kernel when tau_is_ratio

    def validate(self) -> None:
        if self.tau_is_ratio:
            _check(0.0 <= self.tau <= 1.0, f"fal_tau must be a quantile in [0, 1] when fal_tau_is_ratio, got {self.tau}")
        else:
            _check(self.tau > 0 and math.isfinite(self.tau), f"fal_tau must be > 0, got {self.tau}")
        _check(self.power >= 0 and math.isfinite(self.power), f"fal_power must be >= 0, got {self.power}")
        _check(0.0 <= self.min_multiplier <= 1.0, f"fal_min must be in [0, 1], got {self.min_multiplier}")
        _check(0.0 <= self.epoch_decay <= 1.0, f"fal_epoch_decay must be in [0, 1], got {self.epoch_decay}")

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def row_multiplier(self, count: Tensor, epoch: int, table: Tensor | None) -> Tensor:
        """m_r(e) for rows with counts ``count`` (exposed for diagnostics and tests)."""
        if self.tau_is_ratio:
            if self.tau_by_table is None:
                tau: Tensor | float = 1.0
            else:
                tau = self.tau_by_table[table] if table is not None else self.tau_by_table[0]
        else:
            tau = self.tau
        m = torch.clamp(count / tau, max=1.0).clamp_(min=self.min_multiplier).pow_(self.power)
        gap_keep = self.epoch_decay ** (max(epoch, 1) - 1)
        return 1.0 - (1.0 - m) * gap_keep

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        m = self.row_multiplier(batch.extras["count"], batch.epoch, batch.table)
        batch.lr = batch.lr * m.unsqueeze(1).to(batch.lr.dtype)
        return {}


@dataclass
class apply_row_update:  # noqa: N801
    """The last link of every chain: theta_r <- theta_r - lr_r direction_r."""

    def slots(self) -> tuple[StateSlot, ...]:
        return ()

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        batch.weight.addcmul_(batch.grad, batch.lr, value=-1.0)
        return {}
