"""start_epoch, MEDA re-initialization and row diagnostics (single process)."""

from __future__ import annotations

import pytest
import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, MEDAConfig, TableSpec, row_statistics, start_epoch
from torchrec_adaptive.rules.transforms import scale_by_row_frequency

ROWS, DIM = 50, 8


def kernel(rule=None, tables=None, **kw):
    torch.manual_seed(0)
    rule = rule or tra.AdamAR.rule_config(lr=0.05, alpha=0.01)
    return AdaptiveTBE(tables or [TableSpec("t", ROWS, DIM)], rule, **kw)


def train(k, steps=5, seed=0, hot=(1, 2, 3)):
    """Rows in ``hot`` every step, plus a few random ones."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.cat([torch.tensor(hot), torch.randint(0, ROWS, (3,), generator=g)])
        off = torch.tensor([0, idx.numel()])
        (k(idx, off) ** 2).sum().backward()


class Holder(torch.nn.Module):
    def __init__(self, *mods):
        super().__init__()
        self.mods = torch.nn.ModuleList(mods)


def test_reinit_depends_only_on_global_rows_not_on_sharding():
    full = kernel()
    row_shards = [kernel(tables=[TableSpec("t", 20, DIM, global_name="t", row_offset=0, global_num_rows=ROWS)]),
                  kernel(tables=[TableSpec("t", 30, DIM, global_name="t", row_offset=20, global_num_rows=ROWS)])]
    col_shards = [kernel(tables=[TableSpec("t#0", ROWS, 4, global_name="t", col_offset=0, global_dim=DIM)]),
                  kernel(tables=[TableSpec("t#1", ROWS, 4, global_name="t", col_offset=4, global_dim=DIM)])]
    for model in (full, Holder(*row_shards), Holder(*col_shards)):
        start_epoch(model, 1)
        report = start_epoch(model, 2, MEDAConfig(reinit="all", seed=7))
        assert report.reinit_rows == {"t": ROWS}
    w = full.split_embedding_weights()[0]
    assert torch.equal(torch.cat([k.split_embedding_weights()[0] for k in row_shards]), w)
    assert torch.equal(torch.cat([k.split_embedding_weights()[0] for k in col_shards], dim=1), w)
    lo, hi = TableSpec("t", ROWS, DIM).bounds
    assert float(w.min()) >= lo and float(w.max()) <= hi and float(w.std()) > 0.5 * (hi - lo) / 12**0.5


def test_reinit_values_change_with_epoch_and_seed():
    a, b, c = kernel(), kernel(), kernel()
    start_epoch(a, 2, MEDAConfig(seed=1))
    start_epoch(b, 3, MEDAConfig(seed=1))
    start_epoch(c, 2, MEDAConfig(seed=2))
    wa, wb, wc = (k.split_embedding_weights()[0] for k in (a, b, c))
    assert not torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tail_reinit_leaves_frequent_rows_bit_identical_and_resets_tail_state():
    k = kernel()
    train(k, steps=6)
    before_w = k.split_embedding_weights()[0].clone()
    before = {n: v.clone() for n, v in k.get_optimizer_state()[0].items()}
    counts = before["row_count"]
    tail = counts < 3
    assert tail.any() and (~tail).any()
    start_epoch(k, 2, MEDAConfig(reinit="tail", tail_threshold=3))
    w = k.split_embedding_weights()[0]
    st = k.get_optimizer_state()[0]
    assert torch.equal(w[~tail], before_w[~tail])
    for name in ("momentum1", "exp_avg_sq", "prev_iter", "row_count"):
        assert torch.equal(st[name][~tail], before[name][~tail]), name
    assert not (w[tail] == before_w[tail]).all(dim=1).any(), "every tail row gets new values"
    assert not st["momentum1"][tail].any() and not st["exp_avg_sq"][tail].any()
    assert (st["prev_iter"][tail] == k.optimizer_step).all()  # idle time counts from the re-init
    assert torch.equal(st["row_count"][tail], counts[tail])  # counts kept by default


def test_reset_state_and_keep_counts_options():
    k = kernel()
    train(k)
    w_state = {n: v.clone() for n, v in k.get_optimizer_state()[0].items()}
    start_epoch(k, 2, MEDAConfig(reset_state=False))
    assert all(torch.equal(v, w_state[n]) for n, v in k.get_optimizer_state()[0].items())
    start_epoch(k, 3, MEDAConfig(keep_counts=False))
    assert not k.get_optimizer_state()[0]["row_count"].any()


def test_every_nth_epoch():
    k = kernel()
    seen = []
    for e in range(1, 7):
        seen.append(bool(start_epoch(k, e, MEDAConfig(every=2)).reinit_rows))
    assert seen == [False, False, True, False, True, False]  # epochs 3 and 5


def test_start_epoch_is_idempotent_and_only_goes_forward():
    k = kernel()
    start_epoch(k, 2, MEDAConfig())
    w = k.split_embedding_weights()[0].clone()
    again = start_epoch(k, 2, MEDAConfig())
    assert not again.changed and torch.equal(k.split_embedding_weights()[0], w)
    with pytest.raises(ValueError, match="before the current epoch 2"):
        start_epoch(k, 1)
    with pytest.raises(ValueError, match="epochs count from 1"):
        start_epoch(kernel(), 0)


@pytest.mark.parametrize(
    "meda,err,pattern",
    [
        ({"nope": MEDAConfig()}, ValueError, r"unknown table\(s\) \['nope'\].*\['t'\]"),
        ({"t": {"reinit": "all"}}, TypeError, "must be a MEDAConfig"),
    ],
)
def test_bad_meda_arguments(meda, err, pattern):
    with pytest.raises(err, match=pattern):
        start_epoch(kernel(), 2, meda)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [({"tail_threshold": -1.0}, "tail_threshold must be >= 0"), ({"reinit": "some"}, "reinit must be"),
     ({"reinit": "tail"}, "needs a tail_threshold"), ({"every": 0}, "every must be >= 1")],
)
def test_bad_meda_config(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MEDAConfig(**kwargs)


def test_fal_multiplier_follows_the_epoch_set_by_start_epoch():
    rule = tra.AdamAR.rule_config(lr=0.05, fal_tau=4.0, fal_power=1.0, fal_epoch_decay=0.5)
    k = kernel(rule)
    train(k, steps=2)
    start_epoch(k, 3)
    assert k.epoch == 3
    fal = next(t for t in k.chain.transforms if isinstance(t, scale_by_row_frequency))
    c = torch.tensor([1.0, 2.0, 8.0])
    expect = 1 - (1 - torch.clamp(c / 4.0, max=1.0)) * 0.5 ** (3 - 1)  # METHODS.md m_r(e)
    assert torch.allclose(fal.row_multiplier(c, k.epoch, None), expect)


def test_checkpoint_after_reinit_restores_exactly():
    a = kernel()
    train(a)
    start_epoch(a, 2, MEDAConfig(reinit="tail", tail_threshold=2))
    b = kernel()
    b.load_state_dict(a.state_dict())
    assert b.epoch == 2 and b.optimizer_step == a.optimizer_step
    assert torch.equal(a.weights, b.weights)
    train(a, seed=5)
    train(b, seed=5)
    assert torch.equal(a.weights, b.weights)


def _unsharded_ebc(opt_cls, kwargs):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", num_embeddings=ROWS, embedding_dim=DIM,
                                                            feature_names=["f"])])
    apply_optimizer_in_backward(opt_cls, ebc.parameters(), kwargs)
    return ebc


def _train_ebc(ebc, steps=5):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.cat([torch.tensor([1, 2, 3]), torch.randint(0, ROWS, (3,), generator=g)])
        kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.tensor([ids.numel()]))
        (ebc(kjt).values() ** 2).sum().backward()


def test_unsharded_ebc_with_our_optimizer_matches_the_kernel_reinit():
    ebc = _unsharded_ebc(tra.AdamAR, {"lr": 0.05})
    _train_ebc(ebc)
    start_epoch(ebc, 2, MEDAConfig())
    k = kernel()
    start_epoch(k, 2, MEDAConfig())
    assert torch.equal(ebc.embedding_bags["t"].weight.detach(), k.split_embedding_weights()[0])
    (opt,) = ebc.embedding_bags["t"].weight._in_backward_optimizers
    assert opt.param_groups[0]["epoch"] == 2
    st = opt.state[ebc.embedding_bags["t"].weight]
    assert not st["momentum1"].any() and (st["prev_iter"] == 5).all()
    trained = kernel()
    train(trained)  # the same batches as _train_ebc
    # counts kept, and counted as the kernel counts them (duplicates in a batch included)
    assert torch.equal(st["row_count"], trained.get_optimizer_state()[0]["row_count"])
    assert st["row_count"][[1, 2, 3]].tolist() == [6.0, 5.0, 6.0]


def test_stock_optimizer_table_reinit_all_and_tail_needs_counts():
    ebc = _unsharded_ebc(torch.optim.Adam, {"lr": 0.05})
    _train_ebc(ebc)
    w = ebc.embedding_bags["t"].weight
    (opt,) = w._in_backward_optimizers
    assert opt.state[w]["exp_avg"].any()
    start_epoch(ebc, 2, MEDAConfig())
    assert not opt.state[w]["exp_avg"].any() and not opt.state[w]["exp_avg_sq"].any()
    with pytest.raises(ValueError, match="table 't': reinit='tail' needs row counts"):
        start_epoch(ebc, 3, MEDAConfig(reinit="tail", tail_threshold=2))


def test_row_statistics():
    k = kernel()
    train(k, steps=6)
    stats = row_statistics(k)["t"]
    counts = k.get_optimizer_state()[0]["row_count"]
    assert int(stats["rows"]) == ROWS and int(stats["count_hist"].sum()) == ROWS
    assert float(stats["never_touched"]) == pytest.approx(float((counts == 0).float().mean()))
    assert int(stats["count_hist"][0]) == int((counts == 0).sum())
    assert int(stats["count_hist"][3]) == int(((counts >= 4) & (counts < 8)).sum())  # the hot rows: 6 each
    assert int(stats["idle_hist"].sum()) == int((counts > 0).sum())
    assert int(stats["idle_hist"][0]) >= 3  # rows 1, 2, 3 were touched in the last step
    w = k.split_embedding_weights()[0]
    assert float(stats["sq_norm_by_count"].sum()) == pytest.approx(float(w.double().pow(2).sum()))
    assert float(stats["norm_by_count"].sum()) == pytest.approx(float(w.double().norm(dim=1).sum()))
