"""Batching into TorchRec inputs, frequency buckets, and the evaluator against a hand-computed AUC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import numpy as np

from torchrec_adaptive.apps.dlrm.data import Chunk
from torchrec_adaptive.apps.dlrm.evaluate import Evaluator
from torchrec_adaptive.apps.dlrm.inputs import to_batch


def test_to_batch_is_one_id_per_field_key_major():
    g = np.random.default_rng(0)
    c = Chunk(g.standard_normal((4, 3)).astype(np.float32), np.stack([g.integers(0, 5, 4), g.integers(0, 50, 4)], 1),
              g.integers(0, 2, 4).astype(np.float32))
    b = to_batch(c, ("a", "b"))
    kjt = b.sparse_features
    assert kjt.keys() == ["a", "b"] and kjt.lengths().tolist() == [1] * 8
    assert kjt["a"].values().tolist() == c.sparse[:, 0].tolist() and kjt["b"].values().tolist() == c.sparse[:, 1].tolist()
    assert kjt.values().dtype == torch.int64
    assert torch.equal(b.dense_features, torch.from_numpy(c.dense)) and torch.equal(b.labels, torch.from_numpy(c.labels))


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney: P(score of a positive > score of a negative), ties count half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def test_evaluator_matches_hand_computed_auc_and_logloss_per_bucket():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(500, generator=g)
    labels = (torch.rand(500, generator=g) < torch.sigmoid(2 * logits)).float()
    bucket = torch.randint(0, 3, (500,), generator=g)
    bucket[labels == 1] = torch.where(bucket[labels == 1] == 2, 1, bucket[labels == 1])  # bucket 2: negatives only
    valid = torch.rand(500, generator=g) > 0.1
    ev = Evaluator([1, 10], torch.device("cpu"))
    for s in range(0, 500, 64):  # several updates, as in the eval loop
        ev.update(logits[s:s + 64], labels[s:s + 64], bucket[s:s + 64], valid[s:s + 64])
    out = ev.compute()
    lv, yv, bv = logits[valid], labels[valid], bucket[valid]
    assert out["rows"] == int(valid.sum())
    assert out["auc"] == pytest.approx(_auc(lv, yv), abs=1e-6)
    assert out["logloss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(lv, yv)), abs=1e-6)
    for b in range(2):
        m = bv == b
        assert out["buckets"][b]["rows"] == int(m.sum())
        assert out["buckets"][b]["auc"] == pytest.approx(_auc(lv[m], yv[m]), abs=1e-6)
    assert out["buckets"][2]["auc"] is None and out["buckets"][2]["rows"] > 0  # one class: AUC undefined
    assert out["buckets"][2]["max_count"] is None and out["buckets"][1]["min_count"] == 1
    assert not math.isnan(out["buckets"][2]["logloss"])
