"""One contract for every named rule (optax's _OPTIMIZERS_UNDER_TEST idea)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.rules import FALConfig

RULES = [
    (tra.RowWiseAdagrad, {"lr": 0.05}, {"momentum1": ()}),
    (tra.Adam, {"lr": 0.01}, {"momentum1": (8,), "exp_avg_sq": (8,)}),
    (tra.AdamAR, {"lr": 0.01, "alpha": 0.01}, {"momentum1": (8,), "exp_avg_sq": (8,)}),
    (tra.AdamAR, {"lr": 0.01, "alpha": 0.01, "decay": "exponential", "fal_tau": 3.0}, {"momentum1": (8,)}),
    (tra.AdamAR, {"lr": 0.01, "alpha": 0.01, "interval": "fbgemm", "min_shrinkage": 0.5}, {"momentum1": (8,)}),
    (tra.RowWiseAdagrad, {"lr": 0.05, "fal_tau": 0.5, "fal_tau_is_ratio": True}, {"momentum1": ()}),
    (tra.RowWiseRMSpropAR, {"lr": 0.05, "ar_alpha": 0.5}, {"momentum1": ()}),
]
IDS = [f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(RULES)]


def _kernel(cls, kw, ftm=(0, 0)):
    torch.manual_seed(0)
    return AdaptiveTBE([TableSpec("t", 50, 8)], cls.rule_config(**kw), feature_table_map=list(ftm))


@pytest.mark.parametrize("cls,kw,slots", RULES, ids=IDS)
def test_state_slots_shapes_and_dtypes(cls, kw, slots):
    k = _kernel(cls, kw)
    (state,) = k.get_optimizer_state()
    assert state["prev_iter"].dtype == torch.int64 and state["prev_iter"].shape == (50,)
    assert state["row_count"].dtype == torch.float64 and state["row_count"].shape == (50,)
    for name, tail in slots.items():
        assert state[name].shape == (50, *tail) and state[name].dtype == torch.float32


@pytest.mark.parametrize("cls,kw,slots", RULES, ids=IDS)
def test_only_touched_rows_change_and_duplicates_are_coalesced(cls, kw, slots):
    k = _kernel(cls, kw)
    before = k.split_embedding_weights()[0].clone()
    # bag 0 of feature 0 holds row 7 twice; feature 1 holds rows 7 and 9
    idx, off = torch.tensor([7, 7, 3, 7, 9]), torch.tensor([0, 2, 3, 4, 5])
    k(idx, off).pow(2).sum().backward()
    after = k.split_embedding_weights()[0]
    changed = (after != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert changed == [3, 7, 9]
    (state,) = k.get_optimizer_state()
    assert state["row_count"][[3, 7, 9]].tolist() == [1.0, 3.0, 1.0]
    assert state["prev_iter"][[3, 7, 9]].tolist() == [1, 1, 1]
    assert int(state["prev_iter"].count_nonzero()) == 3
    for name in slots:
        untouched = torch.ones(50, dtype=torch.bool)
        untouched[[3, 7, 9]] = False
        assert not state[name][untouched].any(), f"{name} changed on untouched rows"


@pytest.mark.parametrize("cls,kw,slots", RULES, ids=IDS)
def test_state_dict_round_trip_continues_identically(cls, kw, slots):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 50, (12,), generator=g), torch.arange(0, 13, 3)) for _ in range(6)]
    a = _kernel(cls, kw)
    for idx, off in batches[:3]:
        a(idx, off).sum().backward()
    b = _kernel(cls, {**kw})
    b.load_state_dict(a.state_dict())
    assert b.optimizer_step == 3
    for idx, off in batches[3:]:
        a(idx, off).sum().backward()
        b(idx, off).sum().backward()
    assert torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("cls,kw,slots", RULES, ids=IDS)
def test_unsharded_torch_optimizer_equals_kernel(cls, kw, slots):
    """The torch.optim front end (sparse grads of nn.EmbeddingBag) runs the same rule."""
    k = _kernel(cls, kw, ftm=(0,))
    weight = torch.nn.Parameter(k.split_embedding_weights()[0].clone())
    opt = cls([weight], **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx, off = torch.randint(0, 50, (12,), generator=g), torch.arange(0, 13, 3)
        opt.zero_grad()
        torch.nn.functional.embedding_bag(idx, weight, off, mode="sum", include_last_offset=True, sparse=True).pow(2).sum().backward()
        opt.step()
        k(idx, off).pow(2).sum().backward()
    assert torch.allclose(weight.detach(), k.split_embedding_weights()[0], atol=1e-6)
    for name, value in k.get_optimizer_state()[0].items():
        assert torch.allclose(opt.state[weight][name].float(), value.float(), atol=1e-6), name


def test_fal_ratio_threshold_is_a_quantile_of_the_table_counts():
    k = AdaptiveTBE([TableSpec("a", 10, 2), TableSpec("b", 10, 2)],
                                    tra.Adam.rule_config(fal_tau=0.5, fal_tau_is_ratio=True))
    counts = k.get_optimizer_state()
    counts[0]["row_count"][:4] = torch.tensor([1.0, 2.0, 3.0, 10.0])
    counts[1]["row_count"][:] = 5.0
    k.set_epoch(2)
    assert k._fal is not None and k._fal.tau_by_table is not None
    assert k._fal.tau_by_table.tolist() == [2.5, 5.0]  # median of the nonzero counts


def test_fal_multiplier_follows_methods_md():
    fal = FALConfig(tau=10.0, power=2.0, min_multiplier=0.2, epoch_decay=0.5).build()
    c = torch.tensor([0.0, 1.0, 5.0, 10.0, 50.0])
    m1 = torch.clamp(torch.clamp(c / 10.0, max=1.0), min=0.2) ** 2
    for e in (1, 2, 3):
        expect = 1 - (1 - m1) * 0.5 ** (e - 1)
        assert torch.allclose(fal.row_multiplier(c, e, None), expect)
    assert fal.row_multiplier(c, 1, None)[3] == 1.0  # frequent rows keep the full lr


def test_update_hyper_parameters_and_learning_rate_take_effect():
    a, b = _kernel(tra.AdamAR, {"lr": 0.01}), _kernel(tra.AdamAR, {"lr": 0.01})
    b.set_learning_rate(0.0)
    b.update_hyper_parameters({"alpha": 0.0})
    assert b.get_learning_rate() == 0.0 and b.chain.hyper_parameters()["alpha"] == 0.0
    w0 = b.weights.detach().clone()
    for k in (a, b):
        k(torch.tensor([1, 2]), torch.tensor([0, 1, 2])).sum().backward()
    assert torch.equal(b.weights.detach(), w0)  # lr 0 and no decay: nothing moves
    assert not torch.equal(a.weights.detach(), w0)


def test_rules_and_kernels_never_import_torchrec():
    code = "import sys, torchrec_adaptive.rules, torchrec_adaptive.kernels; assert 'torchrec' not in sys.modules, 'leak'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls,kw,slots", RULES + [(tra.RowWiseAdagrad, {"lr": 0.05, "weight_decay": 0.01}, {}),
                                                 (tra.AdamAR, {"lr": 0.01, "weight_decay": 0.01}, {})])
def test_fused_cpu_update_equals_eager_chain(cls, kw, slots):
    """The compiled CPU loops compute what the eager chain (the rule's definition) computes."""
    from torchrec_adaptive.kernels import fused_cpu

    assert fused_cpu.extension() is not None, "the fused CPU extension must build on CI machines"
    tables = [TableSpec("a", 60, 8), TableSpec("b", 40, 16)]

    def make(fused):
        torch.manual_seed(0)
        return AdaptiveTBE(tables, cls.rule_config(**kw), feature_table_map=[0, 1, 0], fused=fused)

    fused, eager = make(True), make(False)
    assert fused._fused is not None and eager._fused is None
    g = torch.Generator().manual_seed(3)
    for _ in range(12):
        lengths = torch.randint(0, 4, (3 * 8,), generator=g)
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = torch.tensor([60, 40, 60]).repeat_interleave(lengths.view(3, 8).sum(1))
        idx = (torch.rand(int(lengths.sum()), generator=g) ** 3 * rows).long()
        target = torch.randn(8, 32, generator=g)
        for k in (fused, eager):
            ((k(idx, off) - target) ** 2).sum().backward()
    assert torch.allclose(fused.weights, eager.weights, atol=1e-6, rtol=1e-5)
    for sf, se in zip(fused.get_optimizer_state(), eager.get_optimizer_state()):
        for name in se:
            assert torch.allclose(sf[name].float(), se[name].float(), atol=1e-6, rtol=1e-5), name
