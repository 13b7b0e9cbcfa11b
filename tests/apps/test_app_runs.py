"""The DLRM app end to end on 2 gloo ranks, through its real entry points (torchrun, torchx).

One study launch trains every method (plus DCN, TorchRec's TrainPipelineSparseDist, and
the Criteo, Avazu and generic-tabular readers on the real samples) for 2 tiny epochs;
then a run split by a checkpoint and ``--resume`` must equal the uninterrupted run, and
a failing job must fail through torchx with the error and the rank named, and a rank
killed mid-training must fail the job with that rank named.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
TINY = """
data:
  synthetic: {num_fields: 6, max_vocab: 2000, train_rows: 6000, test_rows: 2000}
train: {epochs: 2, batch_size: 128, eval_batch_size: 1024, freq_buckets: [1, 10, 100]}
"""
METHODS = ["adam", "stock_rowwise_adagrad", "adamar", "fal", "sparse_optimizer", "meda", "helen", "mlet"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def _torchrun(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", module, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _config(tmp: Path, name: str, text: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    cfgs = []
    for m in METHODS:
        cfgs.append(_config(tmp, m, f"base: [{ROOT}/configs/synthetic/{m}.yaml]\nname: {m}\n{TINY}"))
    # variants of the tiny method configs above (a file's own keys override its bases key by key)
    cfgs.append(_config(tmp, "dcn", "base: adamar.yaml\nname: dcn\n"
                                     "model: {arch: dlrm_dcn, dcn_num_layers: 2, dcn_low_rank_dim: 8}\n"))
    cfgs.append(_config(tmp, "pipelined", "base: fal.yaml\nname: pipelined\ntrain: {pipeline: sparse_dist}\n"))
    small = ("model: {embedding_dim: 8, dense_arch: [16, 8], over_arch: [16, 1]}\n"
             "train: {epochs: 2, batch_size: %d, eval_batch_size: 256}\n")
    cfgs.append(_config(tmp, "criteo", f"base: [{ROOT}/configs/criteo/adamar.yaml]\nname: criteo\n"
                                        f"data: {{train: {SHARED}/criteo_kaggle_sample.tsv, vocab_size: 1000}}\n"
                                        + small % 128))
    cfgs.append(_config(tmp, "avazu", f"base: [{ROOT}/configs/avazu/meda.yaml]\nname: avazu\n"
                                       f"data: {{train: {SHARED}/avazu_sample.csv, vocab_size: 1000}}\n" + small % 8))
    cfgs.append(_config(tmp, "tabular", f"base: [{ROOT}/configs/tabular/adamar.yaml]\nname: tabular\n"
                                         f"data: {{train: {SHARED}/avazu_sample.csv, vocab_size: 1000}}\n" + small % 8))
    assert (SHARED / "criteo_kaggle_sample.tsv").exists(), "../shared/data (the real samples) must be beside the checkout"
    out = tmp / "study"
    proc = _torchrun("torchrec_adaptive.apps.dlrm.study", "--configs", *map(str, cfgs), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return tmp, out, proc.stdout


# A DLRM trained for 2 tiny epochs on a few thousand rows scores far below this (the full
# synthetic teacher itself scores 0.91, METHODS.md): an AUC above it means the labels leak
# into what the model sees, or the metric is fed something other than the test predictions.
AUC_LEAK_BOUND = 0.9


def _test_labels(tmp, name):
    """The test set's labels, loaded here through the app's config and readers (not its evaluation)."""
    import torch

    from torchrec_adaptive.apps.dlrm.config import load_config
    from torchrec_adaptive.apps.dlrm.inputs import open_data

    test = open_data(load_config(tmp / f"{name}.yaml").data, ROOT, tmp / "labels_cache").test
    return torch.cat([torch.from_numpy(test.read(unit, 0, n).labels) for unit, n in test.units])


@pytest.mark.parametrize("name", METHODS + ["dcn", "pipelined", "criteo", "avazu", "tabular"])
def test_every_method_and_reader_trains_and_evaluates(study, name):
    tmp, out, _ = study
    recs = _metrics(out / name)
    labels = _test_labels(tmp, name)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert math.isfinite(r["train_loss"]) and r["samples_per_s_per_rank"] > 0
        # every test row scored exactly once over the ranks, with its own label
        assert r["test_rows"] == labels.numel()
        assert r["test_ctr"] == pytest.approx(float(labels.double().mean()), abs=1e-9)
        assert r["test_auc"] is not None and 0.0 < r["test_auc"] < AUC_LEAK_BOUND and math.isfinite(r["test_logloss"])
        assert sum(b["rows"] for b in r["buckets"]) == r["test_rows"]
        positives = sum(b["ctr"] * b["rows"] for b in r["buckets"] if b["rows"])
        assert positives == pytest.approx(float(labels.sum()), abs=1e-6)
    if name in ("adam", "adamar", "fal", "sparse_optimizer", "meda", "helen", "mlet", "stock_rowwise_adagrad", "dcn", "pipelined"):
        # trained as well as evaluated: the synthetic teacher is learnable within 2 tiny epochs
        assert recs[-1]["test_auc"] > 0.55, recs[-1]["test_auc"]
    assert (recs[0]["reinit_rows"] == {}) and ((recs[1]["reinit_rows"] != {}) == (name in ("meda", "avazu")))
    assert sorted(p.name for p in (out / name / "checkpoints").iterdir()) == ["epoch_1", "epoch_2"]
    if name == "pipelined":  # TrainPipelineSparseDist reorders communication, not arithmetic
        for rp, rf in zip(recs, _metrics(out / "fal")):
            for key in ("train_loss", "test_auc", "test_logloss"):
                assert rp[key] == pytest.approx(rf[key], abs=1e-6), key
    diag = [json.loads(ln) for ln in (out / name / "diagnostics.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in diag] == [1, 2]
    # FBGEMM keeps no row counts: only tables trained by our kernel have row statistics
    assert bool(diag[0]["tables"]) == (name != "stock_rowwise_adagrad")


def test_study_prints_the_table_and_writes_the_plot(study):
    _, out, stdout = study
    assert "Test AUC per epoch" in stdout and "| adamar |" in stdout and "| meda |" in stdout
    png = out / "auc_by_epoch.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "| mlet |" in (out / "summary.md").read_text()


def test_resume_after_a_checkpoint_equals_the_uninterrupted_run(study):
    tmp, out, _ = study
    cfg = tmp / "meda.yaml"  # MEDA's re-init and Adam's state both cross the epoch boundary
    split = tmp / "split"
    first = _torchrun("torchrec_adaptive.apps.dlrm.train", "--config", str(cfg), "--out", str(split),
                      "--set", "train.epochs=1")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = _torchrun("torchrec_adaptive.apps.dlrm.train", "--config", str(cfg), "--out", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    a, b = _metrics(out / "meda"), _metrics(split)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "test_auc", "test_logloss"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), (ra["epoch"], key)
        assert rb["reinit_rows"] == ra["reinit_rows"]


def test_a_failing_rank_fails_the_torchx_job_with_its_error(tmp_path):
    if shutil.which("torchx", path=str(BIN)) is None:
        pytest.fail("torchx is not installed in the venv (requirements/base.txt pins torchx-nightly)")
    cfg = _config(tmp_path, "broken", f"base: [{ROOT}/configs/criteo/adam.yaml]\nname: broken\n"
                                       f"data: {{train: {tmp_path}/no_such_day.tsv}}\n")
    cmd = [str(BIN / "torchx"), "run", "--wait", "--log", "launch/components.py:dlrm", "--config", str(cfg),
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "no_such_day.tsv" in text and "FAILED" in text
    assert "rank" in text.lower()


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids += [int(k) for k in text]
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def test_a_rank_killed_mid_training_fails_the_job_naming_it(study, tmp_path):
    import signal
    import time

    base, _, _ = study

    def kill_rank_1(out):
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
               "torchrec_adaptive.apps.dlrm.train", "--config", str(base / "adam.yaml"), "--out", str(out),
               "--set", "train.epochs=50"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 300
            while not (out / "metrics.jsonl").exists():  # rank 0 writes it after epoch 1: both ranks are training
                assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before epoch 1"
                time.sleep(0.5)
            victim = next(p for p in _children(proc.pid) if _rank_of(p) == 1)
            os.kill(victim, signal.SIGKILL)
            text, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc, text

    proc, text = kill_rank_1(tmp_path / "killed")
    # torchrun itself can crash reading rank 0's error file while that rank is being torn down
    # (an empty file: JSONDecodeError in torch's _capture_process_failures), an upstream race that
    # says nothing about our app; seen once in several CI runs. Then the probe runs once more.
    if "_capture_process_failures" in text and "JSONDecodeError" in text:
        proc, text = kill_rank_1(tmp_path / "killed_again")
    assert proc.returncode != 0
    assert "rank" in text and ": 1 (local_rank: 1)" in text and "SIGKILL" in text, text[-3000:]
