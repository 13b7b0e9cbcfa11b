"""The unsharded torch.optim front end counts occurrences as the fused kernel does.

TorchRec's unsharded ``EmbeddingBagCollection`` gives its tables dense gradients; the
optimizer reads the step's lookups (rules/occurrences.py) so duplicates count, rows are
touched when looked up, and evaluation forwards count nothing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.rules import occurrences

ROWS, DIM = 30, 4
KW = {"lr": 0.05, "alpha": 0.01, "eps": 0.1, "fal_tau": 4.0, "fal_min": 0.05}


def _ebc(weighted: bool = False, pooling: str = "sum") -> EmbeddingBagCollection:
    from torchrec.modules.embedding_configs import PoolingType

    torch.manual_seed(0)
    pool = PoolingType.MEAN if pooling == "mean" else PoolingType.SUM
    # "a" is looked up by two features (two forward calls of one nn.EmbeddingBag per step)
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="a", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f0", "f1"], pooling=pool),
        EmbeddingBagConfig(name="b", num_embeddings=ROWS, embedding_dim=DIM, feature_names=["f2"], pooling=pool),
    ], is_weighted=weighted)


def _batches(steps: int, weighted: bool):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        lengths = torch.randint(0, 4, (3 * 5,), generator=g)
        ids = (torch.rand(int(lengths.sum()), generator=g) ** 3 * ROWS).long()  # hot small ids: duplicates
        w = torch.rand(ids.numel(), generator=g) if weighted else None
        yield KeyedJaggedTensor(keys=["f0", "f1", "f2"], values=ids, lengths=lengths, weights=w), torch.randn(5, 3 * DIM, generator=g)


@pytest.mark.parametrize("weighted,pooling", [(False, "sum"), (True, "sum"), (False, "mean")])
def test_unsharded_ebc_equals_kernel_counts_included(weighted, pooling):
    ebc = _ebc(weighted, pooling)
    apply_optimizer_in_backward(tra.AdamAR, ebc.parameters(), dict(KW))
    ref = AdaptiveTBE([TableSpec("a", ROWS, DIM), TableSpec("b", ROWS, DIM)],
                                      tra.AdamAR.rule_config(**KW), feature_table_map=[0, 0, 1], pooling=pooling)
    with torch.no_grad():
        for n, w in zip("ab", ref.split_embedding_weights()):
            w.copy_(ebc.embedding_bags[n].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to one count per row
        for kjt, target in _batches(12, weighted):
            ((ebc(kjt).values() - target) ** 2).sum().backward()
            ((ref(kjt.values(), kjt.offsets(), kjt.weights_or_none()) - target) ** 2).sum().backward()
            with torch.no_grad():  # an evaluation pass between steps counts nothing
                ebc(kjt)
            ebc(kjt)  # nor does a forward that is never backpropagated
    for i, n in enumerate("ab"):
        w = ebc.embedding_bags[n].weight
        st = w._in_backward_optimizers[0].state[w]
        assert torch.allclose(w.detach(), ref.split_embedding_weights()[i], atol=1e-6), n
        for k, v in ref.get_optimizer_state()[i].items():
            assert torch.allclose(st[k].double(), v.double(), atol=1e-6), (n, k)
        assert st["row_count"].max() > 12, "no duplicates: the count check would be vacuous"


def test_dense_gradient_without_lookups_warns_and_counts_rows():
    """A bare 2-D parameter with a dense gradient: no lookups to read, so one count per
    nonzero gradient row -- said aloud, not silently."""
    w = torch.nn.Parameter(torch.randn(ROWS, DIM))
    opt = tra.AdamAR([w], **KW)
    torch.nn.functional.embedding_bag(torch.tensor([1, 1, 2]), w, torch.tensor([0]), mode="sum").sum().backward()
    with pytest.warns(RuntimeWarning, match="one occurrence"):
        opt.step()
    assert opt.state[w]["row_count"][[1, 2]].tolist() == [1.0, 1.0]


def test_gradient_outside_the_lookups_is_refused():
    """A table also used outside its nn.EmbeddingBag (here an L2 term on the whole table)
    gets gradient on rows no lookup touched; a lazy update would drop it silently."""
    bag = torch.nn.EmbeddingBag(ROWS, DIM, mode="sum")
    opt = tra.AdamAR([bag.weight], **KW)
    before = bag.weight.detach().clone()
    (bag(torch.tensor([[1, 2]])).sum() + bag.weight.pow(2).sum()).backward()
    with pytest.raises(ValueError, match="reaches rows no lookup of this step touched"):
        opt.step()
    assert torch.equal(bag.weight.detach(), before)
    opt.zero_grad()
    bag(torch.tensor([[3]])).sum().backward()  # the refused step's lookups are gone
    opt.step()
    assert opt.state[bag.weight]["row_count"].nonzero().squeeze(1).tolist() == [3]


def test_the_discovery_hook_goes_away_once_every_table_is_found():
    ebc = _ebc()
    apply_optimizer_in_backward(tra.Adam, ebc.parameters(), {"lr": 0.01})
    assert occurrences._global_hook is not None
    kjt, _ = next(_batches(1, False))
    ebc(kjt).values().sum().backward()
    assert occurrences._global_hook is None
