"""The built-in synthetic click log: long-tail IDs and a hidden teacher, built so that
plain Adam overfits after epoch 1 (METHODS.md, "A synthetic data set that shows
one-epoch overfitting"). Deterministic by seed; no download.

Teacher: logit = bias + per-ID effects N(0, id_effect_std^2) + ``interactions`` rank-4
pairwise field interactions + a small linear effect of the dense features + per-row
noise N(0, noise_std^2); the bias is set for ``click_rate``. Labels ~ Bernoulli(sigmoid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dataset import ClickData


@dataclass(frozen=True)
class SyntheticConfig:
    num_fields: int = 20
    min_vocab: int = 100
    max_vocab: int = 50_000
    zipf: float = 1.1
    train_rows: int = 500_000
    test_rows: int = 100_000
    num_dense: int = 4
    id_effect_std: float = 0.5
    interactions: int = 5
    interaction_rank: int = 4
    noise_std: float = 0.5
    click_rate: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_fields < 2 or self.min_vocab < 2 or self.max_vocab < self.min_vocab:
            raise ValueError("synthetic data needs >= 2 fields and 2 <= min_vocab <= max_vocab")
        if not 0 < self.click_rate < 1:
            raise ValueError(f"click_rate must be in (0, 1), got {self.click_rate}")
        if self.train_rows < 1 or self.test_rows < 1 or self.num_dense < 1:
            raise ValueError("train_rows, test_rows and num_dense must be >= 1 (DLRM needs a dense feature)")

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Log-spaced from min_vocab to max_vocab."""
        lo, hi = math.log(self.min_vocab), math.log(self.max_vocab)
        return tuple(int(round(math.exp(lo + (hi - lo) * f / (self.num_fields - 1)))) for f in range(self.num_fields))


def make_synthetic(cfg: SyntheticConfig = SyntheticConfig()) -> tuple[ClickData, ClickData]:
    """(train, test), drawn i.i.d. from the same teacher."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocabs = cfg.vocab_sizes
    n = cfg.train_rows + cfg.test_rows
    ids = []
    for v in vocabs:
        p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) ** cfg.zipf
        ranks = torch.multinomial(p, n, replacement=True, generator=g)
        ids.append(torch.randperm(v, generator=g)[ranks])
    sparse = torch.stack(ids, dim=1)
    dense = torch.randn(n, cfg.num_dense, generator=g)

    logit = torch.zeros(n, dtype=torch.float64)
    for f, v in enumerate(vocabs):
        logit += (torch.randn(v, generator=g, dtype=torch.float64) * cfg.id_effect_std)[sparse[:, f]]
    pairs = torch.randperm(cfg.num_fields * cfg.num_fields, generator=g).tolist()
    chosen = [(a // cfg.num_fields, a % cfg.num_fields) for a in pairs if a // cfg.num_fields < a % cfg.num_fields]
    for i, j in chosen[: cfg.interactions]:
        scale = 1.0 / math.sqrt(cfg.interaction_rank)
        ui = torch.randn(vocabs[i], cfg.interaction_rank, generator=g, dtype=torch.float64)
        uj = torch.randn(vocabs[j], cfg.interaction_rank, generator=g, dtype=torch.float64)
        logit += scale * (ui[sparse[:, i]] * uj[sparse[:, j]]).sum(dim=1)
    logit += dense.double() @ (torch.randn(cfg.num_dense, generator=g, dtype=torch.float64) * 0.3)
    logit += torch.randn(n, generator=g, dtype=torch.float64) * cfg.noise_std
    bias = _bias_for_rate(logit, cfg.click_rate)
    labels = torch.bernoulli(torch.sigmoid(logit + bias), generator=g).float()

    names = tuple(f"cat_{f}" for f in range(cfg.num_fields))
    split = cfg.train_rows
    return (ClickData(dense[:split], sparse[:split], labels[:split], names, vocabs),
            ClickData(dense[split:], sparse[split:], labels[split:], names, vocabs))


def _bias_for_rate(logit: torch.Tensor, rate: float) -> float:
    """Bisection on the bias so that mean(sigmoid(logit + bias)) = rate."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(torch.sigmoid(logit + mid).mean()) > rate:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2
