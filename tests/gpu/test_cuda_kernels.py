"""Our kernel on a GPU against FBGEMM's fused CUDA kernels, and the Triton backend against the
eager chain on the same GPU (``scripts/gpu_check.sh`` runs these; marked ``gpu``).

FBGEMM runs ``ADAM`` only on CUDA, so this is where our lazy Adam meets FBGEMM's own
(on CPU it is checked against PyTorch's SparseAdam, tests/kernels/test_parity.py). Both
update only the rows a batch touches, with FBGEMM's global ``iter`` as Adam's step: after
100 steps of Zipf batches (shared tables, empty bags) the weights agree to 1e-5.

Skipped without CUDA (``-m "not gpu"`` leaves them out entirely).
"""

from __future__ import annotations

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec

from ..batches import zipf_batch
from ..reference import almost, relative

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (scripts/gpu_check.sh)")]

ROWS = [1000, 500, 2000, 300]
DIMS = [16, 8, 16, 64]
FTM = [0, 1, 2, 3, 0]  # feature 4 shares table 0
STEPS = 100
B = 64
TOL = 1e-5


def _kernel(rule, seed=0, pooling="sum", **kw) -> AdaptiveTBE:
    torch.manual_seed(seed)
    specs = [TableSpec(f"t{i}", n, d) for i, (n, d) in enumerate(zip(ROWS, DIMS))]
    k = AdaptiveTBE(specs, rule, feature_table_map=FTM, pooling=pooling, device="cuda", **kw)
    return k


def _batches(weighted=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        b = zipf_batch(ROWS, FTM, B, 5, g, weighted=weighted)
        target = torch.randn(B, sum(DIMS[t] for t in FTM), generator=g)
        w = b.per_sample_weights.cuda() if b.per_sample_weights is not None else None
        yield b.indices.cuda(), b.offsets.cuda(), w, target.cuda()


def _loss(out, target):
    return 0.5 * ((out - target) ** 2).sum()


def _fbgemm(optimizer: str, pooling: str = "sum", **kw):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                        SplitTableBatchedEmbeddingBagsCodegen)

    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(n, d, EmbeddingLocation.DEVICE, ComputeDevice.CUDA) for n, d in zip(ROWS, DIMS)],
        feature_table_map=FTM, optimizer=getattr(EmbOptimType, optimizer),
        pooling_mode=PoolingMode.SUM if pooling == "sum" else PoolingMode.MEAN,
        weights_precision=SparseType.FP32, output_dtype=SparseType.FP32, device=torch.device("cuda"), **kw)


def _slot(state, *names):
    """Our slot by its name (FBGEMM's ``momentum1`` / ``exp_avg_sq`` after issue 14's rename, before it ours)."""
    for n in names:
        if n in state:
            return state[n]
    raise KeyError(f"none of {names} in {sorted(state)}")


def _train_both(fb, ours, weighted=False):
    for w_fb, w_ours in zip(fb.split_embedding_weights(), ours.split_embedding_weights()):
        w_fb.copy_(w_ours)
    for idx, off, psw, target in _batches(weighted=weighted):
        out_fb = fb(idx, off, per_sample_weights=psw)
        out_ours = ours(idx, off, psw)
        assert almost(out_fb, out_ours) <= TOL
        _loss(out_fb, target).backward()
        _loss(out_ours, target).backward()
    torch.cuda.synchronize()
    for t, (w_fb, w_ours) in enumerate(zip(fb.split_embedding_weights(), ours.split_embedding_weights())):
        assert almost(w_fb, w_ours) <= TOL, f"table {t}: {almost(w_fb, w_ours)}"


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_adam_matches_fbgemm_fused_adam_on_cuda(pooling, weighted):
    lr, eps = 1e-3, 1e-8
    fb = _fbgemm("ADAM", pooling, learning_rate=lr, eps=eps, beta1=0.9, beta2=0.999)
    ours = _kernel(tra.Adam.rule_config(lr=lr, betas=(0.9, 0.999), eps=eps), pooling=pooling)
    _train_both(fb, ours, weighted)
    for t, (theirs, st) in enumerate(zip(fb.get_optimizer_state(), ours.get_optimizer_state())):
        # the moments inherit the TOL-sized weight differences through the gradients
        assert almost(theirs["exp_avg"], _slot(st, "momentum1", "exp_avg")) <= 10 * TOL, f"table {t} m"
        assert relative(theirs["exp_avg_sq"], _slot(st, "exp_avg_sq"), floor=1e-30) <= 10 * TOL, f"table {t} v"


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_rowwise_adagrad_matches_fbgemm_exact_rowwise_adagrad_on_cuda(pooling, weighted):
    lr, eps = 0.05, 1e-8
    fb = _fbgemm("EXACT_ROWWISE_ADAGRAD", pooling, learning_rate=lr, eps=eps)
    ours = _kernel(tra.RowWiseAdagrad.rule_config(lr=lr, eps=eps), pooling=pooling)
    _train_both(fb, ours, weighted)
    for t, (theirs, st) in enumerate(zip(fb.get_optimizer_state(), ours.get_optimizer_state())):
        mine = _slot(st, "momentum1", "momentum")
        assert relative(theirs["sum"], mine, floor=1e-30) <= TOL, f"table {t}"
        assert mine.count_nonzero() > 0


RULES = {
    "adam": (tra.Adam, {"lr": 1e-2}),
    "rowwise_adagrad": (tra.RowWiseAdagrad, {"lr": 0.05}),
    "adamar": (tra.AdamAR, {"lr": 1e-2, "alpha": 1e-2}),
    "adamar_exponential": (tra.AdamAR, {"lr": 1e-2, "alpha": 1e-2, "decay": "exponential"}),
    "fal_adamar": (tra.AdamAR, {"lr": 1e-2, "alpha": 1e-2, "fal_tau": 5.0}),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_triton_backend_matches_the_eager_chain_on_cuda(rule):
    """KernelOptions.backend (issue 10): the Triton kernels against the eager chain, same GPU,
    same batches; the Triton path must really run (no silent fallback to eager)."""
    cls, kwargs = RULES[rule]
    triton = _kernel(cls.rule_config(**kwargs), backend="triton")
    eager = _kernel(cls.rule_config(**kwargs), backend="eager")
    for idx, off, psw, target in _batches(weighted=True):
        _loss(triton(idx, off, psw), target).backward()
        _loss(eager(idx, off, psw), target).backward()
    assert triton.update_path().backend == "triton" and eager.update_path().backend == "eager"
    torch.cuda.synchronize()
    for t, (a, b) in enumerate(zip(triton.split_embedding_weights(), eager.split_embedding_weights())):
        assert almost(b, a) <= TOL, f"table {t}"
    for t, (sa, sb) in enumerate(zip(triton.get_optimizer_state(), eager.get_optimizer_state())):
        for name, ref in sb.items():
            ref, got = ref.double(), sa[name].double()
            # signed states (Adam's m) cancel: absolutely; non-negative ones relative to their own size
            err = almost(ref, got) if bool((ref < 0).any()) else relative(ref, got, floor=1e-30)
            assert err <= 10 * TOL, f"table {t} {name}: {err}"
