"""Bad input gets a clear error naming the table/feature, and corrupts nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec


def kernel(**kw) -> AdaptiveTBE:
    torch.manual_seed(0)
    tables = [TableSpec("users", 10, 4), TableSpec("items", 20, 8)]
    return AdaptiveTBE(tables, tra.AdamAR.rule_config(lr=0.1, alpha=0.01), **kw)


def snapshot(k: AdaptiveTBE):
    return (
        k.weights.detach().clone(),
        {n: b.clone() for n, b in k.named_buffers()},
        k.optimizer_step,
    )


def assert_unchanged(k, snap, steps_advanced=0):
    """Weights and state as in ``snap``; the step k moved by ``steps_advanced`` (a refused
    step still counts, as for every table a step leaves untouched)."""
    w, bufs, step = snap
    assert torch.equal(k.weights.detach(), w)
    for n, b in k.named_buffers():
        assert torch.equal(b, bufs[n]), n
    assert k.optimizer_step == step + steps_advanced


# two features (users, items), batch 2
GOOD_IDX = torch.tensor([1, 2, 3, 4, 5])
GOOD_OFF = torch.tensor([0, 1, 2, 4, 5])


def train_one(k):
    k(GOOD_IDX, GOOD_OFF).sum().backward()


@pytest.mark.parametrize("bad_id", [10, -1, 10**9])
def test_out_of_range_id_names_table_and_id(bad_id):
    k = kernel()
    train_one(k)
    snap = snapshot(k)
    idx = torch.tensor([1, bad_id, 3, 4, 5])
    with pytest.raises(IndexError, match=rf"table 'users'.*ID {bad_id} is out of range \[0, 10\)"):
        k(idx, GOOD_OFF)
    assert_unchanged(k, snap)


def test_warn_mode_clamps_and_warns():
    k = kernel(bounds_check="warn")
    idx = torch.tensor([1, 2, 3, 25, 5])  # 25 is out of range for items (20 rows)
    with pytest.warns(RuntimeWarning, match=r"table 'items'.*ID 25"):
        out = k(idx, GOOD_OFF)
    ref = kernel(bounds_check="warn")
    clamped = ref(torch.tensor([1, 2, 3, 19, 5]), GOOD_OFF)
    assert torch.equal(out, clamped)


def test_nan_gradient_is_refused_before_the_weights():
    k = kernel()
    train_one(k)
    snap = snapshot(k)
    out = k(GOOD_IDX, GOOD_OFF)
    bad = torch.ones_like(out)
    bad[0, 5] = float("nan")  # a column of feature 1 ("items")
    with pytest.raises(FloatingPointError, match=r"table 'items'.*unchanged"):
        out.backward(bad)
    assert_unchanged(k, snap, steps_advanced=1)


def test_inf_gradient_skip_mode_skips_the_step():
    k = kernel(nonfinite="skip")
    train_one(k)
    snap = snapshot(k)
    out = k(GOOD_IDX, GOOD_OFF)
    bad = torch.ones_like(out)
    bad[1, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"table 'users'.*skipped"):
        out.backward(bad)
    assert_unchanged(k, snap, steps_advanced=1)
    train_one(k)  # training goes on afterwards
    assert k.optimizer_step == snap[2] + 2


@pytest.mark.parametrize(
    "idx,off,psw,err,pattern",
    [
        (GOOD_IDX.float(), GOOD_OFF, None, TypeError, "indices must be int32 or int64"),
        (GOOD_IDX, GOOD_OFF.float(), None, TypeError, "offsets must be int32 or int64"),
        (GOOD_IDX, torch.tensor([0, 1, 2, 5]), None, ValueError, "num_features"),
        (GOOD_IDX, torch.tensor([0, 1, 2, 4, 7]), None, ValueError, "end at len"),
        (GOOD_IDX, torch.tensor([0, 3, 2, 4, 5]), None, ValueError, "non-decreasing"),
        (GOOD_IDX, GOOD_OFF, torch.ones(4), ValueError, "per_sample_weights has shape"),
        (GOOD_IDX, GOOD_OFF, torch.ones(5, dtype=torch.int64), TypeError, "floating point"),
    ],
)
def test_malformed_inputs_raise_clear_errors(idx, off, psw, err, pattern):
    k = kernel()
    snap = snapshot(k)
    with pytest.raises(err, match=pattern):
        k(idx, off, psw)
    assert_unchanged(k, snap)


@pytest.mark.parametrize(
    "cls,kwargs,pattern",
    [
        (tra.AdamAR, {"lr": -1.0}, "lr must be >= 0"),
        (tra.AdamAR, {"lr": float("nan")}, "lr must be >= 0"),
        (tra.AdamAR, {"alpha": 2.0}, r"alpha must be in \[0, 1\]"),
        (tra.AdamAR, {"decay": "cubic"}, "decay must be"),
        (tra.AdamAR, {"interval": "weekly"}, "interval must be"),
        (tra.AdamAR, {"min_shrinkage": -0.1}, "min_shrinkage"),
        (tra.AdamAR, {"betas": (0.9, 1.0)}, r"betas\[1\]"),
        (tra.AdamAR, {"betas": (0.9,)}, "betas must be a pair"),
        (tra.Adam, {"eps": 0.0}, "eps must be > 0"),
        (tra.Adam, {"weight_decay": -1.0}, "weight_decay must be >= 0"),
        (tra.Adam, {"alpha": 0.1}, r"unknown argument\(s\) \['alpha'\]"),
        (tra.RowWiseAdagrad, {"weight_decay_mode": "l1"}, "weight_decay_mode"),
        (tra.AdamAR, {"fal_tau": 0.0}, "fal_tau must be > 0"),
        (tra.AdamAR, {"fal_tau": 2.0, "fal_tau_is_ratio": True}, "quantile"),
        (tra.AdamAR, {"fal_power": -1.0}, "fal_power"),
        (tra.AdamAR, {"fal_min": 1.5}, "fal_min"),
        (tra.AdamAR, {"fal_epoch_decay": 2.0}, "fal_epoch_decay"),
        (tra.AdamAR, {"lr_multiplier": 0.0}, "lr_multiplier"),
        (tra.AdamAR, {"count_half_life": -3.0}, "count_half_life"),
    ],
)
def test_invalid_hyperparameters_fail_at_construction(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls.rule_config(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        cls([torch.nn.Parameter(torch.zeros(3, 2))], **kwargs)


def test_invalid_kernel_arguments():
    rule = tra.Adam.rule_config()
    with pytest.raises(ValueError, match="num_rows must be > 0"):
        TableSpec("t", 0, 4)
    with pytest.raises(ValueError, match="unique"):
        AdaptiveTBE([TableSpec("t", 3, 4), TableSpec("t", 3, 4)], rule)
    with pytest.raises(ValueError, match="feature_table_map names tables"):
        AdaptiveTBE([TableSpec("t", 3, 4)], rule, feature_table_map=[0, 1])
    with pytest.raises(ValueError, match="pooling"):
        AdaptiveTBE([TableSpec("t", 3, 4)], rule, pooling="max")
    with pytest.raises(TypeError, match="RuleConfig"):
        AdaptiveTBE([TableSpec("t", 3, 4)], {"lr": 1.0})  # type: ignore[arg-type]
    k = AdaptiveTBE([TableSpec("t", 3, 4)], rule)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        k.update_hyper_parameters({"alpha": 0.1})
    with pytest.raises(ValueError, match=r"betas\[0\] must be in"):
        k.update_hyper_parameters({"beta1": 1.5})
    assert k.chain.hyper_parameters()["beta1"] == 0.9  # the bad value was not kept
    with pytest.raises(ValueError, match="epochs count from 1"):
        k.set_epoch(0)


def test_per_sample_weights_need_sum_pooling():
    k = kernel(pooling="mean")
    with pytest.raises(ValueError, match="pooling='sum'"):
        k(GOOD_IDX, GOOD_OFF, torch.ones(5))


def test_no_warning_for_clean_input():
    k = kernel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_one(k)
