"""MLET (torchrec_adaptive.mlet), single process: gradients, collapse, stock-TorchRec load, config errors."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import DataType, PoolingType

import torchrec_adaptive as tra
from torchrec_adaptive.mlet import MLETConfig, MLETEmbeddingBagCollection, collapse

# (name, rows, dim, features, pooling); "a" (mean) and "b" (sum) are factorized, "c" passes through.
TABLES: List[Tuple[str, int, int, List[str], str]] = [
    ("a", 6, 3, ["fa0", "fa1"], "mean"),
    ("b", 5, 2, ["fb"], "sum"),
    ("c", 4, 2, ["fc"], "sum"),
]
MLET = {"a": MLETConfig(inner_dim=5), "b": MLETConfig(inner_dim=4, v_init_std=0.25)}
POOL = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def configs() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=list(f), pooling=POOL[p])
            for n, r, d, f, p in TABLES]


def module(seed: int = 0, **kw: object) -> MLETEmbeddingBagCollection:
    torch.manual_seed(seed)
    return MLETEmbeddingBagCollection(configs(), kw.pop("mlet", MLET), **kw)  # type: ignore[arg-type]


def keys() -> List[str]:
    return [f for _, _, _, fs, _ in TABLES for f in fs]


def fixed_kjt() -> KeyedJaggedTensor:
    """Batch of 3: multi-hot bags, empty bags, a duplicate id within a bag."""
    per_key: Dict[str, List[List[int]]] = {
        "fa0": [[0, 5, 5], [], [2]],
        "fa1": [[1], [3, 4], []],
        "fb": [[], [0, 4, 1], [4]],
        "fc": [[3, 3], [0], []],
    }
    vals = [i for k in keys() for bag in per_key[k] for i in bag]
    lens = [len(bag) for k in keys() for bag in per_key[k]]
    return KeyedJaggedTensor(keys=keys(), values=torch.tensor(vals, dtype=torch.long),
                             lengths=torch.tensor(lens, dtype=torch.long))


def random_kjt(g: torch.Generator, batch: int = 8) -> KeyedJaggedTensor:
    vals, lens = [], []
    for _, rows, _, fs, _ in TABLES:
        for _ in fs:
            ln = torch.randint(0, 4, (batch,), generator=g)
            lens.append(ln)
            vals.append(torch.randint(0, rows, (int(ln.sum()),), generator=g))
    return KeyedJaggedTensor(keys=keys(), values=torch.cat(vals), lengths=torch.cat(lens))


def reference_pooled(kjt: KeyedJaggedTensor, weights: Dict[str, torch.Tensor]) -> KeyedTensor:
    """The inner EBC's pooling, done with F.embedding_bag in the weights' dtype (EBC casts to float32)."""
    feats = kjt.to_dict()
    outs, dims = [], []
    for name, _, _, fs, pooling in TABLES:
        for f in fs:
            jt = feats[f]
            outs.append(F.embedding_bag(jt.values(), weights[name], jt.offsets(), mode=pooling,
                                        include_last_offset=True))
            dims.append(weights[name].shape[1])
    return KeyedTensor(keys=keys(), length_per_key=dims, values=torch.cat(outs, dim=1))


class _Project(nn.Module):
    def __init__(self, m: MLETEmbeddingBagCollection) -> None:
        super().__init__()
        self.m = m

    def forward(self, pooled: KeyedTensor) -> torch.Tensor:
        return self.m.project(pooled).values()


def test_gradcheck_factorized_lookup_float64() -> None:
    """d out / d (W_t, V_t) of pool(W_t) @ V_t: sum and mean pooling, multi-hot, empty bags, a pass-through table."""
    m = module()
    proj = _Project(m)
    kjt = fixed_kjt()
    g = torch.Generator().manual_seed(3)
    inner = {n: torch.randn(r, MLET[n].inner_dim if n in MLET else d, generator=g, dtype=torch.float64,
                            requires_grad=True) for n, r, d, _, _ in TABLES}
    vs = {n: torch.randn(MLET[n].inner_dim, d, generator=g, dtype=torch.float64, requires_grad=True)
          for n, _, d, _, _ in TABLES if n in MLET}
    names_w, names_v = list(inner), list(vs)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        w = dict(zip(names_w, tensors[: len(names_w)]))
        v = {f"m.v.{n}": t for n, t in zip(names_v, tensors[len(names_w):])}
        return torch.func.functional_call(proj, v, (reference_pooled(kjt, w),))

    inputs = tuple(inner.values()) + tuple(vs.values())
    out = f(*inputs)
    assert out.dtype == torch.float64 and out.shape == (3, 3 + 3 + 2 + 2)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    # Empty bags give zero rows; the pass-through table is the plain pooled W.
    assert torch.equal(out[1, 0:3], torch.zeros(3, dtype=torch.float64))   # fa0, bag 1 empty (mean)
    assert torch.equal(out[0, 6:8], torch.zeros(2, dtype=torch.float64))   # fb, bag 0 empty (sum)
    torch.testing.assert_close(out[:, 8:10], F.embedding_bag(kjt["fc"].values(), inner["c"], kjt["fc"].offsets(),
                                                             mode="sum", include_last_offset=True))


def test_module_forward_and_gradients_match_float64_reference() -> None:
    """The module (EBC in float32, then V) computes what the gradchecked float64 composition computes."""
    m = module()
    kjt = fixed_kjt()
    out = m(kjt)
    assert out.keys() == keys() and out.length_per_key() == [3, 3, 2, 2]
    r = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(5))
    (out.values() * r).sum().backward()

    w64 = {n: b.weight.detach().double().requires_grad_() for n, b in m.inner.embedding_bags.items()}
    v64 = {n: p.detach().double().requires_grad_() for n, p in m.v.items()}
    pooled = reference_pooled(kjt, w64).values().split([5, 5, 4, 2], dim=1)
    ref = torch.cat([pooled[0] @ v64["a"], pooled[1] @ v64["a"], pooled[2] @ v64["b"], pooled[3]], dim=1)
    (ref * r.double()).sum().backward()
    torch.testing.assert_close(out.values().double(), ref.detach(), atol=1e-6, rtol=1e-5)
    for n, b in m.inner.embedding_bags.items():
        torch.testing.assert_close(b.weight.grad.double(), w64[n].grad, atol=1e-6, rtol=1e-5)
    for n, p in m.v.items():
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad.double(), v64[n].grad, atol=1e-6, rtol=1e-5)


def test_shapes_init_and_layout() -> None:
    m = module(mlet={"a": MLETConfig(inner_dim=64, v_init_std=0.25), "b": MLETConfig(inner_dim=4, w_init="table")})
    dims = {n: b.weight.shape for n, b in m.inner.embedding_bags.items()}
    assert dims == {"a": (6, 64), "b": (5, 4), "c": (4, 2)}
    assert set(m.v.keys()) == {"a", "b"} and m.v["a"].shape == (64, 3) and m.v["b"].shape == (4, 2)
    # W: Glorot-uniform bound sqrt(6 / (n + k)) ("xavier_uniform"), or the table's own U(±sqrt(1/n)) ("table").
    wa = m.inner.embedding_bags["a"].weight
    assert wa.abs().max() <= math.sqrt(6 / (6 + 64)) and wa.abs().max() > 0.8 * math.sqrt(6 / (6 + 64))
    assert m.inner.embedding_bags["b"].weight.abs().max() <= math.sqrt(1 / 5)
    assert 0.2 < m.v["a"].std().item() < 0.3  # 192 draws of N(0, 0.25²)
    # The inner table configs carry the bounds, so TorchRec's sharded kernels initialize from them too.
    inner_cfg = {c.name: c for c in m.inner.embedding_bag_configs()}
    assert inner_cfg["a"].weight_init_max == pytest.approx(math.sqrt(6 / 70))
    assert inner_cfg["a"].embedding_dim == 64 and inner_cfg["a"].feature_names == ["fa0", "fa1"]
    # The served configs are unchanged and not shared with the inner ones.
    served = {c.name: c for c in m.embedding_bag_configs()}
    assert served["a"].embedding_dim == 3 and served["a"].weight_init_max is None


def _train(m: MLETEmbeddingBagCollection, opt: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(11)
    target = torch.randn(10, generator=g)
    for _ in range(steps):
        out = m(random_kjt(g)).values()
        loss = torch.tanh(out @ target).sub(0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_collapse_equal(m: MLETEmbeddingBagCollection) -> None:
    ebc = collapse(m)
    assert type(ebc).__name__ == "EmbeddingBagCollection"
    assert {n: tuple(b.weight.shape) for n, b in ebc.embedding_bags.items()} == {"a": (6, 3), "b": (5, 2), "c": (4, 2)}
    torch.testing.assert_close(ebc.embedding_bags["c"].weight, m.inner.embedding_bags["c"].weight, atol=0, rtol=0)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for kjt in [fixed_kjt(), random_kjt(g, 16)]:
            got, want = ebc(kjt), m(kjt)
            assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
            torch.testing.assert_close(got.values(), want.values(), atol=1e-6, rtol=1e-5)


def test_collapse_after_torch_adam() -> None:
    m = module()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    _train(m, torch.optim.Adam(m.parameters(), lr=0.05), steps=15)
    moved = {k: (v - before[k]).abs().max().item() for k, v in m.state_dict().items()}
    assert all(x > 1e-2 for x in moved.values()), moved
    _assert_collapse_equal(m)


def test_collapse_after_adamar_in_backward_on_w() -> None:
    m = module()
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    apply_optimizer_in_backward(tra.AdamAR, m.inner.embedding_bags.parameters(), {"lr": 0.05, "alpha": 1e-2})
    _train(m, torch.optim.Adam(m.v.parameters(), lr=0.05), steps=15)
    moved = {k: (v - before[k]).abs().max().item() for k, v in m.state_dict().items()}
    assert all(x > 1e-2 for x in moved.values()), moved
    _assert_collapse_equal(m)


def test_weighted_and_narrow_collapse() -> None:
    """Per-sample weights (weighted sum is linear) and allow_narrow (k < d) both collapse exactly."""
    cfg = [EmbeddingBagConfig(name="t", num_embeddings=9, embedding_dim=6, feature_names=["f"])]
    torch.manual_seed(0)
    m = MLETEmbeddingBagCollection(cfg, MLETConfig(inner_dim=2, allow_narrow=True), is_weighted=True)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 8, 8, 0]), lengths=torch.tensor([3, 0, 2]),
                            weights=torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0]))
    out = m(kjt).values()
    w, v = m.inner.embedding_bags["t"].weight.detach(), m.v["t"].detach()
    expected = torch.stack([0.5 * w[1] - w[2] + 2 * w[8], torch.zeros(2), 0.25 * w[8] + 3 * w[0]]) @ v
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(collapse(m)(kjt).values(), out, atol=1e-6, rtol=1e-5)


STOCK_LOADER = textwrap.dedent("""
    import sys
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.modules.embedding_configs import PoolingType
    tables = [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f, pooling=PoolingType[p])
              for n, r, d, f, p in {tables!r}]
    ebc = EmbeddingBagCollection(tables=tables)
    ebc.load_state_dict(torch.load(sys.argv[1] + "/state.pt"), strict=True)
    batch = torch.load(sys.argv[1] + "/batch.pt")
    kjt = KeyedJaggedTensor(keys=batch["keys"], values=batch["values"], lengths=batch["lengths"])
    with torch.no_grad():
        torch.save(ebc(kjt).values(), sys.argv[1] + "/out.pt")
    assert not any(m.startswith("torchrec_adaptive") for m in sys.modules), "torchrec_adaptive was imported"
    print("loaded", sorted(ebc.state_dict()))
