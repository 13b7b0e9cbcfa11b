"""State that stays exact for long jobs and huge tables (issue 12, item 9).

* c_r is float64: a row seen 2^24 times still counts the next occurrence (float32 does not);
  state written with float32 counts still loads;
* MEDA's hash covers the whole 64-bit row id, and rows < 2^32 keep the values they always had;
* ``interval="fbgemm"`` shrinks with the optimizer's lr, not the row's lr after kappa and FAL.
"""

from __future__ import annotations

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.kernels.reinit import hashed_uniform, table_salt

IDX = torch.tensor([3, 3, 5])
OFF = torch.tensor([0, 2, 3])  # one feature, batch 2: row 3 twice, row 5 once


@pytest.mark.parametrize("fused", [True, False])
def test_counts_stay_exact_past_float32(fused):
    k = AdaptiveTBE([TableSpec("t", 10, 4)], tra.AdamAR.rule_config(lr=0.01), fused=fused)
    counts = k.get_optimizer_state()[0]["row_count"]
    counts[5] = 2.0**24  # row 5 occurs once per batch: float32 would stay at 2^24
    k(IDX, OFF).sum().backward()
    assert counts.dtype == torch.float64
    assert counts[5].item() == 2.0**24 + 1
    assert counts[3].item() == 2.0
    k(IDX, OFF).sum().backward()
    assert counts[5].item() == 2.0**24 + 2


def test_unsharded_front_end_counts_in_float64():
    p = torch.nn.Parameter(torch.zeros(6, 2))
    opt = tra.AdamAR([p], lr=0.01)
    p.grad = torch.ones(6, 2)
    opt.step()
    assert opt.state[p]["row_count"].dtype == torch.float64


def test_state_with_float32_counts_still_loads():
    rule = tra.AdamAR.rule_config(lr=0.01)
    a = AdaptiveTBE([TableSpec("t", 10, 4)], rule)
    a(IDX, OFF).sum().backward()
    old = {n: (v.float() if n == "state_row_count" else v) for n, v in a.state_dict().items()}
    assert old["state_row_count"].dtype == torch.float32  # what a checkpoint of the old code holds
    b = AdaptiveTBE([TableSpec("t", 10, 4)], rule)
    b.load_state_dict(old)
    got = b.get_optimizer_state()[0]["row_count"]
    assert got.dtype == torch.float64 and got.tolist() == a.get_optimizer_state()[0]["row_count"].tolist()


# Values of the 32-bit hash before it covered 64 bits (seed 3, epoch 2, table "t",
# columns 0 and 1): old checkpoints must re-initialize to exactly these.
_OLD_ROWS = [0, 1, 7, 12345, 2**31 - 1, 2**32 - 1]
_OLD_VALUES = [
    [-0.8947023153305054, -0.3906395435333252], [-0.7270970344543457, -0.3187265396118164],
    [-0.18966972827911377, 0.09541559219360352], [0.4150584936141968, 0.051045775413513184],
    [-0.44342315196990967, 0.44764840602874756], [-0.9642828702926636, 0.10623705387115479],
]


def test_meda_hash_keeps_values_below_2_32():
    got = hashed_uniform(table_salt(3, 2, "t"), torch.tensor(_OLD_ROWS), torch.arange(2), -1.0, 1.0)
    assert got.tolist() == _OLD_VALUES


def test_meda_hash_separates_rows_2_32_apart():
    salt = table_salt(3, 2, "t")
    rows = torch.arange(2000)
    cols = torch.arange(4)
    base = hashed_uniform(salt, rows, cols, -1.0, 1.0)
    for shift in (2**32, 2**33, 5 * 2**32, 2**40):
        other = hashed_uniform(salt, rows + shift, cols, -1.0, 1.0)
        same = (other == base).all(dim=1)
        assert int(same.sum()) == 0, f"rows {shift} apart share values"
        assert other.min() >= -1.0 and other.max() < 1.0


@pytest.mark.parametrize("fused", [True, False])
def test_fbgemm_interval_shrinks_with_the_optimizer_lr(fused):
    """eps huge makes Adam's step ~0, so a row's first update is the shrink alone:
    w <- (1 - lr * alpha * 1) w with the optimizer's lr, whatever kappa and FAL make the row's lr."""
    lr, alpha = 0.01, 1.0
    rule = tra.AdamAR.rule_config(lr=lr, alpha=alpha, interval="fbgemm", eps=1e30, lr_multiplier=10.0,
                                  fal_tau=1000.0)  # FAL: m_r = c_r / 1000
    k = AdaptiveTBE([TableSpec("t", 10, 4, lr_multiplier=2.0)], rule, fused=fused)
    before = k.split_embedding_weights()[0].clone()
    k(IDX, OFF).sum().backward()
    after = k.split_embedding_weights()[0]
    for row in (3, 5):
        ratio = after[row] / before[row]
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1.0 - lr * alpha), rtol=0, atol=1e-6)


def test_fbgemm_interval_in_the_unsharded_front_end_uses_the_group_lr():
    p = torch.nn.Parameter(torch.ones(4, 2))
    opt = tra.AdamAR([p], lr=0.01, alpha=1.0, interval="fbgemm", eps=1e30, lr_multiplier=10.0)
    p.grad = torch.ones(4, 2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4, 2), 0.99), rtol=0, atol=1e-6)


def test_unsharded_state_round_trip_keeps_slot_dtypes():
    """torch.optim casts loaded state to the parameter's dtype; s_r and c_r must stay exact."""
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = tra.AdamAR([p], lr=0.01)
    p.grad = torch.ones(4, 2)
    opt.step()
    opt.state[p]["row_count"][0] = 2.0**24 + 1
    opt.state[p]["prev_iter"][1] = 2**40 + 1
    q = torch.nn.Parameter(torch.zeros(4, 2))
    other = tra.AdamAR([q], lr=0.01)
    other.load_state_dict(opt.state_dict())
    assert other.state[q]["row_count"].dtype == torch.float64
    assert other.state[q]["prev_iter"].dtype == torch.int64
    assert other.state[q]["row_count"][0].item() == 2.0**24 + 1
    assert other.state[q]["prev_iter"][1].item() == 2**40 + 1
