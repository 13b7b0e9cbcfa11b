"""Helen's two-pass step against a dense single-process PyTorch reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.helen import Helen

from .batches import zipf_batch
from .reference import DenseRule, almost, dense_forward, occurrences

ROWS, DIMS, FTM, B = [200, 80], [8, 4], [0, 1, 0], 16


class Model(nn.Module):
    def __init__(self, rule, fused=True):
        super().__init__()
        torch.manual_seed(0)
        self.emb = AdaptiveTBE([TableSpec(f"t{i}", n, d) for i, (n, d) in enumerate(zip(ROWS, DIMS))],
                                               rule, feature_table_map=FTM, fused=fused)
        assert (self.emb._fused is not None) == fused, "the Helen path under test was not the one used"
        self.head = nn.Linear(sum(DIMS[t] for t in FTM), 1)

    def forward(self, batch):
        return self.head(self.emb(batch.indices, batch.offsets)).squeeze(1)


def data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(zipf_batch(ROWS, FTM, B, 4, g), torch.rand(B, generator=g)) for _ in range(steps)]


def loss_of(pred, y):
    return ((torch.sigmoid(pred) - y) ** 2).mean()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
def test_helen_matches_dense_reference(fused):
    rho, xi, lr = 0.05, 0.2, 0.01
    model = Model(tra.AdamAR.rule_config(lr=lr, alpha=0.01), fused)
    head = copy.deepcopy(model.head)
    tables = [DenseRule(w.clone(), lr=lr, alpha=0.01) for w in model.emb.split_embedding_weights()]
    counts = [torch.zeros(n) for n in ROWS]
    helen = Helen(model, torch.optim.Adam(model.head.parameters(), lr=lr), rho=rho, xi=xi)
    head_opt = torch.optim.Adam(head.parameters(), lr=lr)
    perturbed_any = False
    for k, (batch, y) in enumerate(data(20), start=1):
        helen.step(lambda: loss_of(model(batch), y))

        # --- reference: pass 1 at w
        ws = [t.weight.clone().requires_grad_(True) for t in tables]
        head_opt.zero_grad()
        loss_of(head(dense_forward(ws, batch, FTM, "sum")).squeeze(1), y).backward()
        occ = occurrences(batch, FTM, ROWS)
        after = [c + o for c, o in zip(counts, occ)]
        eps = []
        for w, o, c in zip(ws, occ, after):
            g = w.grad
            ratio = c / c.max() if c.max() > 0 else torch.zeros_like(c)
            rho_r = rho * torch.clamp(ratio, min=xi)
            n = g.norm(dim=1)
            e = torch.where((o > 0) & (n > 0), rho_r / n.clamp(min=1e-30), torch.zeros_like(n)).unsqueeze(1) * g
            eps.append(e)
            perturbed_any |= bool(e.abs().sum() > 0)
        hp = list(head.parameters())
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in hp]))
        saved = [p.detach().clone() for p in hp]
        with torch.no_grad():
            for p in hp:
                p.add_(p.grad, alpha=rho / float(gnorm))
        # --- pass 2 at w + eps
        ws2 = [(t.weight + e).requires_grad_(True) for t, e in zip(tables, eps)]
        head_opt.zero_grad()
        loss_of(head(dense_forward(ws2, batch, FTM, "sum")).squeeze(1), y).backward()
        with torch.no_grad():
            for p, s in zip(hp, saved):
                p.copy_(s)
        head_opt.step()
        for t, w2, o in zip(tables, ws2, occ):
            t.step(w2.grad, o, k)
        counts = after
    assert perturbed_any
    for t, w in zip(tables, model.emb.split_embedding_weights()):
        assert almost(t.weight, w) <= 1e-5
    for p, q in zip(head.parameters(), model.head.parameters()):
        assert almost(p, q) <= 1e-5


def test_rho_zero_equals_the_base_optimizer_exactly():
    rule = tra.AdamAR.rule_config(lr=0.01, alpha=0.01)
    a, b = Model(rule), Model(rule)
    helen = Helen(a, torch.optim.Adam(a.head.parameters(), lr=0.01), rho=0.0)
    opt_b = torch.optim.Adam(b.head.parameters(), lr=0.01)
    for batch, y in data(8):
        helen.step(lambda: loss_of(a(batch), y))
        opt_b.zero_grad()
        loss_of(b(batch), y).backward()
        opt_b.step()
    assert torch.equal(a.emb.weights, b.emb.weights)
    assert all(torch.equal(p, q) for p, q in zip(a.head.parameters(), b.head.parameters()))
    assert a.emb.optimizer_step == b.emb.optimizer_step == 8


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
def test_perturb_then_restore_leaves_no_residue(fused):
    m = Model(tra.Adam.rule_config(lr=0.01), fused)
    batch, y = data(1)[0]
    before = m.emb.weights.detach().clone()
    state = {n: b.clone() for n, b in m.emb.named_buffers()}
    m.emb.capture_next_backward()
    loss_of(m(batch), y).backward()
    assert m.emb.optimizer_step == 0 and torch.equal(m.emb.weights, before)
    m.emb.perturb_captured(0.5, 0.0, {"t0": 10.0, "t1": 10.0})
    assert not torch.equal(m.emb.weights, before)
    m.emb.restore_perturbation()
    assert torch.equal(m.emb.weights, before)
    assert all(torch.equal(b, state[n]) for n, b in m.emb.named_buffers())


def test_bad_arguments():
    m = Model(tra.Adam.rule_config())
    with pytest.raises(ValueError, match="rho must be"):
        Helen(m, None, rho=-1.0)
    with pytest.raises(ValueError, match="xi must be"):
        Helen(m, None, xi=2.0)
    with pytest.raises(ValueError, match="no torchrec_adaptive embedding kernel"):
        Helen(nn.Linear(2, 2), None)
    cw = AdaptiveTBE([TableSpec("t#0", 10, 4, global_name="t", global_dim=8)], tra.Adam.rule_config())
    with pytest.raises(ValueError, match="column-wise"):
        Helen(cw, None)
