"""The triton backend compiled and run on a CUDA GPU (``gpu``-marked; skipped without one):
the same weights and state as the eager chain after 100 steps for every rule, and a
steady-state step that CUDA itself finds free of host syncs
(``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronizing call).

Runs in a subprocess: the CPU tests of test_triton.py / test_sync.py switch Triton to
its interpreter for the whole pytest process, which must not apply to these kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

_SCRIPT = r'''
import json, torch
import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec

ROWS, DIMS, FTM, B = [1000, 500, 2000, 300], [16, 8, 16, 4], [0, 1, 2, 3, 0], 256
RULES = {
    "adam": tra.Adam.rule_config(lr=0.01, weight_decay=0.01),
    "adamar_linear": tra.AdamAR.rule_config(lr=0.01, alpha=0.01),
    "adamar_exponential": tra.AdamAR.rule_config(lr=0.01, alpha=0.01, decay="exponential"),
    "adamar_fbgemm": tra.AdamAR.rule_config(lr=0.05, alpha=1.0, interval="fbgemm", min_shrinkage=0.3),
    "fal_adamar": tra.AdamAR.rule_config(lr=0.01, alpha=0.01, fal_tau=0.5, fal_tau_is_ratio=True,
                                         fal_tau_refresh_steps=7, count_half_life=5.0, lr_multiplier=2.0),
    "rowwise_adagrad": tra.RowWiseAdagrad.rule_config(lr=0.05, weight_decay=0.01),
    "rowwise_adagrad_decoupled": tra.RowWiseAdagrad.rule_config(lr=0.05, weight_decay=0.01,
                                                                weight_decay_mode="decoupled"),
    "rmsprop_ar": tra.RowWiseRMSpropAR.rule_config(lr=0.05, ar_alpha=0.5),
}

def kernel(rule, backend, pooling):
    torch.manual_seed(0)
    specs = [TableSpec(f"t{i}", n, d, lr_multiplier=1.0 + i / 2) for i, (n, d) in enumerate(zip(ROWS, DIMS))]
    return AdaptiveTBE(specs, rule, feature_table_map=FTM, pooling=pooling, backend=backend,
                                       device="cuda")

def batch(g, pooling):
    lengths = torch.randint(0, 5, (len(FTM) * B,), generator=g)
    ids = torch.cat([torch.randint(0, ROWS[t], (int(lengths[f * B:(f + 1) * B].sum()),), generator=g)
                     for f, t in enumerate(FTM)])
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    psw = torch.rand(ids.shape, generator=g) if pooling == "sum" else None
    target = torch.randn(B, sum(DIMS[t] for t in FTM), generator=g)
    return [x.cuda() if x is not None else None for x in (ids, offsets, psw, target)]

def train(k, steps, pooling, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, offsets, psw, target = batch(g, pooling)
        (0.5 * ((k(ids, offsets, psw) - target) ** 2).sum()).backward()

out = {}
for name, rule in RULES.items():
    for pooling in ("sum", "mean"):
        eager, tri = kernel(rule, "eager", pooling), kernel(rule, "triton", pooling)
        assert tri.update_path().backend == "triton"
        train(eager, 100, pooling)
        train(tri, 100, pooling)
        exact = []  # the integer slots (the last step s_r)
        gaps = {"weights": float((eager.weights.detach() - tri.weights.detach()).abs().max())}
        for (n, a), (_, b) in zip(eager.named_buffers(), tri.named_buffers()):
            if n.startswith("state_"):  # relative to the slot's largest value: float32 sums of
                # bag gradients in another order make tiny second moments differ relatively
                if not a.is_floating_point():
                    exact.append(n)
                a, b = a.double(), b.double()
                gaps[n] = float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
        # a steady-state step that CUDA finds free of host syncs
        g = torch.Generator().manual_seed(99)
        ids, offsets, psw, target = batch(g, pooling)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            (0.5 * ((tri(ids, offsets, psw) - target) ** 2).sum()).backward()
            synced = ""
        except RuntimeError as e:
            synced = str(e)[:300]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tri.check_device_flags()
        out[f"{name}-{pooling}"] = {"gaps": gaps, "exact": exact, "synced": synced}
print(json.dumps(out))
'''


def test_triton_on_cuda_matches_eager_and_never_syncs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, r in results.items():
        assert r["synced"] == "", f"{case}: a host sync in a steady-state step: {r['synced']}"
        exact = r["exact"]
        for name, gap in r["gaps"].items():
            limit = 0.0 if name in exact else 1e-5  # weights absolutely, state as above
            assert gap <= limit, (case, name, gap)
