"""Typed, self-validating configs of the named rules, and the chains they build.

A config is what travels from ``apply_optimizer_in_backward(Cls, params, kwargs)``
to the fused kernel of every shard: frozen, hashable (TorchRec groups tables by
their fused params) and validated once at construction, so a bad hyperparameter
fails where the user wrote it, not deep in a backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .base import RowChain, RowTransform
from .transforms import (
    add_adaptive_row_decay,
    add_decoupled_row_decay,
    add_l2_to_row_grad,
    admit_by_count,
    apply_row_update,
    scale_by_row_adam,
    scale_by_row_frequency,
    scale_by_rowwise_adagrad,
    scale_by_rowwise_rmsprop,
    track_row_history,
)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_FLAT_NAME = {v: k for k, v in {"fal_tau": "tau", "fal_power": "power", "fal_min": "min_multiplier",
                                "fal_epoch_decay": "epoch_decay", "fal_tau_refresh_steps": "tau_refresh_steps",
                                "fal_tau_is_ratio": "tau_is_ratio"}.items()}


def _require_types(config: Any, flat_names: dict[str, str] | None = None) -> None:
    """Numbers must be numbers (``lr="1e-3"`` from a YAML file is a str): a TypeError
    naming the argument, instead of one from deep inside a comparison."""
    for f in fields(config):
        value = getattr(config, f.name)
        name = (flat_names or {}).get(f.name, f.name)
        if f.type in ("float", "int") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if f.type == "bool" and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        if f.type == "str" and not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class FALConfig:
    """Frequency-adaptive learning rate, METHODS.md "FAL"; off unless given."""

    tau: float = 10.0
    tau_is_ratio: bool = False
    power: float = 1.0
    min_multiplier: float = 0.0
    epoch_decay: float = 1.0
    # How often (in steps) a ratio tau is re-estimated from the table's counts;
    # a quantile needs the whole table, so it is not recomputed every step.
    tau_refresh_steps: int = 100

    def __post_init__(self) -> None:
        _require_types(self, _FLAT_NAME)
        _require(self.tau_refresh_steps >= 1, f"fal_tau_refresh_steps must be >= 1, got {self.tau_refresh_steps}")
        self.build()  # validates the numbers with the transform's own checks

    def build(self) -> scale_by_row_frequency:
        return scale_by_row_frequency(
            tau=self.tau,
            tau_is_ratio=self.tau_is_ratio,
            power=self.power,
            min_multiplier=self.min_multiplier,
            epoch_decay=self.epoch_decay,
        )


_FAL_KWARGS = {
    "fal_tau": "tau",
    "fal_tau_is_ratio": "tau_is_ratio",
    "fal_power": "power",
    "fal_min": "min_multiplier",
    "fal_epoch_decay": "epoch_decay",
    "fal_tau_refresh_steps": "tau_refresh_steps",
}


@dataclass(frozen=True)
class RuleConfig:
    """What every rule shares: the learning rate, the per-table multiplier
    (the "sparse optimizer" kappa_t of seeds/pinterest_*), count bookkeeping and FAL."""

    name: ClassVar[str] = "rule"
    lr: float = 1e-3
    lr_multiplier: float = 1.0
    count_half_life: float = 0.0
    fal: FALConfig | None = None
    # frequency admission: a row's weights change only once c_r >= admit_min_count (0: off)
    admit_min_count: float = 0.0

    def __post_init__(self) -> None:
        _require_types(self)
        _require(self.lr >= 0 and math.isfinite(self.lr), f"lr must be >= 0 and finite, got {self.lr}")
        _require(self.lr_multiplier > 0 and math.isfinite(self.lr_multiplier),
                 f"lr_multiplier must be > 0, got {self.lr_multiplier}")
        admit_by_count(self.admit_min_count)  # validates it, also when 0 leaves it out of the chain
        self.build()  # every transform validates its own hyperparameters

    def base_transforms(self) -> list[RowTransform]:
        raise NotImplementedError

    def build(self) -> RowChain:
        """History first (decays need I_r before s_r moves), admission and FAL next (they set lr_r,
        which decays may use)."""
        chain: list[RowTransform] = [track_row_history(half_life=self.count_half_life)]
        if self.admit_min_count > 0:
            chain.append(admit_by_count(self.admit_min_count))
        if self.fal is not None:
            chain.append(self.fal.build())
        chain += self.base_transforms()
        chain.append(apply_row_update())
        return RowChain(chain)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RuleConfig:
        """Build from the flat kwargs users pass to ``apply_optimizer_in_backward``."""
        fal_kwargs = {_FAL_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in _FAL_KWARGS}
        known = {f.name for f in fields(cls)} - {"fal"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"{cls.name}: unknown argument(s) {unknown}; accepted: {sorted(known | set(_FAL_KWARGS))}"
            )
        if "betas" in kwargs:
            if any(isinstance(b, bool) or not isinstance(b, (int, float)) for b in kwargs["betas"]):
                raise TypeError(f"betas must be two numbers, got {kwargs['betas']!r}")
            betas = tuple(float(b) for b in kwargs["betas"])
            _require(len(betas) == 2, f"betas must be a pair, got {kwargs['betas']!r}")
            kwargs["betas"] = betas
        fal = FALConfig(**fal_kwargs) if fal_kwargs else None
        return cls(fal=fal, **kwargs)

    def to_kwargs(self) -> dict[str, Any]:
        """Inverse of :meth:`from_kwargs` (flat, what TorchRec keeps in fused params)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fal"}
        if self.fal is not None:
            for flat, attr in _FAL_KWARGS.items():
                out[flat] = getattr(self.fal, attr)
        return out


