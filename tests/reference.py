"""Plain dense PyTorch references of METHODS.md's rules, written from the formulas.

Deliberately independent of torchrec_adaptive.rules: full-table tensors, a
boolean "touched" mask, no gather/scatter, no chains. A row is touched when it
occurs in the batch (FBGEMM's and SparseAdam's semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .batches import Batch


def dense_forward(tables: list[Tensor], batch: Batch, feature_table_map: list[int], pooling: str) -> Tensor:
    """Pooled output [B, sum dims] with plain F.embedding_bag per feature (autograd gives dense grads)."""
    outs = []
    for f, (idx, off, w) in enumerate(batch.feature_slices(len(feature_table_map))):
        outs.append(
            F.embedding_bag(idx.long(), tables[feature_table_map[f]], off.long(), mode=pooling,
                            per_sample_weights=w, include_last_offset=True)
        )
    return torch.cat(outs, dim=1)


def occurrences(batch: Batch, feature_table_map: list[int], table_rows: list[int]) -> list[Tensor]:
    occ = [torch.zeros(n) for n in table_rows]
    for f, (idx, _, _) in enumerate(batch.feature_slices(len(feature_table_map))):
        occ[feature_table_map[f]] += torch.bincount(idx.long(), minlength=table_rows[feature_table_map[f]]).float()
    return occ


@dataclass
class DenseRule:
    """AdamAR / Adam / FAL on one dense table, exactly as METHODS.md states them."""

    weight: Tensor
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.0
    decay: str = "linear"  # "linear" | "exponential" | "fbgemm" (rowwise_rmsprop_ar's shrink)
    min_shrinkage: float = 0.0
    weight_decay: float = 0.0
    lr_multiplier: float = 1.0  # the table's kappa_t
    fal_tau: float | None = None
    fal_tau_is_ratio: bool = False
    fal_tau_refresh_steps: int = 100
    fal_power: float = 1.0
    fal_min: float = 0.0
    fal_epoch_decay: float = 1.0
    half_life: float = 0.0
    m: Tensor = field(init=False)
    v: Tensor = field(init=False)
    s: Tensor = field(init=False)
    c: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.m = torch.zeros_like(self.weight)
        self.v = torch.zeros_like(self.weight)
        self.s = torch.zeros(self.weight.shape[0], dtype=torch.int64)
        self.c = torch.zeros(self.weight.shape[0])
        self.tau = self.fal_tau
        self._epoch = 0

    def _refresh_tau(self, k: int, epoch: int) -> None:
        """A ratio tau is the fal_tau-quantile (numpy's linear interpolation) of the table's
        nonzero counts before this step, re-estimated at every new epoch and every
        fal_tau_refresh_steps steps from step 1 (1.0 while no row was seen)."""
        if epoch != self._epoch or (k - 1) % self.fal_tau_refresh_steps == 0:
            seen = self.c[self.c > 0].double().numpy()
            self.tau = float(np.quantile(seen, self.fal_tau)) if seen.size else 1.0
        self._epoch = epoch

    def step(self, grad: Tensor, occ: Tensor, k: int, epoch: int = 1) -> None:
        touched = occ > 0
        t2 = touched.unsqueeze(1)
        skipped = (k - self.s - 1).double()
        if self.fal_tau_is_ratio:
            self._refresh_tau(k, epoch)
        if self.half_life > 0:
            c_new = occ + 2.0 ** (-(k - self.s).double() / self.half_life).float() * self.c
        else:
            c_new = self.c + occ
        self.c = torch.where(touched, c_new, self.c)
        lr = torch.full((self.weight.shape[0],), self.lr * self.lr_multiplier)
        if self.fal_tau is not None:
            mult = torch.clamp(torch.clamp(self.c / self.tau, max=1.0), min=self.fal_min) ** self.fal_power
            mult = 1 - (1 - mult) * self.fal_epoch_decay ** (epoch - 1)
            lr = lr * mult
        w = self.weight
        if self.alpha > 0:
            if self.decay == "linear":
                keep = 1 - torch.clamp(self.alpha * skipped, max=1.0)
            elif self.decay == "exponential":
                keep = (1 - self.alpha) ** skipped
            else:  # FBGEMM's rowwise_rmsprop_ar: the optimizer's own lr, Delta = k - s_r (1 on first touch)
                delta = torch.where(self.s == 0, torch.ones_like(skipped), skipped + 1)
                keep = torch.clamp(1 - torch.clamp(self.lr * self.alpha * delta, 0.0, 1.0), min=self.min_shrinkage)
            w = torch.where(t2, w * keep.float().unsqueeze(1), w)
        w = torch.where(t2, w * (1 - lr.unsqueeze(1) * self.weight_decay), w)
        b1, b2 = self.betas
        self.m = torch.where(t2, b1 * self.m + (1 - b1) * grad, self.m)
        self.v = torch.where(t2, b2 * self.v + (1 - b2) * grad * grad, self.v)
        m_hat = self.m / (1 - b1**k)
        v_hat = self.v / (1 - b2**k)
        w = torch.where(t2, w - lr.unsqueeze(1) * m_hat / (v_hat.sqrt() + self.eps), w)
        self.weight = w
        self.s = torch.where(touched, torch.full_like(self.s, k), self.s)


def rowwise_adagrad_dense(weight: Tensor, acc: Tensor, grad: Tensor, occ: Tensor, lr: float, eps: float,
                          weight_decay: float = 0.0, mode: str = "l2") -> tuple[Tensor, Tensor]:
    """METHODS.md row-wise Adagrad with weight decay (which FBGEMM's CPU path drops)."""
    touched = (occ > 0).unsqueeze(1)
    w = weight
    if mode == "l2":
        grad = grad + weight_decay * w
    else:
        w = w * (1 - lr * weight_decay)
    acc_new = acc + (grad * grad).mean(dim=1)
    w_new = w - lr * grad / (acc_new.sqrt() + eps).unsqueeze(1)
    return torch.where(touched, w_new, weight), torch.where(touched.squeeze(1), acc_new, acc)


def almost(a: Tensor, b: Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def relative(a: Tensor, b: Tensor, floor: float) -> float:
    """Max |a - b| / (|a| + floor), the reference ``a``'s relative error. ``floor`` is the
    size below which a value counts as zero: pick it far below the values compared (a
    floor near their size would let a 100 % error on small values pass)."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).abs() / (a.abs() + floor)).max()) if a.numel() else 0.0
