"""``RowWiseRMSpropAR`` against FBGEMM's own compiled ``ROWWISE_RMSPROP_AR`` op.

FBGEMM fused the AdamAR paper's Algorithm 2 as a row-wise RMSprop with an adaptive decay
(pytorch/FBGEMM PR #5949). The compiled CPU op is in our pinned fbgemm-gpu(-cpu) 1.8.0, but
1.8.0 has no ``EmbOptimType`` for it and its Python invoker does not pass the optimizer's
floats (``ar_alpha``, ``ema_beta``, ``min_shrinkage``; the front end arrived in 1.9.0). So
:class:`FbgemmRMSpropAR` calls the op directly with the argument lists 1.9.0's invoker
builds, over a stock TBE's weight layout, and keeps the two states FBGEMM 1.9.0 allocates
for it (``momentum1`` and ``prev_iter``, one float per row each).

This is the first oracle for the adaptive-decay part that is not our own code: the decay
transform (``add_adaptive_row_decay(mode="fbgemm")``) is the one AdamAR uses with
``interval="fbgemm"``.
"""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen
from torch import Tensor

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec

from ..batches import zipf_batch
from ..reference import almost

ROWS = [1000, 500, 2000, 300]
DIMS = [16, 8, 16, 4]
# FBGEMM 1.8.0's CPU backward fails when two features share a table (see test_parity.py).
FTM = [0, 1, 2, 3]
STEPS, B = 100, 64


class FbgemmRMSpropAR:
    """FBGEMM's ROWWISE_RMSPROP_AR on CPU: the compiled op over a stock TBE's buffers."""

    def __init__(self, lr: float, eps: float, ar_alpha: float, ema_beta: float, min_shrinkage: float,
                 pooling: str) -> None:
        # Any row-wise optimizer gives the weight layout and the row-wise state layout we need.
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(n, d, EmbeddingLocation.HOST, ComputeDevice.CPU) for n, d in zip(ROWS, DIMS)],
            feature_table_map=FTM,
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=lr,
            pooling_mode=PoolingMode.SUM if pooling == "sum" else PoolingMode.MEAN,
            weights_precision=SparseType.FP32,
            output_dtype=SparseType.FP32,
        )
        self.pooling = PoolingMode.SUM if pooling == "sum" else PoolingMode.MEAN
        self.momentum1 = torch.zeros_like(self.tbe.momentum1_host)
        self.prev_iter = torch.zeros_like(self.tbe.momentum1_host)  # float32, as FBGEMM keeps it
        self.lr = torch.tensor(lr, dtype=torch.float32)
        self.optim_float = [eps, ar_alpha, ema_beta, min_shrinkage]  # the order of 1.9.0's invoker
        self.iter = 0

    def split_embedding_weights(self) -> list[Tensor]:
        return self.tbe.split_embedding_weights()

    def row_state(self, state: Tensor) -> list[Tensor]:
        """Per table, its rows of a row-wise state (momentum1's offsets, which prev_iter shares)."""
        offs = self.tbe.momentum1_offsets.tolist()
        return [state[o : o + n] for o, n in zip(offs, ROWS)]

    def __call__(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None) -> Tensor:
        self.iter += 1  # TBE increments its step before each training forward
        t = self.tbe
        state_layout = [t.momentum1_placements, t.momentum1_offsets]
        return torch.ops.fbgemm.split_embedding_codegen_lookup_rowwise_rmsprop_ar_function_pt2(
            placeholder_autograd_tensor=t.placeholder_autograd_tensor,
            weights=[t.weights_host, t.weights_placements, t.weights_offsets],
            D_offsets=t.D_offsets, total_D=t.total_D, max_D=t.max_D,
            hash_size_cumsum=t.hash_size_cumsum, total_hash_size_bits=t.total_hash_size_bits,
            indices=indices, offsets=offsets, pooling_mode=int(self.pooling),
            indice_weights=per_sample_weights, feature_requires_grad=None, output_dtype=int(SparseType.FP32.as_int()),
            # B_offsets, vbe_output_offsets_feature_rank, vbe_B_offsets_rank_per_feature,
            # lxu_cache_locations, uvm_cache_stats, prev_iter_dev, vbe_output_offsets
            aux_tensor=[None, None, None, t.lxu_cache_locations_empty, None, torch.empty(0), None],
            aux_int=[self.iter, t.info_B_num_bits, t.info_B_mask],
            aux_float=[0.0, 0.0],  # gwd_lower_bound, max_gradient
            # is_experimental, use_uniq_cache_locations_bwd, use_homogeneous_placements,
            # apply_global_weight_decay, gradient_clipping, stochastic_rounding, mixed_D
            aux_bool=[False, False, True, False, False, False, True],
            momentum1=[self.momentum1, *state_layout],
            prev_iter=[self.prev_iter, *state_layout],
            learning_rate_tensor=self.lr,
            optim_float=self.optim_float,
        )


def _batches(weighted: bool, seed: int = 1, max_pooling: int = 5, steps: int = STEPS):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = zipf_batch(ROWS, FTM, B, max_pooling, g, weighted=weighted)
        yield b, torch.randn(B, sum(DIMS), generator=g)


def _loss(out: Tensor, target: Tensor) -> Tensor:
    return 0.5 * ((out - target) ** 2).sum()


