"""Evaluation leaves the optimizer step k (and everything else) unchanged, sharded.

METHODS.md: k advances once per training iteration; evaluation forwards never advance
it (FBGEMM's TBE advances its ``iter`` on every forward, no-grad evaluation included,
which shifts Adam's bias corrections and AdamAR's idle gaps). After every training step
the sharded model gets an evaluation pass as the app runs it (``model.eval()`` under
``torch.no_grad()``, apps/dlrm/evaluate.py ``evaluate``) and a training-mode forward that is
never backpropagated; each table's ``<table>.optimizer_step`` must not move, and after
all steps weights and every optimizer state must equal the reference trained without
any evaluation, with k equal to the number of training steps.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

import torchrec_adaptive as ta

from .harness import run_ranks, train_and_compare

pytestmark = pytest.mark.distributed

STEPS, TOL = 6, 1e-5
# AdamAR with FAL: k enters the bias corrections, the idle gaps I_r and (through counts) FAL
KW = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1, "fal_tau": 3.0}


def _steps(model: nn.Module) -> Dict[str, int]:
    return {k: int(v["step"]) for param, states in model.fused_optimizer.state_dict()["state"].items()
            for k, v in states.items() if k.endswith("optimizer_step")}


def _local(model: nn.Module) -> Dict[str, list]:
    """Every local tensor of the model's state dict (a ShardedTensor's local shards), copied."""
    return {k: [s.tensor.clone() for s in v.local_shards()] if isinstance(v, ShardedTensor) else [v.clone()]
            for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def evaluate_in_between(model: nn.Module, kjt: Any) -> None:
    before, weights = _steps(model), _local(model)
    model.eval()
    with torch.no_grad():
        model(kjt)
    model.train()
    model(kjt)  # a forward in training mode whose output is never backpropagated
    assert before and _steps(model) == before, f"an evaluation pass moved the step: {before} -> {_steps(model)}"
    for k, now in _local(model).items():
        assert all(torch.equal(a, b) for a, b in zip(now, weights[k])), f"an evaluation pass changed {k}"


def evaluation_worker(rank: int) -> Dict[str, Any]:
    return {st: train_and_compare(rank, st, ta.AdamAR, KW, STEPS, TOL, after_step=evaluate_in_between)
            for st in ("row_wise", "table_wise", "data_parallel")}


def test_evaluation_leaves_the_step_unchanged() -> None:
    results = run_ranks(evaluation_worker)
    for st in ("row_wise", "table_wise", "data_parallel"):
        assert all(r[st]["checked"] > 0 for r in results), (st, results)
