"""The built-in synthetic click log: long-tail IDs and a hidden teacher, built so that
plain Adam overfits after epoch 1 (METHODS.md, "A synthetic data set that shows
one-epoch overfitting"). Deterministic by seed; no download.

Teacher: logit = bias + per-ID effects N(0, id_effect_std^2) + ``interactions`` rank-4
pairwise field interactions + a small linear effect of the dense features + per-row
noise N(0, noise_std^2); the bias is set for ``click_rate``. Labels ~ Bernoulli(sigmoid).

Written in the app's Parquet format (``format.py``) a chunk at a time, so any size fits
in memory: the teacher is drawn first from ``seed``; then chunk k of a split
(``CHUNK_ROWS`` rows) is drawn from its own generator seeded by (seed, split, k), so
the rows do not depend on how the writer is run, and the training counts of every ID
are accumulated as the train split is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

import numpy as np

from .format import Chunk, DatasetMeta, SplitWriter


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


CHUNK_ROWS = 1 << 16
_SPLITS = {"train": 1, "test": 2, "calibration": 3}


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


@dataclass
class Teacher:
    """The hidden model the labels come from."""

    cfg: SyntheticConfig
    zipf_cdf: list[torch.Tensor]  # per field, over popularity ranks
    rank_to_id: list[torch.Tensor]  # per field: which ID has each popularity rank
    effects: list[torch.Tensor]  # per field, per ID
    pairs: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    dense_w: torch.Tensor
    bias: float = 0.0

    @staticmethod
    def draw(cfg: SyntheticConfig) -> "Teacher":
        g = torch.Generator().manual_seed(cfg.seed)
        vocabs = cfg.vocab_sizes
        cdf, perm = [], []
        for v in vocabs:
            p = 1.0 / torch.arange(1, v + 1, dtype=torch.float64) ** cfg.zipf
            cdf.append(torch.cumsum(p / p.sum(), 0))
            perm.append(torch.randperm(v, generator=g))
        effects = [torch.randn(v, generator=g, dtype=torch.float64) * cfg.id_effect_std for v in vocabs]
        order = torch.randperm(cfg.num_fields * cfg.num_fields, generator=g).tolist()
        chosen = [(a // cfg.num_fields, a % cfg.num_fields) for a in order if a // cfg.num_fields < a % cfg.num_fields]
        pairs = [(i, j, torch.randn(vocabs[i], cfg.interaction_rank, generator=g, dtype=torch.float64),
                  torch.randn(vocabs[j], cfg.interaction_rank, generator=g, dtype=torch.float64))
                 for i, j in chosen[: cfg.interactions]]
        dense_w = torch.randn(cfg.num_dense, generator=g, dtype=torch.float64) * 0.3
        t = Teacher(cfg, cdf, perm, effects, pairs, dense_w)
        cal = [t._draw(_generator(cfg.seed, _SPLITS["calibration"], k), CHUNK_ROWS) for k in range(4)]
        t.bias = _bias_for_rate(torch.cat([c[2] for c in cal]), cfg.click_rate)
        return t

    def _draw(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sparse, dense, logit without the bias) of n fresh rows."""
        cfg = self.cfg
        sparse = torch.stack([self.rank_to_id[f][torch.searchsorted(self.zipf_cdf[f], torch.rand(n, generator=g,
                              dtype=torch.float64)).clamp_(max=len(self.zipf_cdf[f]) - 1)]
                              for f in range(cfg.num_fields)], dim=1)
        dense = torch.randn(n, cfg.num_dense, generator=g)
        logit = torch.zeros(n, dtype=torch.float64)
        for f in range(cfg.num_fields):
            logit += self.effects[f][sparse[:, f]]
        scale = 1.0 / math.sqrt(cfg.interaction_rank)
        for i, j, ui, uj in self.pairs:
            logit += scale * (ui[sparse[:, i]] * uj[sparse[:, j]]).sum(dim=1)
        logit += dense.double() @ self.dense_w
        logit += torch.randn(n, generator=g, dtype=torch.float64) * cfg.noise_std
        return sparse, dense, logit

    def chunk(self, split: str, k: int, n: int) -> Chunk:
        g = _generator(self.cfg.seed, _SPLITS[split], k)
        sparse, dense, logit = self._draw(g, n)
        labels = torch.bernoulli(torch.sigmoid(logit + self.bias), generator=g).float()
        return Chunk(dense.numpy(), sparse.numpy(), labels.numpy())


def synthetic_meta(cfg: SyntheticConfig) -> DatasetMeta:
    return DatasetMeta(tuple(f"cat_{f}" for f in range(cfg.num_fields)), cfg.vocab_sizes, cfg.num_dense)


def synthetic_chunks(cfg: SyntheticConfig, split: str, teacher: Teacher | None = None) -> Iterator[Chunk]:
    t = teacher or Teacher.draw(cfg)
    rows = cfg.train_rows if split == "train" else cfg.test_rows
    for k, lo in enumerate(range(0, rows, CHUNK_ROWS)):
        yield t.chunk(split, k, min(CHUNK_ROWS, rows - lo))


def write_synthetic(cfg: SyntheticConfig, out: str | Path, progress: bool = False) -> tuple[Path, Path]:
    """Writes ``out/train`` (with its ID counts) and ``out/test``; returns both directories."""
    from tqdm import tqdm

    out = Path(out)
    t = Teacher.draw(cfg)
    meta = synthetic_meta(cfg)
    for split in ("train", "test"):
        w = SplitWriter(out / split, meta, counts=split == "train")
        w.open_part("part-00000")
        rows = cfg.train_rows if split == "train" else cfg.test_rows
        with tqdm(total=rows, unit="rows", desc=f"synthetic {split}", disable=not progress, leave=False) as bar:
            for c in synthetic_chunks(cfg, split, t):
                w.write(c)
                bar.update(len(c))
        w.finish()
    return out / "train", out / "test"


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
