"""The instruction-set builds of the fused CPU loops: which one is picked, that each one
this CPU can run computes what the eager chain computes, and that the one-pass C++
grouping of lookups by row equals the torch ops it replaces."""

from __future__ import annotations

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.kernels import cpu_isa, fused_cpu
from torchrec_adaptive.kernels.batched import GroupLookups

_NAMES = list(cpu_isa.VARIANTS)
RUNNABLE = [v for v in _NAMES[: _NAMES.index(cpu_isa.detected()) + 1] if v in cpu_isa.buildable_variants()]


@pytest.mark.parametrize("aten,env,expect", [
    ("AVX512", None, "avx512"), ("AVX512", "avx2", "avx2"), ("AVX512", " Default ", "default"),
    ("AVX2", None, "avx2"), ("AVX2", "avx2", "avx2"), ("DEFAULT", None, "default"), ("VSX", None, "default"),
])
def test_variant_follows_aten_and_the_env_var(monkeypatch, aten, env, expect):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    if env is None:
        monkeypatch.delenv(cpu_isa.ENV, raising=False)
    else:
        monkeypatch.setenv(cpu_isa.ENV, env)
    assert cpu_isa.selected() == expect


@pytest.mark.parametrize("aten,env,match", [
    ("AVX2", "avx512", r"TORCHREC_ADAPTIVE_CPU_ISA='avx512' asks for code this CPU cannot run.*'avx2'.*default, avx2$"),
    ("DEFAULT", "avx2", r"cannot run.*'default'"),
    ("AVX512", "sse9", r"TORCHREC_ADAPTIVE_CPU_ISA='sse9' is not a CPU variant; use one of default, avx2, avx512"),
])
def test_a_variant_this_cpu_cannot_run_is_refused(monkeypatch, aten, env, match):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.setenv(cpu_isa.ENV, env)
    with pytest.raises(ValueError, match=match):
        cpu_isa.selected()
    with pytest.raises(ValueError, match=match):  # a kernel is refused when it plans its update, naming the variable
        k = AdaptiveTBE([TableSpec("t", 10, 4)], tra.Adam.rule_config())
        k(torch.tensor([1, 2]), torch.tensor([0, 2]))


