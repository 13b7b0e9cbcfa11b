"""Our kernel against independent references: FBGEMM's fused kernel, PyTorch's
SparseAdam, and the dense METHODS.md reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.kernels import cpu_isa

from ..batches import zipf_batch
from ..reference import DenseRule, almost, relative, dense_forward, occurrences, rowwise_adagrad_dense

ROWS = [1000, 500, 2000, 300]
DIMS = [16, 8, 16, 4]
FTM = [0, 1, 2, 3, 0]  # feature 4 shares table 0: duplicates across features too
STEPS = 100
B = 64


# FBGEMM 1.8.0's CPU row-wise Adagrad fails when two features share a table
# ("num of rows processed by adagrad: 0 does not match c_block size"), so the
# FBGEMM comparison uses one feature per table; the shared case is covered below.
FTM_FBGEMM = [0, 1, 2, 3]


_PATH: dict = {"fused": True, "isa": None}
# The AVX2 build of the loops too, where this CPU runs a higher one (AVX-512): every
# test once more through it. The default (SSE2) build is checked against the eager chain
# in test_cpu_variants.py, to keep the suite short.
_LOWER = ["fused-cpu-loops-avx2"] if cpu_isa.detected() == "avx512" else []


@pytest.fixture(autouse=True, params=["fused-cpu-loops", "eager-chain", *_LOWER])
def update_path(request, monkeypatch):
    """Every parity test runs through the compiled CPU loops (the build for this CPU,
    and the AVX2 one on an AVX-512 CPU) and through the eager chain (the
    device-agnostic path CUDA uses)."""
    _PATH["fused"] = request.param.startswith("fused-cpu-loops")
    _PATH["isa"] = request.param.removeprefix("fused-cpu-loops-") if request.param in _LOWER else cpu_isa.detected()
    monkeypatch.setenv(cpu_isa.ENV, _PATH["isa"])
    yield


def make_kernel(rule, pooling="sum", seed=0, ftm=FTM, kappas=None, **kw) -> AdaptiveTBE:
    torch.manual_seed(seed)
    kappas = kappas or [1.0] * len(ROWS)
    specs = [TableSpec(f"t{i}", n, d, lr_multiplier=kap) for i, (n, d, kap) in enumerate(zip(ROWS, DIMS, kappas))]
    k = AdaptiveTBE(specs, rule, feature_table_map=ftm, pooling=pooling, fused=_PATH["fused"], **kw)
    assert (k._fused is not None) == _PATH["fused"], "the update path under test was not the one used"
    assert k._fused is None or k._fused.isa == _PATH["isa"], "the CPU build under test was not the one used"
    return k


def batches(steps=STEPS, weighted=False, seed=1, index_dtype=torch.int64, max_pooling=5, ftm=FTM):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = zipf_batch(ROWS, ftm, B, max_pooling, g, weighted=weighted, index_dtype=index_dtype)
        target = torch.randn(B, sum(DIMS[t] for t in ftm), generator=g)
        yield b, target


def loss_fn(out, target):
    return 0.5 * ((out - target) ** 2).sum()


# per-sample weights need SUM pooling (in FBGEMM, PyTorch and our kernel)
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_rowwise_adagrad_matches_fbgemm_fused(pooling, weighted):
    lr, eps = 0.05, 1e-8
    ours = make_kernel(tra.RowWiseAdagrad.rule_config(lr=lr, eps=eps), pooling=pooling, ftm=FTM_FBGEMM)
    fb = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(n, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for n, d in zip(ROWS, DIMS)],
        feature_table_map=FTM_FBGEMM,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
        pooling_mode=PoolingMode.SUM if pooling == "sum" else PoolingMode.MEAN,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
    )
    for w_fb, w_ours in zip(fb.split_embedding_weights(), ours.split_embedding_weights()):
        w_fb.copy_(w_ours)
    for b, target in batches(weighted=weighted, ftm=FTM_FBGEMM):
        out_fb = fb(b.indices, b.offsets, per_sample_weights=b.per_sample_weights)
        out_ours = ours(b.indices, b.offsets, b.per_sample_weights)
        assert almost(out_fb, out_ours) <= 1e-5
        loss_fn(out_fb, target).backward()
        loss_fn(out_ours, target).backward()
    for t, (w_fb, w_ours) in enumerate(zip(fb.split_embedding_weights(), ours.split_embedding_weights())):
        assert almost(w_fb, w_ours) <= 1e-5, f"table {t}"
    states_fb = fb.get_optimizer_state()
    for t, st in enumerate(ours.get_optimizer_state()):
        # float32 sums of up to ~100 terms: relative rounding ~1e-6 on every touched row
        assert relative(states_fb[t]["sum"], st["momentum1"], floor=1e-30) <= 1e-5, f"table {t}"
        assert st["momentum1"].count_nonzero() > 0


def _sparse_adam_reference(lr, betas, eps, seed=0):
    """One nn.EmbeddingBag(sparse=True) per table, PyTorch's SparseAdam."""
    ref_kernel = make_kernel(tra.Adam.rule_config(lr=lr), seed=seed)
    bags = [torch.nn.Parameter(w.clone()) for w in ref_kernel.split_embedding_weights()]
    return bags, torch.optim.SparseAdam(bags, lr=lr, betas=betas, eps=eps)


