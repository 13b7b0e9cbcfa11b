"""Frequency admission (``admit_min_count``, rules.transforms.admit_by_count) on every rule,
through the compiled CPU loops and the eager chain, against plain dense references.

The reference is the rule without admission (tests/reference.py, full tables, formulas
written out) whose weight change is undone on the rows seen fewer than ``min_count``
times so far: their weights wait, their optimizer state and counts go on. Each test also
checks that it could fail: some touched rows were held back (still at their initial
values) and the admitted ones moved.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.rules.transforms import COUNT

from ..batches import zipf_batch
from ..reference import DenseRule, almost, dense_forward, occurrences, rowwise_adagrad_dense

ROWS = [400, 60]
DIMS = [8, 4]
FTM = [0, 1, 0]  # feature 2 shares table 0: a row's count includes duplicates across features
STEPS, B, MIN = 30, 32, 4.0


def _batches(steps: int = STEPS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = zipf_batch(ROWS, FTM, B, 4, g)
        yield b, torch.randn(B, sum(DIMS[t] for t in FTM), generator=g)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum()


class _RMSpropARRef:
    """FBGEMM's rowwise_rmsprop_ar as written in RowWiseRMSpropARConfig's docstring, dense."""

    def __init__(self, weight: torch.Tensor, lr: float, ar_alpha: float, eps: float, ema_beta: float = 0.99,
                 min_shrinkage: float = 0.1) -> None:
        self.weight, self.lr, self.ar_alpha, self.eps, self.beta, self.floor = weight, lr, ar_alpha, eps, ema_beta, min_shrinkage
        self.v = torch.zeros(weight.shape[0])
        self.s = torch.zeros(weight.shape[0], dtype=torch.int64)

    def step(self, grad: torch.Tensor, occ: torch.Tensor, k: int) -> None:
        touched = occ > 0
        delta = torch.where(self.s == 0, torch.ones_like(self.s), k - self.s).double()
        keep = torch.clamp(1 - torch.clamp(self.lr * self.ar_alpha * delta, 0, 1), min=self.floor).float()
        v = self.beta * self.v + (1 - self.beta) * (grad * grad).mean(dim=1)
        w = keep.unsqueeze(1) * self.weight - self.lr * grad / (v.sqrt() + self.eps).unsqueeze(1)
        self.weight = torch.where(touched.unsqueeze(1), w, self.weight)
        self.v = torch.where(touched, v, self.v)
        self.s = torch.where(touched, torch.full_like(self.s, k), self.s)


class _AdagradRef:
    def __init__(self, weight: torch.Tensor, lr: float, eps: float, weight_decay: float, mode: str) -> None:
        self.weight, self.lr, self.eps, self.wd, self.mode = weight, lr, eps, weight_decay, mode
        self.acc = torch.zeros(weight.shape[0])

    def step(self, grad: torch.Tensor, occ: torch.Tensor, k: int) -> None:
        self.weight, self.acc = rowwise_adagrad_dense(self.weight, self.acc, grad, occ, self.lr, self.eps,
                                                      self.wd, self.mode)


# (optimizer class, kwargs without admission, reference factory)
RULES = {
    "adam": (tra.Adam, {"lr": 0.05, "eps": 0.1, "weight_decay": 0.5},
             lambda w: DenseRule(w, lr=0.05, eps=0.1, weight_decay=0.5)),
    "adamar_linear": (tra.AdamAR, {"lr": 0.05, "eps": 0.1, "alpha": 0.05},
                      lambda w: DenseRule(w, lr=0.05, eps=0.1, alpha=0.05)),
    "adamar_fbgemm_fal": (tra.AdamAR, {"lr": 0.05, "eps": 0.1, "alpha": 2.0, "interval": "fbgemm",
                                       "min_shrinkage": 0.2, "fal_tau": 8.0},
                          lambda w: DenseRule(w, lr=0.05, eps=0.1, alpha=2.0, decay="fbgemm", min_shrinkage=0.2,
                                              fal_tau=8.0)),
    "rowwise_adagrad_l2": (tra.RowWiseAdagrad, {"lr": 0.1, "eps": 0.5, "weight_decay": 0.3},
                           lambda w: _AdagradRef(w, 0.1, 0.5, 0.3, "l2")),
    "rowwise_adagrad_decoupled": (tra.RowWiseAdagrad, {"lr": 0.1, "eps": 0.5, "weight_decay": 0.3,
                                                       "weight_decay_mode": "decoupled"},
                                  lambda w: _AdagradRef(w, 0.1, 0.5, 0.3, "decoupled")),
    "rmsprop_ar": (tra.RowWiseRMSpropAR, {"lr": 0.05, "eps": 0.1, "ar_alpha": 1.0},
                   lambda w: _RMSpropARRef(w, 0.05, 1.0, 0.1)),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_admission_matches_dense_reference(rule: str, fused: bool) -> None:
    cls, kwargs, make_ref = RULES[rule]
    torch.manual_seed(0)
    kernel = AdaptiveTBE([TableSpec(f"t{i}", n, d) for i, (n, d) in enumerate(zip(ROWS, DIMS))],
                                         cls.rule_config(**kwargs, admit_min_count=MIN), feature_table_map=FTM,
                                         fused=fused)
    assert (kernel._fused is not None) == fused, "the update path under test was not the one used"
    init = [w.detach().clone() for w in kernel.split_embedding_weights()]
    refs = [make_ref(w.clone()) for w in init]
    counts = [torch.zeros(n) for n in ROWS]
    for k, (b, target) in enumerate(_batches(), start=1):
        occ = occurrences(b, FTM, ROWS)
        tables = [r.weight.clone().requires_grad_(True) for r in refs]
        _loss(dense_forward(tables, b, FTM, "sum"), target).backward()
        for t, (r, tab, o) in enumerate(zip(refs, tables, occ)):
            before = r.weight.clone()
            r.step(tab.grad, o, k)
            counts[t] += o
            waiting = (o > 0) & (counts[t] < MIN)  # touched, but not yet seen MIN times
            r.weight = torch.where(waiting.unsqueeze(1), before, r.weight)
        _loss(kernel(b.indices, b.offsets), target).backward()
    held_back = moved = 0
    for t, (r, w, w0) in enumerate(zip(refs, kernel.split_embedding_weights(), init)):
        assert almost(r.weight, w) <= 1e-5, f"table {t} weights"
        seen_not_admitted = (counts[t] > 0) & (counts[t] < MIN)
        assert torch.equal(w[seen_not_admitted], w0[seen_not_admitted]), f"table {t}: a row not admitted changed"
        held_back += int(seen_not_admitted.sum())
        moved += int((w[counts[t] >= MIN] != w0[counts[t] >= MIN]).any(dim=1).sum())
    assert held_back > 10 and moved > 10, (held_back, moved)  # both kinds of rows occurred: the test can fail
    for t, st in enumerate(kernel.get_optimizer_state()):
        assert torch.equal(st[COUNT].float(), counts[t]), f"table {t}: counts go on for rows not admitted"


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan])
def test_bad_min_count_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="admit_min_count"):
        tra.AdamAR.rule_config(lr=1e-3, admit_min_count=value)


def test_off_by_default_and_a_runtime_hyperparameter() -> None:
    assert tra.Adam.rule_config(lr=1e-3).admit_min_count == 0
    assert "min_count" not in tra.Adam.rule_config(lr=1e-3).build().hyper_parameters()
    chain = tra.Adam.rule_config(lr=1e-3, admit_min_count=3).build()
    assert chain.hyper_parameters()["min_count"] == 3.0
    assert tra.Adam.rule_config(**tra.Adam.rule_config(lr=1e-3, admit_min_count=3).to_kwargs()).admit_min_count == 3


def test_unsharded_optimizer_checkpoint_resumes_admission_exactly() -> None:
    """torch.optim front end: state_dict after 10 steps, loaded into a fresh optimizer, goes on
    exactly like the uninterrupted one (the counts that decide admission are in the state)."""
    def make():
        torch.manual_seed(0)
        bag = torch.nn.EmbeddingBag(ROWS[0], DIMS[0], mode="sum")
        return bag, tra.AdamAR(bag.parameters(), lr=0.05, eps=0.1, alpha=0.05, admit_min_count=MIN)

    def train(bag, opt, batches):
        for b, target in batches:
            idx, off, _ = b.feature_slices(len(FTM))[0]
            opt.zero_grad()
            _loss(bag(idx, off[:-1]), target[:, :DIMS[0]]).backward()
            opt.step()

    data = list(_batches(20))
    bag, opt = make()
    train(bag, opt, data)
    bag2, opt2 = make()
    train(bag2, opt2, data[:10])
    saved_w, saved_opt = bag2.state_dict(), opt2.state_dict()
    bag3, opt3 = make()
    bag3.load_state_dict(saved_w)
    opt3.load_state_dict(saved_opt)
    assert opt3.state[bag3.weight][COUNT].dtype == torch.float64
    train(bag3, opt3, data[10:])
    assert torch.equal(bag.weight, bag3.weight)
    counts = opt.state[bag.weight][COUNT]
    assert bool(((counts > 0) & (counts < MIN)).any()) and bool((counts >= MIN).any())
