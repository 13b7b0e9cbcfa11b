"""The Triton backend (kernels/triton_rows.py) on CPU, in Triton's interpreter
(``TRITON_INTERPRET=1``): against the independent references of test_parity.py with
the same tolerances (FBGEMM's fused row-wise Adagrad, PyTorch's SparseAdam, the dense
METHODS.md reference), and against the eager chain for the rules those do not cover.

The interpreter runs every Triton program in Python, so the batches are small and the
runs short (a few steps): the parity tests' own bodies run here with fewer steps.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from .triton_interpreter import use_triton_interpreter

use_triton_interpreter()  # before anything imports triton

import torchrec_adaptive as tra  # noqa: E402
from torchrec_adaptive import AdaptiveTBE, TableSpec  # noqa: E402
from torchrec_adaptive.kernels.inputs import KernelOptions  # noqa: E402

from . import test_parity as parity  # noqa: E402
from ..batches import zipf_batch  # noqa: E402
from ..reference import almost, relative  # noqa: E402

STEPS = 4  # per epoch of each parity test, in the interpreter
BATCH = 8


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton on CPU tensors: its interpreter (read when triton_kernels is first imported)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def triton_parity(monkeypatch):
    """test_parity's harness with its kernels on the triton backend and short runs."""

    def make_kernel(rule, pooling="sum", seed=0, ftm=parity.FTM, kappas=None, **kw):
        torch.manual_seed(seed)
        kappas = kappas or [1.0] * len(parity.ROWS)
        specs = [TableSpec(f"t{i}", n, d, lr_multiplier=kap)
                 for i, (n, d, kap) in enumerate(zip(parity.ROWS, parity.DIMS, kappas))]
        k = AdaptiveTBE(specs, rule, feature_table_map=ftm, pooling=pooling, backend="triton", **kw)
        assert k.update_path().backend == "triton", "the update path under test was not the one used"
        return k

    batches = parity.batches

    def short_batches(steps=STEPS, **kw):
        return batches(steps=min(steps, STEPS), **kw)

    monkeypatch.setattr(parity, "make_kernel", make_kernel)
    monkeypatch.setattr(parity, "batches", short_batches)
    monkeypatch.setattr(parity, "B", BATCH)
    monkeypatch.setitem(parity._PATH, "fused", False)  # the controls are checked by the CPU runs
    return parity


# The parity tests whose tolerances hold for these short runs on every backend (the
# others are sized for 100 steps of batch 64: at 4 steps of 8, tiny second moments make
# their relative checks fail on the eager chain too); the rest of the rules are checked
# against the eager chain below, which test_parity checks against the references.
def test_rowwise_adagrad_matches_fbgemm_fused(triton_parity):
    triton_parity.test_rowwise_adagrad_matches_fbgemm_fused("sum", True)


def test_adamar_matches_dense_reference(triton_parity):
    triton_parity.test_adamar_matches_dense_reference("linear")


def test_fal_ratio_threshold_matches_dense_reference(triton_parity):
    triton_parity.test_fal_ratio_threshold_matches_dense_reference(1)


def test_per_table_lr_multiplier_matches_dense_reference(triton_parity):
    triton_parity.test_per_table_lr_multiplier_matches_dense_reference()


def test_fbgemm_interval_with_fal_and_kappa_matches_fbgemm_semantics(triton_parity):
    triton_parity.test_fbgemm_interval_matches_fbgemm_semantics(True)


ROWS, DIMS, FTM = [60, 30, 90], [8, 4, 8], [0, 1, 2, 0]


def _pair(rule, **kw) -> list[AdaptiveTBE]:
    out = []
    for backend in ("eager", "triton"):
        torch.manual_seed(0)
        specs = [TableSpec(f"t{i}", n, d, lr_multiplier=1.0 + i) for i, (n, d) in enumerate(zip(ROWS, DIMS))]
        out.append(AdaptiveTBE(specs, rule, feature_table_map=FTM, backend=backend, **kw))
    return out