@pytest.mark.parametrize(
    "lr,eps,tol",
    [
        # METHODS.md's setting: the eps placements differ, and agree to 1e-5 at eps=1e-8.
        (1e-3, 1e-8, 1e-5),
        # eps out of the way: the algorithms themselves agree to float rounding.
        (1e-2, 1e-12, 1e-6),
    ],
)
def test_adam_matches_torch_sparse_adam(lr, eps, tol):
    betas = (0.9, 0.999)
    ours = make_kernel(tra.Adam.rule_config(lr=lr, betas=betas, eps=eps))
    tables, opt = _sparse_adam_reference(lr, betas, eps)
    for b, target in batches():
        outs = []
        for f, (idx, off, w) in enumerate(b.feature_slices(len(FTM))):
            outs.append(torch.nn.functional.embedding_bag(idx, tables[FTM[f]], off, mode="sum",
                                                          include_last_offset=True, sparse=True))
        out_ref = torch.cat(outs, dim=1)
        opt.zero_grad()
        loss_fn(out_ref, target).backward()
        opt.step()
        loss_fn(ours(b.indices, b.offsets), target).backward()
    for t, (ref, mine) in enumerate(zip(tables, ours.split_embedding_weights())):
        assert almost(ref.detach(), mine) <= tol, f"table {t}"
    for t, st in enumerate(ours.get_optimizer_state()):
        # The moments inherit the (tol-sized) weight differences through the gradients.
        # exp_avg_sq is compared relative to its own size (it spans 1e-10 .. 1 here), so a
        # small one cannot hide a 100 % error; exp_avg is signed and cancels, so absolutely.
        ref_m, ref_v = opt.state[tables[t]]["exp_avg"].to_dense(), opt.state[tables[t]]["exp_avg_sq"].to_dense()
        assert almost(ref_m, st["momentum1"]) <= 10 * tol, f"table {t} momentum1 (exp_avg)"
        assert relative(ref_v, st["exp_avg_sq"], floor=1e-30) <= 10 * tol, f"table {t} exp_avg_sq"


def test_adamar_alpha_zero_equals_adam_exactly():
    a = make_kernel(tra.Adam.rule_config(lr=0.01))
    b = make_kernel(tra.AdamAR.rule_config(lr=0.01, alpha=0.0))
    for batch, target in batches(steps=30):
        loss_fn(a(batch.indices, batch.offsets), target).backward()
        loss_fn(b(batch.indices, batch.offsets), target).backward()
    for wa, wb in zip(a.split_embedding_weights(), b.split_embedding_weights()):
        assert torch.equal(wa, wb)


def _dense_refs(init, ref_kwargs, kappas):
    kappas = kappas or [1.0] * len(ROWS)
    rule_kappa = ref_kwargs.get("lr_multiplier", 1.0)
    kw = {k: v for k, v in ref_kwargs.items() if k != "lr_multiplier"}
    return [DenseRule(w.clone(), lr_multiplier=rule_kappa * kap, **kw) for w, kap in zip(init, kappas)]


