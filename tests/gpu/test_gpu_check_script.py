"""What of ``scripts/gpu_check.sh`` a CPU machine can check (no ``gpu`` mark: these run everywhere):
the script parses, its dry run lists every step within the 8-minute budget, the commands it runs
accept their arguments (up to the point where they need a GPU, where they fail saying so), and
its summary reads the steps' files against issue 10's targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_check_summary import summarize  # noqa: E402


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=60, **kw)


def test_script_parses_and_dry_run_lists_every_step_within_budget(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = _run(str(tmp_path / "o"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    steps = [ln.split(" (limit")[0] for ln in lines if "(limit " in ln]
    assert steps == ["env", "gpu_tests", "kernel_step", "app", "summary"]
    total = int(lines[-1].split("limits together: ")[1].rstrip("s after the bootstrap"))
    assert total <= 8 * 60
    assert f"OUT_DIR={tmp_path / 'o'}" in lines[0] and not (tmp_path / "o").exists()  # a dry run writes nothing
    assert "-m gpu tests/gpu" in proc.stdout and "--device cuda" in proc.stdout and "--nproc_per_node 1" in proc.stdout
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "from_env")}
    assert f"OUT_DIR={tmp_path / 'from_env'}" in _run("--dry-run", env=env).stdout.splitlines()[0]
    assert _run("--bogus").returncode == 2


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs the check itself")
def test_without_a_gpu_it_refuses_and_writes_nothing(tmp_path):
    proc = _run(str(tmp_path / "o"))
    assert proc.returncode == 1 and "no GPU" in proc.stderr and not (tmp_path / "o").exists()


def test_its_commands_take_their_arguments_and_fail_clearly_without_a_gpu(tmp_path):
    """kernel_step's and the study's command lines, exactly as the dry run prints them, on a CPU:
    the arguments and the three configs load and validate, then each stops at the missing GPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs them for real")
    cmds = {ln.split(" (limit")[0]: ln.split("): ", 1)[1] for ln in _run(str(tmp_path), "--dry-run").stdout.splitlines()
            if "(limit " in ln}
    py = str(Path(sys.executable))
    ks = subprocess.run(cmds["kernel_step"].replace(".venv/bin/python", py), shell=True, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ks.returncode == 2 and "--device cuda: torch.cuda.is_available() is False" in ks.stderr, ks.stderr
    study = cmds["app"].split("-m ", 1)[1]  # the study without torchrun: it fails before any collective
    app = subprocess.run(f"{py} -m {study}", shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert app.returncode != 0 and "GPUs were asked for" in app.stderr, app.stderr[-2000:]


def _fake_outputs(out: Path, adamar_kernel: float, adamar_app: float) -> None:
    out.mkdir(parents=True)
    (out / "steps.tsv").write_text("env\t0\t2\t15\ngpu_tests\t0\t80\t150\nkernel_step\t0\t40\t90\napp\t0\t150\t200\n")
    (out / "env.log").write_text("GPU 0: NVIDIA H200\ntorch 2.13.0 cuda 12.8 device NVIDIA H200 fbgemm_gpu 1.8.0\n")
    (out / "gpu_tests.xml").write_text('<testsuites><testsuite name="pytest" tests="11" failures="0" errors="0" '
                                       'skipped="0"></testsuite></testsuites>')
    results = []
    for pooling in (1, 8):
        for case, ratio in (("fbgemm ADAM", 1.0), ("ours AdamAR", adamar_kernel), ("ours FAL+AdamAR", 1.2)):
            results.append({"pooling": pooling, "case": case, "step_ms": ratio, "vs_fbgemm_rowwise_adagrad": ratio,
                            "vs_fbgemm_adam": ratio, "floor_ms": 0.1, "vs_floor": 10 * ratio})
    (out / "kernel_step.json").write_text(json.dumps({"device": "cuda", "bandwidth_Bps": 4.3e12, "results": results}))
    for name, rate in (("adamar", 1000 * adamar_app), ("adam", 1000.0), ("stock_adam", 1000.0)):
        (out / "app" / name).mkdir(parents=True)
        rec = {"epoch": 1, "train_loss": 0.45, "test_auc": 0.7, "samples_per_s_per_rank": rate, "train_seconds": 5,
               "device": "cuda:0", "process_group": "nccl", "pipeline": "sparse_dist"}
        (out / "app" / name / "metrics.jsonl").write_text(json.dumps(rec) + "\n")


def test_summary_checks_the_targets(tmp_path):
    _fake_outputs(tmp_path / "good", adamar_kernel=1.4, adamar_app=0.95)
    good = summarize(tmp_path / "good")
    assert good["ok"] and all(t["met"] for t in good["targets"].values()), good["targets"]
    assert good["app"]["adamar"]["vs_stock_adam"] == pytest.approx(0.95)
    assert good["gpu_tests"]["passed"] == 11 and good["env"].endswith("fbgemm_gpu 1.8.0")
    steps = tmp_path / "good" / "steps.tsv"
    steps.write_text(steps.read_text().replace("kernel_step\t0\t40", "kernel_step\t124\t90"))
    timed_out = summarize(tmp_path / "good")  # every number there, but a step ran out of time
    assert not timed_out["ok"] and timed_out["steps"]["kernel_step"]["timed_out"]

    _fake_outputs(tmp_path / "slow", adamar_kernel=1.6, adamar_app=0.8)
    slow = summarize(tmp_path / "slow")
    assert not slow["ok"]
    missed = sorted(k for k, t in slow["targets"].items() if not t["met"])
    assert missed == ["app AdamAR samples/s / FBGEMM Adam", "kernel ours AdamAR pooling 1 / FBGEMM Adam",
                      "kernel ours AdamAR pooling 8 / FBGEMM Adam"]

    (tmp_path / "empty").mkdir()
    empty = summarize(tmp_path / "empty")  # every step failed before writing: nothing guessed
    assert not empty["ok"] and empty["kernel_step"] is None and empty["app"]["adamar"] is None
