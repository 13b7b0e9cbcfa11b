"""Plain dense PyTorch references of METHODS.md's rules, written from the formulas.

Deliberately independent of torchrec_adaptive.rules: full-table tensors, a
boolean "touched" mask, no gather/scatter, no chains. A row is touched when it
occurs in the batch (FBGEMM's and SparseAdam's semantics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    decay: str = "linear"
    weight_decay: float = 0.0
    fal_tau: float | None = None
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

    def step(self, grad: Tensor, occ: Tensor, k: int, epoch: int = 1) -> None:
        touched = occ > 0
        t2 = touched.unsqueeze(1)
        skipped = (k - self.s - 1).double()
        if self.half_life > 0:
            c_new = occ + 2.0 ** (-(k - self.s).double() / self.half_life).float() * self.c
        else:
            c_new = self.c + occ
        self.c = torch.where(touched, c_new, self.c)
        lr = torch.full((self.weight.shape[0],), self.lr)
        if self.fal_tau is not None:
            mult = torch.clamp(torch.clamp(self.c / self.fal_tau, max=1.0), min=self.fal_min) ** self.fal_power
            mult = 1 - (1 - mult) * self.fal_epoch_decay ** (epoch - 1)
            lr = lr * mult
        w = self.weight
        if self.alpha > 0:
            if self.decay == "linear":
                keep = 1 - torch.clamp(self.alpha * skipped, max=1.0)
            else:
                keep = (1 - self.alpha) ** skipped
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




def relative(a: Tensor, b: Tensor) -> float:
    """Max |a - b| / max(1, |a|): float32 accumulators of size ~50 carry ~1e-5 absolute rounding."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).abs() / a.abs().clamp(min=1.0)).max()) if a.numel() else 0.0
