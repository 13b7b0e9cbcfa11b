"""An empty batch trains nothing and changes nothing; a number given as a string is a
clear TypeError naming the parameter (issue 12, item 6)."""

from __future__ import annotations

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec


@pytest.mark.parametrize("tables", [[TableSpec("a", 10, 4)], [TableSpec("a", 10, 4), TableSpec("b", 12, 8)]],
                         ids=["one-dim-group", "two-dim-groups"])
@pytest.mark.parametrize("fused", [True, False])
def test_an_empty_batch_changes_nothing(tables, fused):
    k = AdaptiveTBE(tables, tra.AdamAR.rule_config(lr=0.1), fused=fused)
    before = {"w": k.weights.detach().clone(), **{n: b.clone() for n, b in k.named_buffers()}}
    out = k(torch.empty(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert out.shape == (0, sum(t.dim for t in tables))
    out.sum().backward()
    assert k.optimizer_step == 0
    after = {"w": k.weights.detach(), **dict(k.named_buffers())}
    for n in before:
        assert torch.equal(before[n], after[n]), n
    k(torch.tensor([1] * len(tables)), torch.arange(len(tables) + 1)).sum().backward()  # then it trains
    assert k.optimizer_step == 1


@pytest.mark.parametrize("kwargs,name", [({"lr": "1e-3"}, "lr"), ({"alpha": "0.1"}, "alpha"),
                                         ({"fal_tau": "5"}, "fal_tau"), ({"lr_multiplier": None}, "lr_multiplier"),
                                         ({"fal_tau_is_ratio": "yes"}, "fal_tau_is_ratio"),
                                         ({"decay": 1}, "decay"), ({"betas": ("0.9", 0.99)}, "betas")])
def test_a_string_for_a_number_names_the_parameter(kwargs, name):
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        tra.AdamAR.rule_config(**kwargs)
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        tra.AdamAR([torch.nn.Parameter(torch.zeros(3, 2))], **kwargs)


def test_set_learning_rate_refuses_a_string():
    k = AdaptiveTBE([TableSpec("a", 10, 4)], tra.Adam.rule_config())
    with pytest.raises(TypeError, match="learning rate must be a number"):
        k.set_learning_rate("1e-3")  # type: ignore[arg-type]
    assert k.get_learning_rate() == 1e-3