def _run_against_dense(rule_kwargs, ref_kwargs, pooling="sum", weighted=False, epochs=(1,), steps=STEPS,
                       cls=tra.AdamAR, kappas=None, control=None, control_kappas=None):
    """Trains our kernel and the dense reference on the same batches and compares weights and
    every state. ``control``: reference kwargs that differ only in what the test is about
    (alpha=0, no FAL, ...; ``control_kappas``: other table kappas); the control must end far
    from the reference, or the comparison could not tell the feature from its absence."""
    ours = make_kernel(cls.rule_config(**rule_kwargs), pooling=pooling, kappas=kappas)
    init = [w.clone() for w in ours.split_embedding_weights()]
    runs = [_dense_refs(init, ref_kwargs, kappas)]
    control = control if _PATH["fused"] else None  # a property of the reference: checked once
    if control:
        runs.append(_dense_refs(init, control, control_kappas or kappas))
    k = 0
    for epoch in epochs:
        ours.set_epoch(epoch)
        for b, target in batches(steps=steps // len(epochs), weighted=weighted, seed=epoch):
            k += 1
            occ = occurrences(b, FTM, ROWS)
            for refs in runs:
                tables = [r.weight.clone().requires_grad_(True) for r in refs]
                loss_fn(dense_forward(tables, b, FTM, pooling), target).backward()
                for r, tab, o in zip(refs, tables, occ):
                    r.step(tab.grad, o, k, epoch)
            loss_fn(ours(b.indices, b.offsets, b.per_sample_weights), target).backward()
    refs = runs[0]
    states = ours.get_optimizer_state()
    for t, (r, w) in enumerate(zip(refs, ours.split_embedding_weights())):
        assert almost(r.weight, w) <= 1e-5, f"table {t} weights"
        assert almost(r.m, states[t]["momentum1"]) <= 1e-6, f"table {t} momentum1 (exp_avg)"
        # relative to its own size (1e-10 .. 1), so a small one cannot hide a 100 % error;
        # the weights' ~1e-5 (relative ~1e-4) differences reach it through g^2
        assert relative(r.v, states[t]["exp_avg_sq"], floor=1e-30) <= 1e-3, f"table {t} exp_avg_sq"
        assert torch.equal(r.s, states[t]["prev_iter"]), f"table {t} last step"
        if r.half_life > 0:
            assert relative(r.c, states[t]["row_count"], floor=1e-30) <= 1e-6, f"table {t} count"
        else:  # whole numbers: exact
            assert torch.equal(r.c.double(), states[t]["row_count"].double()), f"table {t} count"
    if control:
        gap = max(almost(a.weight, b.weight) for a, b in zip(refs, runs[1]))
        assert gap > 100 * 1e-5, f"the control {control} ends {gap:.2g} from the reference: the test would be vacuous"
    return ours, refs


@pytest.mark.parametrize("decay", ["linear", "exponential"])
def test_adamar_matches_dense_reference(decay):
    kw = {"lr": 0.01, "alpha": 0.01, "decay": decay, "weight_decay": 0.001}
    # the decay must have acted: without it (alpha = 0) the reference ends elsewhere
    _run_against_dense(kw, kw, weighted=True, control={**kw, "alpha": 0.0})


def test_adamar_mean_pooling_matches_dense_reference():
    kw = {"lr": 0.01, "alpha": 0.05}
    _run_against_dense(kw, kw, pooling="mean", control={**kw, "alpha": 0.0})


def test_fal_on_adamar_matches_dense_reference_across_epochs():
    kw = {"lr": 0.01, "alpha": 0.01, "fal_tau": 4.0, "fal_power": 2.0, "fal_min": 0.1, "fal_epoch_decay": 0.5}
    control = {k: v for k, v in kw.items() if not k.startswith("fal_")}
    _run_against_dense(kw, kw, epochs=(1, 2, 3), steps=60, control=control)


def test_fal_on_adam_with_count_half_life_matches_dense_reference():
    kw = {"lr": 0.01, "fal_tau": 3.0, "count_half_life": 5.0}
    ref = {"lr": 0.01, "fal_tau": 3.0, "half_life": 5.0}
    _run_against_dense(kw, ref, cls=tra.Adam, steps=40, control={"lr": 0.01, "fal_tau": 3.0})


@pytest.mark.parametrize("refresh", [1, 7])
def test_fal_ratio_threshold_matches_dense_reference(refresh):
    """tau = the 0.6-quantile of each table's nonzero counts (numpy in the reference),
    re-estimated every ``refresh`` steps and at each epoch; the 0.2-quantile as control."""
    kw = {"lr": 0.01, "alpha": 0.01, "fal_tau": 0.6, "fal_tau_is_ratio": True, "fal_tau_refresh_steps": refresh}
    _run_against_dense(kw, kw, epochs=(1, 2), steps=40, control={**kw, "fal_tau": 0.2})


def test_per_table_lr_multiplier_matches_dense_reference():
    """kappa_t per table (t0 and t2 share a dim group with different kappas: the per-row
    branch of the kernel's learning rates), times the rule's own lr_multiplier; alpha is
    the same throughout. The control ignores the tables' kappas, so a kernel ignoring
    them (or taking one kappa per dim group) fails."""
    kw = {"lr": 0.01, "alpha": 0.01, "lr_multiplier": 1.5}
    ours, _ = _run_against_dense(kw, kw, kappas=[1.0, 0.5, 3.0, 2.0], steps=40, control=kw, control_kappas=[1.0] * 4)
    (g16,) = [g for g in ours.layout.groups if g.dim == 16]
    assert sorted(g16.tables) == [0, 2], "t0 and t2 must share a dim group for the mixed-kappa branch"


@pytest.mark.parametrize("with_fal_and_kappa", [False, True])
def test_fbgemm_interval_matches_fbgemm_semantics(with_fal_and_kappa):
    """interval="fbgemm" as FBGEMM's rowwise_rmsprop_ar shrinks: max(min_shrinkage,
    1 - clip(lr alpha Delta, 0, 1)), Delta = k - s_r (1 on first touch), lr the optimizer's
    own learning rate -- not the row's lr after FAL and kappa_t. (FBGEMM's compiled op itself
    checks the same decay transform in tests/kernels/test_rmsprop_ar_fbgemm.py.)"""
    # lr alpha = 0.05: rows idle for 14+ steps shrink to min_shrinkage, 20+ would be zeroed without it
    kw = {"lr": 0.05, "alpha": 1.0, "min_shrinkage": 0.3}
    extra = {"fal_tau": 4.0, "fal_min": 0.1, "lr_multiplier": 2.0} if with_fal_and_kappa else {}
    kappas = [1.0, 0.5, 3.0, 2.0] if with_fal_and_kappa else None
    _run_against_dense({**kw, **extra, "interval": "fbgemm"}, {**kw, **extra, "decay": "fbgemm"}, steps=40,
                       kappas=kappas, control={**kw, **extra, "alpha": 0.0})


def test_adamar_decays_a_skipped_row_exactly():
    """A row touched at steps 1 and 1+I+1 is decayed by exactly min(1, alpha I) or (1-alpha)^I."""
    for decay, expect in [("linear", lambda a, i: 1 - min(1.0, a * i)), ("exponential", lambda a, i: (1 - a) ** i)]:
        alpha, skipped = 0.03, 7
        k = AdaptiveTBE([TableSpec("t", 10, 4)], tra.AdamAR.rule_config(lr=0.0, alpha=alpha, decay=decay),
                                        fused=_PATH["fused"])
        assert (k._fused is not None) == _PATH["fused"], "the update path under test was not the one used"
        w0 = k.split_embedding_weights()[0][3].clone()
        hit = (torch.tensor([3]), torch.tensor([0, 1]))
        other = (torch.tensor([5]), torch.tensor([0, 1]))
        k(*hit).sum().backward()  # step 1: first touch, I = 0
        for _ in range(skipped):
            k(*other).sum().backward()
        k(*hit).sum().backward()  # I = skipped
        ratio = k.split_embedding_weights()[0][3] / w0
        assert torch.allclose(ratio, torch.full_like(ratio, expect(alpha, skipped)), atol=1e-6), decay


@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_rowwise_adagrad_weight_decay_is_not_dropped_on_cpu(mode):
    """FBGEMM's CPU fast path ignores weight_decay; ours must honour it (METHODS.md)."""
    lr, eps, wd = 0.05, 1e-8, 0.01
    ours = make_kernel(tra.RowWiseAdagrad.rule_config(lr=lr, eps=eps, weight_decay=wd, weight_decay_mode=mode))
    ws = [w.clone() for w in ours.split_embedding_weights()]
    accs = [torch.zeros(n) for n in ROWS]
    for b, target in batches(steps=30):
        tables = [w.clone().requires_grad_(True) for w in ws]
        loss_fn(dense_forward(tables, b, FTM, "sum"), target).backward()
        for t, o in enumerate(occurrences(b, FTM, ROWS)):
            ws[t], accs[t] = rowwise_adagrad_dense(ws[t], accs[t], tables[t].grad, o, lr, eps, wd, mode)
        loss_fn(ours(b.indices, b.offsets), target).backward()
    no_decay = make_kernel(tra.RowWiseAdagrad.rule_config(lr=lr, eps=eps))
    for b, target in batches(steps=30):
        loss_fn(no_decay(b.indices, b.offsets), target).backward()
    for t, w in enumerate(ours.split_embedding_weights()):
        assert almost(ws[t], w) <= 1e-5
        assert almost(w, no_decay.split_embedding_weights()[t]) > 1e-4, "weight decay had no effect"


def test_int32_indices_and_offsets_give_the_same_result():
    a = make_kernel(tra.AdamAR.rule_config(lr=0.01))
    b = make_kernel(tra.AdamAR.rule_config(lr=0.01))
    for (b64, t), (b32, _) in zip(batches(steps=10), batches(steps=10, index_dtype=torch.int32)):
        assert b32.indices.dtype == torch.int32
        loss_fn(a(b64.indices, b64.offsets), t).backward()
        loss_fn(b(b32.indices, b32.offsets), t).backward()
    for wa, wb in zip(a.split_embedding_weights(), b.split_embedding_weights()):
        assert torch.equal(wa, wb)