""")


def test_collapsed_state_dict_loads_into_stock_torchrec(tmp_path: Path) -> None:
    m = module()
    _train(m, torch.optim.Adam(m.parameters(), lr=0.05), steps=5)
    ebc = collapse(m)
    torch.save(ebc.state_dict(), tmp_path / "state.pt")
    kjt = random_kjt(torch.Generator().manual_seed(4), 16)
    torch.save({"keys": kjt.keys(), "values": kjt.values(), "lengths": kjt.lengths()}, tmp_path / "batch.pt")
    tables = [(n, r, d, f, p.upper()) for n, r, d, f, p in TABLES]
    proc = subprocess.run([sys.executable, "-c", STOCK_LOADER.format(tables=tables), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedding_bags.a.weight" in proc.stdout
    with torch.no_grad():
        want = m(kjt).values()
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"inner_dim": 0}, "inner_dim"),
    ({"inner_dim": 2.0}, "inner_dim"),
    ({"inner_dim": 8, "v_init_std": 0.0}, "v_init_std"),
    ({"inner_dim": 8, "v_init_std": float("nan")}, "v_init_std"),
    ({"inner_dim": 8, "w_init": "kaiming"}, "w_init"),
])
def test_config_errors(kwargs: Dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MLETConfig(**kwargs)  # type: ignore[arg-type]


def test_module_config_errors() -> None:
    with pytest.raises(ValueError, match=r"table 'a'.*inner_dim 2 < embedding_dim 3"):
        module(mlet={"a": MLETConfig(inner_dim=2)})
    with pytest.raises(ValueError, match=r"table 'b'.*inner_dim 1 < embedding_dim 2"):
        module(mlet={"a": MLETConfig(inner_dim=8), "b": MLETConfig(inner_dim=1)})
    with pytest.raises(ValueError, match=r"table 'a'.*inner_dim 2 < embedding_dim 3"):
        module(mlet=MLETConfig(inner_dim=2))  # one config for every table
    with pytest.raises(ValueError, match=r"do not exist: \['zz'\]"):
        module(mlet={"zz": MLETConfig(inner_dim=8)})
    with pytest.raises(ValueError, match=r"table 'a'.*FP32"):
        MLETEmbeddingBagCollection([dataclasses.replace(configs()[0], data_type=DataType.FP16)], MLETConfig(8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        MLET["a"].inner_dim = 9  # type: ignore[misc]
    module(mlet={"a": MLETConfig(inner_dim=2, allow_narrow=True)})  # allowed when asked for


def test_v_built_on_meta_gets_its_gaussian_init_when_materialized():
    """DMP allocates meta parameters with empty_like and calls their module's reset_parameters
    (torchrec DistributedModelParallel._init_parameters); V must not keep the raw allocation."""
    from torchrec.distributed.model_parallel import DistributedModelParallel

    big = {"a": MLETConfig(inner_dim=400), "b": MLETConfig(inner_dim=300, v_init_std=0.25)}
    m = module(mlet=big, device=torch.device("meta"))
    assert all(v.device.type == "meta" for v in m.v.values())
    fake = type("FakeDMP", (), {"device": torch.device("cpu")})()
    DistributedModelParallel._init_parameters(fake, m)  # the very function DMP runs on unsharded modules
    for name, std in (("a", 0.5), ("b", 0.25)):
        v = m.v[name]
        assert v.device.type == "cpu" and torch.isfinite(v).all()
        assert abs(float(v.std()) - std) < 0.05 * std and abs(float(v.mean())) < 0.05
