"""Batching into TorchRec inputs, frequency buckets, and the evaluator against a hand-computed AUC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_adaptive.apps.dlrm.data import ClickData
from torchrec_adaptive.apps.dlrm.evaluate import Evaluator
from torchrec_adaptive.apps.dlrm.inputs import (bucket_index, eval_batches, rarest_id_count, steps_per_epoch, to_batch,
                                                train_batches, train_counts)


def _data(n: int = 37, seed: int = 0) -> ClickData:
    g = torch.Generator().manual_seed(seed)
    return ClickData(torch.randn(n, 3, generator=g), torch.stack([torch.randint(0, 5, (n,), generator=g),
                                                                  torch.randint(0, 50, (n,), generator=g)], 1),
                     torch.randint(0, 2, (n,), generator=g).float(), ("a", "b"), (5, 50))


def test_to_batch_is_one_id_per_field_key_major():
    d = _data(4)
    b = to_batch(d.dense, d.sparse, d.labels, d.field_names)
    kjt = b.sparse_features
    assert kjt.keys() == ["a", "b"] and kjt.lengths().tolist() == [1] * 8
    assert torch.equal(kjt["a"].values(), d.sparse[:, 0]) and torch.equal(kjt["b"].values(), d.sparse[:, 1])
    assert torch.equal(b.dense_features, d.dense) and torch.equal(b.labels, d.labels)


def test_train_batches_are_disjoint_shares_with_equal_step_counts():
    d = _data(37)
    steps = steps_per_epoch(len(d), 4, 2)
    assert steps == 4  # 18 rows per rank -> 4 full batches on both ranks (rank 0 has 19)
    seen = []
    for rank in range(2):
        bs = list(train_batches(d, 4, epoch=1, seed=0, shuffle=True, rank=rank, world=2, steps=steps))
        assert len(bs) == steps
        seen += [tuple(x) for b in bs for x in b.dense_features.tolist()]
    assert len(set(seen)) == len(seen) == 32
    e1 = next(train_batches(d, 4, epoch=1, seed=0, shuffle=True, rank=0, world=2, steps=1)).labels
    e1b = next(train_batches(d, 4, epoch=1, seed=0, shuffle=True, rank=0, world=2, steps=1)).labels
    e2 = next(train_batches(d, 8, epoch=2, seed=0, shuffle=True, rank=0, world=2, steps=1)).dense_features
    assert torch.equal(e1, e1b) and not torch.equal(e2[:4], next(train_batches(d, 4, epoch=1, seed=0, shuffle=True,
                                                                              rank=0, world=2, steps=1)).dense_features)
    assert steps_per_epoch(37, 4, 2, cap=2) == 2


@pytest.mark.parametrize("n,world,batch", [(37, 2, 5), (3, 2, 8), (1, 2, 4), (20, 3, 4)])
def test_eval_batches_cover_every_row_once_with_equal_counts(n, world, batch):
    d = _data(n)
    extra = torch.arange(n)
    counts, rows = set(), []
    for rank in range(world):
        bs = list(eval_batches(d, extra, batch, rank=rank, world=world))
        counts.add(len(bs))
        for _, ex, valid in bs:
            rows += ex[valid].tolist()
    assert len(counts) == 1 and sorted(rows) == list(range(n))


def test_rarest_id_count_and_buckets():
    train = ClickData(torch.zeros(6, 1), torch.tensor([[0, 1], [0, 1], [0, 2], [1, 2], [0, 2], [0, 3]]),
                      torch.zeros(6), ("a", "b"), (3, 5))
    test = ClickData(torch.zeros(4, 1), torch.tensor([[0, 2], [1, 1], [2, 3], [0, 4]]), torch.zeros(4), ("a", "b"), (3, 5))
    rare = rarest_id_count(train_counts(train), test)
    assert rare.tolist() == [3, 1, 0, 0]  # min over fields of the training count of each ID
    assert bucket_index(rare, [1, 2]).tolist() == [2, 1, 0, 0]  # [0,1) [1,2) [2,inf)


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
