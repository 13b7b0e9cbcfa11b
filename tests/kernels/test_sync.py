"""No host sync in a steady-state step of the configuration that runs on CUDA (the
triton backend with its device-side checks), counted on CPU under a dispatch mode;
and the device-side checks still refuse and report what the host checks do.

Runs the Triton kernels in Triton's interpreter (see test_triton.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .triton_interpreter import use_triton_interpreter

use_triton_interpreter()  # before anything imports triton

import torchrec_adaptive as tra  # noqa: E402
from torchrec_adaptive import AdaptiveTBE, TableSpec  # noqa: E402

# Ops that make the host wait for the device: reading a value (item, bool, int), or an
# output whose size depends on the data.
SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero", "unique", "_unique", "unique_consecutive",
            "unique_dim", "masked_select", "equal", "allclose", "bincount", "histc")


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(str(func))
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
            self.seen.append(f"{func} without output_size")
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.seen.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


TABLES = [TableSpec(f"t{i}", 50, 8, lr_multiplier=1.0 + i / 2) for i in range(4)]
MIXED = [TableSpec(f"t{i}", 50, 8 if i % 2 else 4, lr_multiplier=1.0 + i / 2) for i in range(4)]  # 2 dim groups
B = 8

RULES = {
    "adam": tra.Adam.rule_config(lr=0.01, weight_decay=0.01),
    "adamar_linear": tra.AdamAR.rule_config(lr=0.01, alpha=0.01),
    "adamar_exponential": tra.AdamAR.rule_config(lr=0.01, alpha=0.01, decay="exponential"),
    "adamar_fbgemm": tra.AdamAR.rule_config(lr=0.01, alpha=1.0, interval="fbgemm", min_shrinkage=0.2),
    # the ratio threshold re-estimated in every step: the quantile of the counts needs no sync either
    "fal_adamar": tra.AdamAR.rule_config(lr=0.01, alpha=0.01, fal_tau=0.5, fal_tau_is_ratio=True,
                                         fal_tau_refresh_steps=1, count_half_life=4.0, lr_multiplier=2.0),
    "fal_fixed_tau_adam": tra.Adam.rule_config(lr=0.01, fal_tau=3.0, fal_power=2.0, fal_epoch_decay=0.5),
    "rowwise_adagrad_l2": tra.RowWiseAdagrad.rule_config(lr=0.05, weight_decay=0.01),
    "rowwise_adagrad_decoupled": tra.RowWiseAdagrad.rule_config(lr=0.05, weight_decay=0.01,
                                                                weight_decay_mode="decoupled"),
    "rmsprop_ar": tra.RowWiseRMSpropAR.rule_config(lr=0.05, ar_alpha=0.5),
}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 50, (len(TABLES) * B * 2,), generator=g)
    return idx, torch.arange(0, idx.numel() + 1, 2)  # 2 IDs per bag


def step_syncs(k: AdaptiveTBE, step: int) -> list[str]:
    idx, off = batch(step)
    g = torch.Generator().manual_seed(100 + step)
    target = torch.randn(B, sum(t.dim for t in k.layout.tables), generator=g)
    psw = torch.rand(idx.shape, generator=g) if k.pooling == "sum" else None
    with SyncCounter() as counter:
        ((k(idx, off, psw) - target) ** 2).sum().backward()
    return counter.seen


@pytest.mark.parametrize("tables,pooling", [(TABLES, "sum"), (MIXED, "mean")], ids=["one_dim_group", "two_dim_groups"])
@pytest.mark.parametrize("name", list(RULES))
def test_no_host_sync_in_a_steady_state_step(name, tables, pooling):
    k = AdaptiveTBE(tables, RULES[name], backend="triton", pooling=pooling)
    assert k.update_path().backend == "triton"
    for s in range(1, 3):  # warm-up (the first step plans the path)
        step_syncs(k, s)
    before = k.weights.detach().clone()
    assert step_syncs(k, 3) == []
    assert k.optimizer_step == 3 and not torch.equal(before, k.weights.detach())


def test_the_counter_sees_the_host_path_syncs():
    """The count can fail: the eager path (host checks, unique_consecutive) syncs."""
    k = AdaptiveTBE(TABLES, RULES["adamar_linear"], backend="eager")
    step_syncs(k, 1)
    seen = step_syncs(k, 2)
    assert any("_local_scalar_dense" in s for s in seen) and any("unique_consecutive" in s for s in seen), seen


def kernel(items_dim=4, **kw) -> AdaptiveTBE:
    torch.manual_seed(0)
    tables = [TableSpec("users", 10, 4), TableSpec("items", 20, items_dim)]
    return AdaptiveTBE(tables, tra.AdamAR.rule_config(lr=0.1, alpha=0.01), backend="triton", **kw)


GOOD_IDX = torch.tensor([1, 2, 3, 4, 5])
GOOD_OFF = torch.tensor([0, 1, 2, 4, 5])  # users: bags [1], [2]; items: [3, 4], [5]


def snapshot(k):
    return k.weights.detach().clone(), {n: b.clone() for n, b in k.named_buffers()}


def assert_unchanged(k, snap):
    assert torch.equal(k.weights.detach(), snap[0])
    for n, b in k.named_buffers():
        assert torch.equal(b, snap[1][n]), n


@pytest.mark.parametrize("items_dim", [4, 8], ids=["one_dim_group", "two_dim_groups"])
def test_a_bad_id_trains_nothing_and_is_raised_at_the_next_step(items_dim):
    k = kernel(items_dim)
    k(GOOD_IDX, GOOD_OFF).sum().backward()
    # ID 25 is out of range for items: the step trains as if that lookup were not there
    k(torch.tensor([1, 2, 3, 25, 5]), GOOD_OFF).sum().backward()
    ref = kernel(items_dim, bounds_check="off")
    ref(GOOD_IDX, GOOD_OFF).sum().backward()
    ref(torch.tensor([1, 2, 3, 5]), torch.tensor([0, 1, 2, 3, 4])).sum().backward()
    assert torch.equal(k.weights.detach(), ref.weights.detach())
    for (n, a), (_, b) in zip(k.named_buffers(), ref.named_buffers()):
        assert torch.equal(a, b), n
    snap = snapshot(k)
    with pytest.raises(IndexError, match=r"table 'items'.*ID 25 is out of range \[0, 20\).*step 2"):
        k(GOOD_IDX, GOOD_OFF)
    assert_unchanged(k, snap)
    k(GOOD_IDX, GOOD_OFF).sum().backward()  # reported once: training goes on


def test_warn_mode_clamps_and_warns_at_the_next_step():
    k = kernel(bounds_check="warn")
    out = k(torch.tensor([1, 2, 3, 25, 5]), GOOD_OFF)
    ref = kernel(bounds_check="warn")
    assert torch.equal(out, ref(torch.tensor([1, 2, 3, 19, 5]), GOOD_OFF))
    out.sum().backward()
    with pytest.warns(RuntimeWarning, match=r"table 'items'.*ID 25.*clamped"):
        k(GOOD_IDX, GOOD_OFF)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_nonfinite_step_is_masked_on_the_device_and_reported(mode):
    k = kernel(nonfinite=mode)
    k(GOOD_IDX, GOOD_OFF).sum().backward()
    snap = snapshot(k)
    out = k(GOOD_IDX, GOOD_OFF)
    grad = torch.ones_like(out)
    grad[0, 5] = float("inf")  # a column of items
    out.backward(grad)  # nothing raised inside backward
    assert k.optimizer_step == 2  # k advances, as on the host path
    assert_unchanged(k, (snap[0], {n: b for n, b in snap[1].items() if n != "_check_record"}))
    if mode == "raise":
        with pytest.raises(FloatingPointError, match=r"table 'items'.*unchanged \(step k = 2\)"):
            k(GOOD_IDX, GOOD_OFF)
    else:
        with pytest.warns(RuntimeWarning, match=r"table 'items'.*step skipped"):
            k(GOOD_IDX, GOOD_OFF)


def test_bad_offsets_are_repaired_and_raised():
    k = kernel()
    k(GOOD_IDX, torch.tensor([0, 1, 3, 2, 5])).sum().backward()
    with pytest.raises(ValueError, match=r"bag 2 has a negative length"):
        k(GOOD_IDX, GOOD_OFF)


def test_sync_check_interval_reads_every_n_steps_and_check_device_flags_waits():
    k = kernel(sync_check_interval=3)
    bad = torch.tensor([1, 2, 3, 25, 5])
    k(bad, GOOD_OFF).sum().backward()  # step 1: flagged on the device, not read yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k(GOOD_IDX, GOOD_OFF).sum().backward()  # step 2
        k(GOOD_IDX, GOOD_OFF).sum().backward()  # step 3: the flags are copied
    with pytest.raises(IndexError, match=r"ID 25.*step 1"):
        k(GOOD_IDX, GOOD_OFF)
    k(bad, GOOD_OFF).sum().backward()
    with pytest.raises(IndexError, match=r"ID 25"):
        k.check_device_flags()