def _ours(kwargs: dict, pooling: str, fused: bool = False) -> AdaptiveTBE:
    torch.manual_seed(0)
    specs = [TableSpec(f"t{i}", n, d) for i, (n, d) in enumerate(zip(ROWS, DIMS))]
    k = AdaptiveTBE(specs, tra.RowWiseRMSpropAR.rule_config(**kwargs), feature_table_map=FTM,
                                    pooling=pooling, fused=fused)
    assert (k._fused is not None) == fused, "the update path under test was not the one used"
    return k


# alpha such that lr * alpha * I spans "hardly decays" to "hits min_shrinkage" over the
# Zipf tail's idle gaps (I up to ~100); 0 is plain row-wise RMSprop.
CASES = [
    ("sum", False, {"lr": 0.05, "ar_alpha": 0.5, "ema_beta": 0.99, "min_shrinkage": 0.1}),
    ("sum", True, {"lr": 0.05, "ar_alpha": 0.5, "ema_beta": 0.9, "min_shrinkage": 0.3}),
    ("mean", False, {"lr": 0.02, "ar_alpha": 2.0, "ema_beta": 0.99, "min_shrinkage": 0.0}),
    ("sum", False, {"lr": 0.05, "ar_alpha": 0.0, "ema_beta": 0.99, "min_shrinkage": 0.1}),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
@pytest.mark.parametrize("pooling,weighted,kwargs", CASES, ids=["sum", "weighted", "mean-no-floor", "alpha0"])
def test_rowwise_rmsprop_ar_matches_fbgemm_op(pooling: str, weighted: bool, kwargs: dict, fused: bool) -> None:
    ours = _ours({**kwargs, "eps": 1e-8}, pooling, fused)
    fb = FbgemmRMSpropAR(eps=1e-8, pooling=pooling, **kwargs)
    with torch.no_grad():
        for w_fb, w_ours in zip(fb.split_embedding_weights(), ours.split_embedding_weights()):
            w_fb.copy_(w_ours)
    w0 = [w.clone() for w in ours.split_embedding_weights()]
    for b, target in _batches(weighted):
        out_fb = fb(b.indices, b.offsets, b.per_sample_weights)
        out_ours = ours(b.indices, b.offsets, b.per_sample_weights)
        assert almost(out_fb, out_ours) <= 1e-5
        _loss(out_fb, target).backward()
        _loss(out_ours, target).backward()
    states = ours.get_optimizer_state()
    for t, (w_fb, w_ours) in enumerate(zip(fb.split_embedding_weights(), ours.split_embedding_weights())):
        assert almost(w_fb, w_ours) <= 1e-5, f"table {t}: weights"
        assert not torch.equal(w_ours, w0[t]), f"table {t} never trained"
        # v is O(grad^2); compare it against its own scale, not clamped at 1
        v_fb, v_ours = fb.row_state(fb.momentum1)[t], states[t]["momentum1"]
        assert (v_fb - v_ours).abs().max() <= 1e-5 * v_fb.abs().max(), f"table {t}: momentum1"
        assert torch.equal(fb.row_state(fb.prev_iter)[t].to(torch.int64), states[t]["prev_iter"]), f"table {t}"


def test_decay_is_exercised_by_the_oracle_cases() -> None:
    """The decay must change the result (else the test above would not guard it):
    ar_alpha > 0 differs from plain RMSprop by far more than the tolerance."""
    kw = dict(CASES[0][2])
    plain = _ours({**kw, "ar_alpha": 0.0}, "sum")
    decayed = _ours(kw, "sum")
    for b, target in _batches(False):
        for k in (plain, decayed):
            _loss(k(b.indices, b.offsets), target).backward()
    diff = max(almost(a, b) for a, b in zip(plain.split_embedding_weights(), decayed.split_embedding_weights()))
    assert diff > 1e-2


def test_rowwise_rmsprop_ar_unsharded_optimizer_matches_kernel() -> None:
    """The torch.optim class (unsharded tables with sparse gradients) runs the same rule."""
    kw = {"lr": 0.05, "ar_alpha": 0.5, "min_shrinkage": 0.1}
    kernel = _ours(kw, "sum")
    tables = [torch.nn.Parameter(w.clone()) for w in kernel.split_embedding_weights()]
    opt = tra.RowWiseRMSpropAR(tables, **kw)
    for b, target in _batches(False, steps=40):
        outs = [torch.nn.functional.embedding_bag(idx, tables[FTM[f]], off, mode="sum", include_last_offset=True,
                                                  sparse=True)
                for f, (idx, off, _) in enumerate(b.feature_slices(len(FTM)))]
        opt.zero_grad()
        _loss(torch.cat(outs, dim=1), target).backward()
        opt.step()
        _loss(kernel(b.indices, b.offsets), target).backward()
    for t, (ref, mine) in enumerate(zip(tables, kernel.split_embedding_weights())):
        assert almost(ref.detach(), mine) <= 1e-5, f"table {t}"


def test_rowwise_rmsprop_ar_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="ema_beta"):
        tra.RowWiseRMSpropAR.rule_config(ema_beta=1.0)
    with pytest.raises(ValueError, match="alpha"):
        tra.RowWiseRMSpropAR.rule_config(ar_alpha=-1.0)
    with pytest.raises(ValueError, match="min_shrinkage"):
        tra.RowWiseRMSpropAR.rule_config(min_shrinkage=1.5)
    with pytest.raises(ValueError, match="unknown argument"):
        tra.RowWiseRMSpropAR.rule_config(alpha=0.1)  # FBGEMM's name is ar_alpha
    # lr * ar_alpha * I is what is clipped, so ar_alpha > 1 is meaningful here
    assert tra.RowWiseRMSpropAR.rule_config(ar_alpha=5.0).ar_alpha == 5.0
