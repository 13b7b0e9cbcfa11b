"""What Helen's step keeps from one pass to the next instead of recomputing it.

- The second pass reuses the capture's grouping of lookups by row only when its
  lookups are the captured ones: another batch (other IDs, other bags, other
  per-sample weights) after a capture updates exactly as it would without one.
- The running per-table max of the counts (``stored_count_peaks``) equals a scan of
  every count after whatever wrote them: updates, MEDA re-initialization, a checkpoint
  load, a write through ``get_optimizer_state``, counts that decay (half-life).
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.kernels import fused_cpu
from torchrec_adaptive.rules.slot_names import COUNT

from ..batches import Batch, zipf_batch

ROWS, DIMS, FTM, B = [300, 120, 90], [8, 4, 8], [0, 1, 2, 0], 24


def kernel(fused: bool = True, one_table: bool = False, **rule: float) -> AdaptiveTBE:
    torch.manual_seed(0)
    tables = [TableSpec(f"t{i}", n, d) for i, (n, d) in enumerate(zip(ROWS, DIMS))]
    k = AdaptiveTBE(tables[:1] if one_table else tables, tra.AdamAR.rule_config(lr=0.02, alpha=0.01, **rule),
                    feature_table_map=[0] if one_table else FTM, fused=fused)
    assert (k._fused is not None) == fused, "the path under test was not the one used"
    return k


def batches(n: int, seed: int = 3, weighted: bool = False) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [zipf_batch(ROWS, FTM, B, 3, g, weighted=weighted) for _ in range(n)]


def backward(k: AdaptiveTBE, b: Batch, psw: torch.Tensor | None = None) -> None:
    out = k(b.indices, b.offsets, psw if psw is not None else b.per_sample_weights)
    (out * torch.linspace(-1, 1, out.shape[1])).pow(2).sum().backward()


def same_state(a: AdaptiveTBE, b: AdaptiveTBE) -> bool:
    return torch.equal(a.weights, b.weights) and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a.named_buffers(), b.named_buffers()))


def one_table_batches() -> tuple[Batch, Batch]:
    """Two batches of one feature with the same IDs in the same order, in other bags
    (one table, one feature: the kernel's lookups differ in their offsets only)."""
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(1, 4, (B,), generator=g)
    lengths[:2] = torch.tensor([2, 1])
    indices = torch.randint(0, ROWS[0], (int(lengths.sum()),), generator=g)
    moved = lengths.clone()
    moved[:2] = torch.tensor([1, 2])
    return tuple(Batch(indices, torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]), None, B)
                 for n in (lengths, moved))  # type: ignore[return-value]


def other_ids(b: Batch) -> Batch:
    """Other IDs, the same bags (so the same sizes everywhere)."""
    shift = torch.tensor([ROWS[FTM[f]] for f in range(len(FTM))]).repeat_interleave(
        (b.offsets[1:] - b.offsets[:-1]).view(len(FTM), -1).sum(1))
    return Batch((b.indices + 7) % shift, b.offsets, b.per_sample_weights, b.batch_size)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
@pytest.mark.parametrize("change", ["other-ids", "other-bags", "other-weights"])
def test_an_update_after_a_capture_of_another_batch_groups_its_own(fused, change):
    """Capture batch X, then update with Y: exactly the update of Y alone (the capture
    changes nothing), so the capture's grouping of X was not reused for Y."""
    if change == "other-bags":
        x, y = one_table_batches()
    else:
        x = batches(1, weighted=change == "other-weights")[0]
        y = other_ids(x) if change == "other-ids" else Batch(x.indices, x.offsets, x.per_sample_weights.flip(0), B)
    a, b = kernel(fused, one_table=change == "other-bags"), kernel(fused, one_table=change == "other-bags")
    a.capture_next_backward()
    backward(a, x)
    backward(a, y)
    backward(b, y)
    assert a.optimizer_step == b.optimizer_step == 1
    assert same_state(a, b)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
