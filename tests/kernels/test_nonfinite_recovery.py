"""A refused non-finite step leaves everything ready for the next batch (issue 12, items 3 and 7).

The kernel refuses inside backward by updating nothing and raises only once backward
has finished (``nonfinite="raise"``); ``"skip"`` restores a Helen perturbation, clears
a pending capture, and advances k like every other kernel. The DDP / DMP side is in
tests/distributed/test_nonfinite_sharded.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.kernels.batched import raise_refused_steps

IDX = torch.tensor([1, 2, 3, 4, 5])
OFF = torch.tensor([0, 1, 2, 4, 5])  # features users, items; batch 2


def kernel(name: str = "users", **kw) -> AdaptiveTBE:
    torch.manual_seed(0)
    tables = [TableSpec(name, 10, 4), TableSpec(name + "_items", 20, 8)]
    return AdaptiveTBE(tables, tra.AdamAR.rule_config(lr=0.1, alpha=0.01), **kw)


def state_of(k: AdaptiveTBE) -> dict[str, torch.Tensor]:
    return {"weights": k.weights.detach().clone(), **{n: b.clone() for n, b in k.named_buffers()}}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_raise_comes_after_backward_and_training_goes_on():
    k = kernel()
    k(IDX, OFF).sum().backward()
    before = state_of(k)
    dense = torch.nn.Linear(12, 1)
    loss = dense(k(IDX, OFF)).sum() * float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite gradient for feature 0 .*unchanged \(step k = 2\)"):
        loss.backward()
    # backward ran to the end: the dense part got its (NaN) gradient before the error
    assert dense.weight.grad is not None and torch.isnan(dense.weight.grad).all()
    assert_same(before, state_of(k))
    assert k.optimizer_step == 2
    dense.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense(k(IDX, OFF)).sum().backward()  # the next batch trains, and nothing stale is raised
    assert k.optimizer_step == 3
    assert not torch.equal(before["weights"], k.weights.detach())
    raise_refused_steps()  # nothing pending


def test_two_refusing_kernels_raise_once_together_and_keep_k_in_step():
    a, b = kernel("a"), kernel("b")
    loss = (a(IDX, OFF).sum() + b(IDX, OFF).sum()) * float("inf")
    with pytest.raises(FloatingPointError) as err:
        loss.backward()
    assert "table 'a'" in str(err.value) and "table 'b'" in str(err.value)
    assert a.optimizer_step == b.optimizer_step == 1
    (a(IDX, OFF).sum() + b(IDX, OFF).sum()).backward()  # no stale error from the other kernel
    assert a.optimizer_step == b.optimizer_step == 2


def test_skip_keeps_k_in_step_across_kernels():
    """Only kernel a sees the NaN; k must still advance in both (METHODS.md: for every table)."""
    a, b = kernel("a", nonfinite="skip"), kernel("b", nonfinite="skip")
    out_a, out_b = a(IDX, OFF), b(IDX, OFF)
    grad_a = torch.ones_like(out_a)
    grad_a[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        torch.autograd.backward([out_a, out_b], [grad_a, torch.ones_like(out_b)])
    assert a.optimizer_step == b.optimizer_step == 1


def test_skip_restores_a_perturbation_and_clears_a_capture():
    k = kernel(nonfinite="skip")
    k(IDX, OFF).sum().backward()
    original = k.weights.detach().clone()
    # Helen's first pass, then its perturbation; the second pass is non-finite
    k.capture_next_backward()
    k(IDX, OFF).sum().backward()
    k.perturb_captured(rho=0.5, xi=0.0, max_count=k.local_max_counts())
    assert not torch.equal(k.weights.detach(), original)
    with pytest.warns(RuntimeWarning, match="skipped"):
        (k(IDX, OFF).sum() * float("nan")).backward()
    assert torch.equal(k.weights.detach(), original), "the perturbed rows must be restored"
    assert k.optimizer_step == 2
    # a non-finite capture pass: nothing captured, and the pass after it updates nothing
    k.capture_next_backward()
    with pytest.warns(RuntimeWarning, match="refused"):
        (k(IDX, OFF).sum() * float("inf")).backward()
    assert not k._capture_next and k.captured == []
    before = state_of(k)
    k(IDX, OFF).sum().backward()  # Helen's second pass of the refused step
    assert_same(before, state_of(k))
    assert k.optimizer_step == 3
    k(IDX, OFF).sum().backward()  # a plain step trains again
    assert not torch.equal(before["weights"], k.weights.detach())
