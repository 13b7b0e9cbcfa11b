"""Test AUC and log loss, overall and per frequency bucket, with torchmetrics.

A test row's bucket is the training count of its rarest ID (``inputs.rarest_bucket``):
one-epoch overfitting and the optimizers that fight it act on rare IDs, so that is
where their effect should show. ``compute()`` of a torchmetrics ``Metric`` is a
collective (it gathers every rank's state), so :meth:`Evaluator.compute` must run on
every rank; every metric is updated on every batch, possibly with zero rows, so each
rank holds a state for each metric and the gathers line up.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC

from .inputs import bucket_edges


class _Slice:
    def __init__(self, device: torch.device) -> None:
        self.auc = BinaryAUROC().to(device)  # exact (no thresholds): stores every prediction of the slice
        self.logloss = MeanMetric().to(device)
        self.rows = SumMetric().to(device)
        self.positives = SumMetric().to(device)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.auc.update(torch.sigmoid(logits), labels.long())
        self.logloss.update(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        self.rows.update(torch.tensor(float(labels.numel()), device=labels.device))
        self.positives.update(labels.sum())

    def compute(self) -> dict[str, Any]:
        # rows and positives are global after these (collective) computes, so every rank
        # takes the same branch below and the AUC's gather happens on all ranks or none.
        rows, pos = int(self.rows.compute()), int(self.positives.compute())
        loss = float(self.logloss.compute())
        auc = float(self.auc.compute()) if 0 < pos < rows else None  # one class only: AUC is undefined
        return {"rows": rows, "ctr": pos / rows if rows else None, "auc": auc, "logloss": loss if rows else None}


class Evaluator:
    """Accumulates one pass over the test set; ``compute()`` returns plain numbers (every rank)."""

    def __init__(self, edges: Sequence[int], device: torch.device) -> None:
        self.ranges = bucket_edges(edges)
        self.overall = _Slice(device)
        self.buckets = [_Slice(device) for _ in self.ranges]

    def update(self, logits: Tensor, labels: Tensor, bucket: Tensor, valid: Tensor) -> None:
        logits, labels, bucket = logits[valid].float(), labels[valid].float(), bucket[valid]
        self.overall.update(logits, labels)
        for b, s in enumerate(self.buckets):
            m = bucket == b
            s.update(logits[m], labels[m])

    def compute(self) -> dict[str, Any]:
        out = self.overall.compute()
        out["buckets"] = []
        for (lo, hi), s in zip(self.ranges, self.buckets):
            out["buckets"].append({"min_count": lo, "max_count": None if math.isinf(hi) else hi, **s.compute()})
        return out


@torch.no_grad()
def evaluate(model: Any, batches: Any, edges: Sequence[int], device: torch.device) -> dict[str, Any]:
    """Collective: every rank scores its share of the test set (``batches``: (batch, bucket per row,
    valid per row), pinned on CUDA); the metrics gather all shares."""
    model.eval()
    ev = Evaluator(edges, device)
    for batch, bucket, valid in batches:
        _, (_, logits, labels) = model(batch.to(device, non_blocking=True))
        ev.update(logits, labels, bucket.to(device, non_blocking=True), valid.to(device, non_blocking=True))
    model.train()
    return ev.compute()