def _train(kernels, steps=4, weighted=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = zipf_batch(ROWS, FTM, BATCH, 4, g, weighted=weighted)
        target = torch.randn(BATCH, sum(DIMS[t] for t in FTM), generator=g)
        for k in kernels:
            out = k(b.indices, b.offsets, b.per_sample_weights)
            (0.5 * ((out - target) ** 2).sum()).backward()


def _assert_same(eager, tri):
    assert almost(eager.weights.detach(), tri.weights.detach()) <= 1e-6
    per_element = {s.name for s in tri.chain.slots() if s.per_element}
    for t, (a, b) in enumerate(zip(eager.get_optimizer_state(), tri.get_optimizer_state())):
        for name in a:
            if name in per_element:  # moments: signed, compared absolutely as in test_parity
                assert almost(a[name], b[name]) <= 1e-6, (t, name)
            elif a[name].dtype == torch.float32 or (a[name].is_floating_point() and a[name].frac().any()):
                assert relative(a[name], b[name], floor=1e-30) <= 1e-5, (t, name)  # Adagrad's sums, decayed counts
            else:
                assert torch.equal(a[name], b[name]), (t, name)  # last steps, whole (float64) counts: exact
    assert eager.optimizer_step == tri.optimizer_step
    assert any(b.abs().sum() > 0 for n, b in tri.named_buffers() if n.startswith("state_")), "nothing was trained"


@pytest.mark.parametrize("rule,pooling,weighted", [
    (tra.Adam.rule_config(lr=0.02, fal_tau=3.0, count_half_life=2.0), "mean", False),
    (tra.AdamAR.rule_config(lr=0.02, alpha=0.05, decay="exponential", weight_decay=0.01), "sum", True),
    (tra.RowWiseAdagrad.rule_config(lr=0.05, weight_decay=0.01), "mean", False),
    (tra.RowWiseAdagrad.rule_config(lr=0.05, weight_decay=0.01, weight_decay_mode="decoupled"), "sum", True),
    (tra.RowWiseRMSpropAR.rule_config(lr=0.05, ar_alpha=0.5, min_shrinkage=0.2), "sum", False),
], ids=["adam_fal_halflife_mean", "adamar_exp_wd_weighted", "adagrad_l2_mean", "adagrad_decoupled_weighted",
        "rmsprop_ar"])
def test_triton_matches_eager_chain(rule, pooling, weighted):
    """Every rule the kernels run, on two dim groups with per-table kappas: the same
    weights and state as the eager chain (which test_parity checks against the references)."""
    eager, tri = _pair(rule, pooling=pooling)
    assert tri.update_path().backend == "triton" and eager.update_path().backend == "eager"
    _train([eager, tri], weighted=weighted)
    _assert_same(eager, tri)


def test_backend_option_is_validated_and_chosen_by_device():
    with pytest.raises(ValueError, match="backend must be one of"):
        KernelOptions(backend="gpu")
    with pytest.raises(ValueError, match="sync_check_interval"):
        KernelOptions(sync_check_interval=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        AdaptiveTBE([TableSpec("t", 4, 4)], tra.Adam.rule_config(), backend="cuda")
    k = AdaptiveTBE([TableSpec("t", 4, 4)], tra.Adam.rule_config())
    assert k.update_path().backend == "cpu"  # the default on CPU
    k.double()  # the path is planned per device and dtype at each step, not once in __init__
    assert k.update_path().backend == "eager"
    k.float()
    assert k.update_path().backend == "cpu"


def test_a_backend_that_cannot_run_falls_back_to_eager_with_a_warning():
    k = AdaptiveTBE([TableSpec("t", 4, 4)], tra.Adam.rule_config(), backend="triton").double()
    with pytest.warns(RuntimeWarning, match=r"'triton' backend cannot run Adam.*float64.*eager chain.*host syncs"):
        assert k.update_path().backend == "eager"


def test_cpu_backend_without_interpreter_is_refused_for_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    k = AdaptiveTBE([TableSpec("t", 4, 4)], tra.Adam.rule_config(), backend="triton")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert k.update_path().backend == "eager"
    assert os.environ.get("TRITON_INTERPRET") is None


_COMPILE = '''
import triton
from triton.backends.compiler import GPUTarget
from torchrec_adaptive.kernels import triton_kernels as tk

rows = {"ROWS": "*i64", "ROW_OFF": "*i64", "BAGS": "*i64", "LW": "*fp32", "BAG_GRADS": "*fp32", "LR": "*fp32",
        "KEEP": "*fp32", "N_VALID": "*i64", "D": "i32"}
flags = {"HAS_LW": "constexpr", "HAS_KEEP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
scalars = {tk.adam_rows: ("one_b1", "beta2", "one_b2", "eps", "inv_bc1", "inv_bc2s"),
           tk.rowwise_adagrad_rows: ("eps", "l2", "acc_decay", "sq_scale")}
buffers = {tk.adam_rows: ("W", "M", "V"), tk.rowwise_adagrad_rows: ("W", "ACC")}
for fn in scalars:
    sig = {**{b: "*fp32" for b in buffers[fn]}, **rows, **{s: "fp32" for s in scalars[fn]}, **flags}
    for weighted in (False, True):
        consts = {"HAS_LW": weighted, "HAS_KEEP": not weighted, "BLOCK_R": 32, "BLOCK_D": 64}
        triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
for dtype in ("*i64", "*fp64", "*fp32"):
    sig = {"DST": dtype, "ROWS": "*i64", "VALUES": dtype, "N_VALID": "*i64", "BLOCK": "constexpr"}
    triton.compile(triton.compiler.ASTSource(fn=tk.store_rows, signature=sig, constexprs={"BLOCK": 256}),
                   target=GPUTarget("cuda", 90, 32))
print("compiled")
'''


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter accepts code the compiler refuses, so every kernel variant is also
    compiled (not run) down to a cubin for an H100 (sm_90); no GPU is needed for that."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