@dataclass(frozen=True)
class RowWiseAdagradConfig(RuleConfig):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD, plus weight decay that also works on CPU
    (FBGEMM's CPU fast path silently drops it, METHODS.md)."""

    name: ClassVar[str] = "RowWiseAdagrad"
    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    weight_decay_mode: str = "l2"  # "l2" (coupled, FBGEMM's L2) | "decoupled"

    def base_transforms(self) -> list[RowTransform]:
        _require(self.weight_decay_mode in ("l2", "decoupled"),
                 f"weight_decay_mode must be 'l2' or 'decoupled', got {self.weight_decay_mode!r}")
        if self.weight_decay_mode == "l2":
            decay: RowTransform = add_l2_to_row_grad(self.weight_decay)
        else:
            decay = add_decoupled_row_decay(self.weight_decay)
        return [decay, scale_by_rowwise_adagrad(eps=self.eps)]


@dataclass(frozen=True)
class AdamConfig(RuleConfig):
    """Lazy Adam (only touched rows change), AdamW-style decoupled weight decay."""

    name: ClassVar[str] = "Adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def base_transforms(self) -> list[RowTransform]:
        return [
            add_decoupled_row_decay(self.weight_decay),
            scale_by_row_adam(beta1=self.betas[0], beta2=self.betas[1], eps=self.eps),
        ]


@dataclass(frozen=True)
class AdamARConfig(AdamConfig):
    """AdamAR (seeds/adamar_*): Adam moments + decay by the row's idle time.

    ``interval="seed"`` uses the seed's lambda_r = min(1, alpha I_r) (``decay="linear"``)
    or (1 - alpha)^I_r (``decay="exponential"``); ``interval="fbgemm"`` uses
    FBGEMM's ``rowwise_rmsprop_ar`` shrink with ``min_shrinkage``.
    """

    name: ClassVar[str] = "AdamAR"
    alpha: float = 1e-3
    decay: str = "linear"
    interval: str = "seed"
    min_shrinkage: float = 0.0

    def base_transforms(self) -> list[RowTransform]:
        _require(self.interval in ("seed", "fbgemm"), f"interval must be 'seed' or 'fbgemm', got {self.interval!r}")
        mode = "fbgemm" if self.interval == "fbgemm" else self.decay
        _require(self.decay in ("linear", "exponential"),
                 f"decay must be 'linear' or 'exponential', got {self.decay!r}")
        return [
            add_adaptive_row_decay(alpha=self.alpha, mode=mode, min_shrinkage=self.min_shrinkage),
            *super().base_transforms(),
        ]



@dataclass(frozen=True)
class RowWiseRMSpropARConfig(RuleConfig):
    """FBGEMM's ``ROWWISE_RMSPROP_AR`` (the AdamAR paper's Algorithm 2 as FBGEMM fused it),
    with FBGEMM's argument names and defaults:

    v_r <- ema_beta v_r + (1 - ema_beta) mean_j g_rj^2; I_r = k - s_r (1 on a row's first touch);
    theta_r <- max(min_shrinkage, 1 - min(1, lr ar_alpha I_r)) theta_r - lr g_r / (sqrt(v_r) + eps).

    ``ar_alpha=0`` (FBGEMM's default) is plain row-wise RMSprop. Tested against FBGEMM's
    compiled op (tests/rules/test_rmsprop_ar.py); METHODS.md's AdamAR stays our default rule.
    """

    name: ClassVar[str] = "RowWiseRMSpropAR"
    lr: float = 0.01
    eps: float = 1e-8
    ar_alpha: float = 0.0
    ema_beta: float = 0.99
    min_shrinkage: float = 0.1

    def base_transforms(self) -> list[RowTransform]:
        return [
            add_adaptive_row_decay(alpha=self.ar_alpha, mode="fbgemm", min_shrinkage=self.min_shrinkage),
            scale_by_rowwise_rmsprop(ema_beta=self.ema_beta, eps=self.eps),
        ]
