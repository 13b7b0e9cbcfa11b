"""On a GPU, nothing the app's training step touches may be a CPU tensor: NCCL reduces only
device tensors, a CPU batch reaching a GPU model fails (or silently trains on the host), and
reading a loss every step waits for the GPU. No GPU here, so the step runs on PyTorch's
``meta`` device, a device that is not the CPU and holds no data: the checking model and the
checking collectives below record every tensor's device, and any read of a value on the host
(``float(loss)``, ``.item()``, a boolean mask's size) raises there. A single-rank gloo group
stands in for the job; the collectives are replaced by checks (a one-rank reduction is the
identity).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from torchrec_adaptive import AdamAR, AdaptiveTBE, TableSpec
from torchrec_adaptive import diagnostics
from torchrec_adaptive.apps.dlrm import evaluate as evaluate_mod
from torchrec_adaptive.apps.dlrm.config import DenseOptimizerConfig, load_config
from torchrec_adaptive.apps.dlrm.optim import dense_optimizer
from torchrec_adaptive.apps.dlrm.train import TrainRecipe, resolve_pipeline

DEVICE = torch.device("meta")
TINY = """
base: [{root}/configs/synthetic/adam.yaml]
name: placement
data:
  synthetic: {{num_fields: 3, max_vocab: 200, train_rows: 600, test_rows: 300}}
train: {{epochs: 1, batch_size: 64, eval_batch_size: 128, freq_buckets: [1, 10], diagnostics: false}}
"""
ROOT = Path(__file__).resolve().parents[2]


class CheckingDLRM(nn.Module):
    """DLRMTrain's interface (batch -> (loss, (loss, logits, labels))), on ``DEVICE``; records the
    device of every tensor of every batch it is given."""

    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_dense, device=DEVICE))
        self.seen: list[tuple[str, torch.device]] = []

    def forward(self, batch):
        kjt = batch.sparse_features
        for name, t in (("dense_features", batch.dense_features), ("labels", batch.labels),
                        ("sparse values", kjt.values()), ("sparse lengths", kjt.lengths())):
            self.seen.append((name, t.device))
        logits = batch.dense_features @ self.w
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


@pytest.fixture
def one_rank(tmp_path, monkeypatch):
    """A one-rank gloo group; all_reduce replaced by a check that records each tensor's device."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    reduced: list[torch.device] = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.device)  # one rank: the sum is the tensor itself

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    try:
        yield reduced
    finally:
        dist.destroy_process_group()


def _recipe(tmp_path: Path) -> TrainRecipe:
    cfg_path = tmp_path / "placement.yaml"
    cfg_path.write_text(TINY.format(root=ROOT))
    r = TrainRecipe(load_config(cfg_path), tmp_path / "run", device_kind="cpu")
    r.device = DEVICE  # what select_device gives on a GPU machine, here a non-CPU device without data
    r.setup_data()  # the real input: CPU batches from the streaming reader
    r.model = CheckingDLRM(r.data.meta.num_dense)
    r.dense_opt = dense_optimizer(r.model, DenseOptimizerConfig(name="sgd", lr=0.1))
    return r


def test_training_step_keeps_batches_loss_and_collectives_on_the_device(tmp_path, one_rank):
    r = _recipe(tmp_path)
    trained = r.train_epoch(1)
    assert r.steps >= 2 and len(r.model.seen) == 4 * r.steps
    on_cpu = sorted({name for name, d in r.model.seen if d != DEVICE})
    assert not on_cpu, f"CPU tensors reached the model: {on_cpu}"
    assert one_rank and all(d == DEVICE for d in one_rank), f"collectives got tensors on {one_rank}"
    assert trained.loss_sum.device == DEVICE  # summed on the device; read once, for the epoch's record
    assert r.model.w.grad is not None and r.model.w.grad.device == DEVICE