def test_the_second_pass_of_the_same_batch_reuses_the_grouping(fused, monkeypatch):
    """Helen's second pass groups nothing again, and updates as a fresh grouping would."""
    calls: list[str] = []
    coalesce, sort = fused_cpu.FusedChain.coalesce, AdaptiveTBE._sorted_lookups
    monkeypatch.setattr(fused_cpu.FusedChain, "coalesce", lambda self, *a, **kw: calls.append("c") or coalesce(self, *a, **kw))
    monkeypatch.setattr(AdaptiveTBE, "_sorted_lookups", lambda self, *a, **kw: calls.append("s") or sort(self, *a, **kw))
    x = batches(1)[0]
    a, b = kernel(fused), kernel(fused)
    a.capture_next_backward()
    backward(a, x)
    grouped = len(calls)
    assert grouped == len(a.layout.groups)
    backward(a, x)
    assert len(calls) == grouped, "the second pass grouped its lookups again"
    backward(b, x)
    assert len(calls) == 2 * grouped  # a plain update groups afresh (the capture's was used once)
    assert same_state(a, b)


def scanned_peaks(k: AdaptiveTBE) -> torch.Tensor:
    return torch.stack([s[COUNT].max() for s in k.get_optimizer_state()])


def helen_step(k: AdaptiveTBE, b: Batch) -> None:
    k.capture_next_backward()
    backward(k, b)
    k.perturb_captured(0.05, 0.0, k.local_max_counts())
    backward(k, b)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-loops", "eager-chain"])
def test_running_max_count_equals_a_scan_after_every_write(fused, tmp_path):
    k = kernel(fused)
    data = batches(6)
    checkpoint = None
    for i, b in enumerate(data):
        helen_step(k, b)
        assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), f"after Helen step {i}"
        if i == 1:
            checkpoint = copy.deepcopy(k.state_dict())
    backward(k, data[0])  # a plain step of a batch seen before, between Helen steps
    helen_step(k, data[0])
    assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), "after a batch seen twice"

    hot = [int(s[COUNT].argmax()) for s in k.get_optimizer_state()]
    k.reinit_rows(0, torch.tensor([hot[0]]), seed=1, epoch=2, keep_counts=False)  # MEDA lowers table 0's max
    assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), "after MEDA's reinit"
    k.get_optimizer_state()[1][COUNT][hot[1]] = 0.0  # a write through the state views
    assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), "after a write to the counts"
    k.load_state_dict(checkpoint)  # an older checkpoint: lower counts everywhere
    assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), "after a checkpoint load"
    helen_step(k, data[3])
    assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), "after a step from the loaded state"


def test_running_max_count_with_decaying_counts():
    """With a half-life an update can lower the hot row's count: no running max then."""
    k = kernel(count_half_life=0.5)
    data = batches(8, seed=5)
    hot = torch.zeros(0, dtype=torch.long)
    for i, b in enumerate(data):
        helen_step(k, b if i % 2 == 0 else data[0])
        assert torch.equal(k.stored_count_peaks(), scanned_peaks(k)), f"after step {i}"
        hot = torch.cat([hot, scanned_peaks(k).unsqueeze(0)])
    assert (hot.diff(dim=0) < 0).any(), "no table's max count went down: the decay was not exercised"


def test_canary_tensor_version_counts_in_place_writes():
    """Canary for the one PyTorch private the running max relies on (sharpness.buffer_version,
    ``Tensor._version``): every in-place write to a buffer, directly or through a view of it,
    advances the counter, and reading does not."""
    from torchrec_adaptive.kernels.sharpness import buffer_version

    buf = torch.zeros(10, dtype=torch.float64)
    v0 = buffer_version(buf)
    _ = buf.max(), buf[2:5].sum()
    assert buffer_version(buf) == v0
    buf.index_copy_(0, torch.tensor([1]), torch.ones(1, dtype=torch.float64))
    v1 = buffer_version(buf)
    assert v1 > v0
    buf[3:6].copy_(torch.ones(3, dtype=torch.float64))  # a view's write (a checkpoint load, MEDA)
    assert buffer_version(buf) > v1