def test_each_variant_has_its_own_build():
    """Distinct module names (and so distinct JIT cache directories) and ISA flags; no -march=native."""
    assert len({cpu_isa.module_name(v) for v in cpu_isa.VARIANTS}) == len(cpu_isa.VARIANTS)
    for v in cpu_isa.VARIANTS:
        flags = cpu_isa.cflags(v)
        assert not any(f.startswith("-march") for f in flags) and f"-DTORCHREC_ADAPTIVE_ISA={v}" in flags
    assert "-mavx512f" in cpu_isa.cflags("avx512") and "-mavx2" in cpu_isa.cflags("avx2")
    assert not any(f.startswith("-mavx") for f in cpu_isa.cflags("default"))


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("cls,kw,pooling,weighted", [
    (tra.AdamAR, {"lr": 0.01, "alpha": 0.01, "fal_tau": 3.0}, "sum", True),
    (tra.RowWiseAdagrad, {"lr": 0.05, "weight_decay": 0.01}, "mean", False),
])
def test_every_runnable_variant_equals_the_eager_chain(monkeypatch, isa, cls, kw, pooling, weighted):
    monkeypatch.setenv(cpu_isa.ENV, isa)
    tables = [TableSpec("a", 300, 16), TableSpec("b", 70, 24)]

    def make(fused):
        torch.manual_seed(0)
        return AdaptiveTBE(tables, cls.rule_config(**kw), feature_table_map=[0, 1, 0], fused=fused,
                                           pooling=pooling)

    fused, eager = make(True), make(False)
    assert fused._fused is not None and fused._fused.isa == isa and eager._fused is None
    assert fused_cpu.extension(isa).isa == isa
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        lengths = torch.randint(0, 5, (3 * 8,), generator=g)  # empty bags included
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = torch.tensor([300, 70, 300]).repeat_interleave(lengths.view(3, 8).sum(1))
        idx = (torch.rand(int(lengths.sum()), generator=g) ** 3 * rows).long()
        psw = torch.rand(idx.numel(), generator=g) if weighted else None
        target = torch.randn(8, 56, generator=g)
        for k in (fused, eager):
            ((k(idx, off, psw) - target) ** 2).sum().backward()
    assert torch.allclose(fused.weights, eager.weights, atol=1e-6, rtol=1e-5)
    for sf, se in zip(fused.get_optimizer_state(), eager.get_optimizer_state()):
        for name in se:
            assert torch.allclose(sf[name].double(), se[name].double(), atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_one_pass_grouping_equals_sort_and_unique(pooling, weighted):
    """coalesce_lookups (radix sort by row, counts, bags, weights) against the torch ops
    of AdaptiveTBE._sorted_lookups, with empty bags and rows over 2^11
    (two radix digits); the workspace is reused across calls of different sizes. The
    60000-bag batch (~150k lookups) is sorted by two threads (the parallel radix passes
    split above 2 x 32768 lookups)."""
    k = AdaptiveTBE([TableSpec("t", 5000, 4)], tra.Adam.rule_config(), pooling=pooling)
    assert k._fused is not None
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_grouping(k, g, pooling, weighted)
    finally:
        torch.set_num_threads(threads)


def _check_grouping(k, g, pooling, weighted):
    for bags in (40, 7, 300, 60000):
        lengths = torch.randint(0, 6, (bags,), generator=g)
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        idx = torch.randint(0, 5000, (int(lengths.sum()),), generator=g)
        idx[: idx.numel() // 2] %= 17  # duplicates
        psw = torch.rand(idx.numel(), generator=g) if weighted else None
        bag_grads = torch.randn(bags, 4, generator=g)
        lk = GroupLookups(idx, off, lengths, psw)
        rows, occ, grad = k._fused.coalesce(idx, off, psw, pooling, 5000, bag_grads)
        e_rows, e_occ, e_grad = k._sorted_lookups(lk, bag_grads)
        assert torch.equal(rows, e_rows) and torch.equal(occ, e_occ)
        assert torch.equal(grad.row_offsets, e_grad.row_offsets)
        seg = torch.repeat_interleave(torch.arange(rows.numel()), occ.long())
        key = seg * bags + grad.bags.long()
        assert torch.equal(key.sort().values, (seg * bags + e_grad.bags).sort().values)  # same bags per row
        assert bool((key[1:] >= key[:-1]).all())  # stable: a row's lookups keep their batch order
        assert (grad.weight is None) == (e_grad.weight is None)
        assert torch.allclose(grad.materialize(), e_grad.materialize(), atol=1e-6)


def test_out_of_range_row_is_refused_by_the_grouping_pass():
    k = AdaptiveTBE([TableSpec("t", 50, 4)], tra.Adam.rule_config())
    off = torch.tensor([0, 2])
    with pytest.raises(RuntimeError, match="row 50 of lookup 1 is outside the group's 50 rows"):
        k._fused.coalesce(torch.tensor([3, 50]), off, None, "sum", 50, torch.zeros(1, 4))


def test_without_a_build_or_compiler_the_eager_chain_runs_with_a_warning(monkeypatch):
    """Nothing built at install and no compiler: a warning that names the missing compiler
    and the cost, then the eager chain (the kernel still trains)."""
    monkeypatch.setattr(fused_cpu, "_modules", {})
    monkeypatch.setattr(fused_cpu, "_prebuilt", lambda isa: None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler \('/nonexistent/c\+\+'.*eager chain.*2-3x as long"):
        k = AdaptiveTBE([TableSpec("t", 10, 4)], tra.Adam.rule_config())
        k(torch.tensor([1, 2]), torch.tensor([0, 2])).sum().backward()
        assert k._fused is None
    assert k.optimizer_step == 1