def test_evaluation_moves_batches_buckets_and_masks_to_the_device(tmp_path, one_rank, monkeypatch):
    seen: list[torch.device] = []

    class CheckingEvaluator:
        def __init__(self, edges, device):
            assert device == DEVICE

        def update(self, logits, labels, bucket, valid):
            seen.extend(t.device for t in (logits, labels, bucket, valid))

        def compute(self):
            return {}

    monkeypatch.setattr(evaluate_mod, "Evaluator", CheckingEvaluator)
    r = _recipe(tmp_path)
    assert r.evaluate() == {}
    assert seen and all(d == DEVICE for d in seen), seen
    assert all(d == DEVICE for _, d in r.model.seen)


def test_row_statistics_stay_on_the_device_and_reduce_there(one_rank, monkeypatch):
    """The rows' histograms are built where the rows are and reduced on the process group's
    device (NCCL: the GPU, stood in for by ``meta``), also for a table only another rank holds."""
    monkeypatch.setattr(diagnostics, "collective_device", lambda: DEVICE)
    real_gather = dist.all_gather_object

    def all_gather_object(out, names):  # another rank holds table "elsewhere"
        real_gather(out, names)
        out[0] = [*out[0], "elsewhere"]

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    kernel = AdaptiveTBE([TableSpec("t", 50, 4)], AdamAR.rule_config(lr=0.01, alpha=1e-3),
                                         device=DEVICE)
    stats = diagnostics.row_statistics(kernel)
    assert sorted(stats) == ["elsewhere", "t"]
    assert one_rank == [DEVICE]
    assert {v.device for s in stats.values() for v in s.values()} == {DEVICE}


def test_sparse_dist_pipeline_is_the_default_on_cuda():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    cfg = {m: load_config(ROOT / f"configs/synthetic/{m}.yaml") for m in ("adamar", "helen", "mlet", "stock_adam")}
    assert cfg["adamar"].train.pipeline == "auto"
    assert resolve_pipeline(cfg["adamar"], cuda) == "sparse_dist" == resolve_pipeline(cfg["stock_adam"], cuda)
    assert resolve_pipeline(cfg["adamar"], cpu) == "plain"
    assert resolve_pipeline(cfg["helen"], cuda) == "plain"  # two passes per step
    assert resolve_pipeline(cfg["mlet"], cuda) == "plain"  # the pipeline cannot trace MLET's tables
    plain = load_config(ROOT / "configs/synthetic/adamar.yaml", ["train.pipeline=plain"])
    assert resolve_pipeline(plain, cuda) == "plain"


def test_the_input_thread_pins_batches_for_a_gpu(tmp_path, one_rank, monkeypatch):
    """For a GPU, batches reach the step in page-locked memory (so ``non_blocking`` copies are
    asynchronous), pinned in the input thread, off the step, with the rank's GPU made current there.
    No GPU here: pinning is recorded, not done."""
    import threading

    pinned: list[str] = []
    current: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(threading.current_thread().name)
                        or self)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append((threading.current_thread().name, d)))
    cfg_path = tmp_path / "placement.yaml"
    cfg_path.write_text(TINY.format(root=ROOT))
    r = TrainRecipe(load_config(cfg_path), tmp_path / "run", device_kind="cpu")
    r.setup_data()
    gpu = torch.device("cuda", 1)
    kw = dict(epoch=1, seed=0, shuffle=True, rank=0, world=1, steps=r.steps, shuffle_rows=64, prefetch=2)
    assert len(list(r.data.train_batches(64, **kw))) == r.steps and not pinned  # CPU training: nothing pinned
    batches = list(r.data.train_batches(64, device=gpu, **kw))
    assert len(batches) == r.steps and current == [("dlrm-input", gpu)]
    # dense, labels and the KJT's values, lengths (and offsets) of every batch, all in the input thread
    assert len(pinned) >= 4 * r.steps and set(pinned) == {"dlrm-input"}
    pinned.clear()
    evals = list(r.data.eval_batches(r.buckets, 128, rank=0, world=1, prefetch=2, device=gpu))
    assert evals and len(pinned) >= 6 * len(evals) and set(pinned) == {"dlrm-input"}  # batch, bucket, valid
