"""Nothing lost, nothing silently wrong in the app (issue 12, findings 1, 2, 4, 5, 6): the probes
of the issue as regression tests.

Three tiny 2-rank launches share one run folder: run A trains 2 epochs; its newest checkpoint
is truncated (and a killed save's leftover folder added), and ``--resume`` with more epochs
must say so, fall back to epoch 1 and retrain epoch 2 exactly as before; then a fresh run B
in the same folder must move A aside and inherit none of its checkpoints. The rest (run
identity, changed config, nothing to resume, flags through the module CLI, the torchx
components and ``scripts/demo.sh``, ``--gpu`` without a GPU) needs no training and runs
in-process. The NaN-then-continue probe (finding 3) lives with the kernels (issue 12b).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from torchrec_adaptive.apps.dlrm import runs
from torchrec_adaptive.apps.dlrm.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = f"""base: [{ROOT}/configs/synthetic/adamar.yaml]
name: tiny
data:
  synthetic: {{num_fields: 4, max_vocab: 500, train_rows: 2000, test_rows: 500}}
model: {{embedding_dim: 8, dense_arch: [16, 8], over_arch: [16, 1]}}
train: {{epochs: 2, batch_size: 128, eval_batch_size: 512, freq_buckets: [1, 10], diagnostics: false}}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def _train(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "torchrec_adaptive.apps.dlrm.train",
           *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs_in_one_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp / "out"
    a = _train("--config", str(cfg), "--out", str(out), "--set", "sparse_optimizer.kwargs.alpha=0.01")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    first = _metrics(out)
    run_a = json.loads((out / "config.json").read_text())["run_id"]
    # Damage: epoch 2's shard of rank 1 truncated; a save killed mid-way left its temporary folder.
    shard = out / "checkpoints" / "epoch_2" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-64])
    shutil.copytree(out / "checkpoints" / "epoch_1", out / "checkpoints" / "epoch_3.tmp-0123456789ab")
    resumed = _train("--config", str(cfg), "--out", str(out), "--set", "sparse_optimizer.kwargs.alpha=0.01",
                     "--set", "train.epochs=3", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after_resume = _metrics(out)
    record = json.loads((out / "config.json").read_text())
    fresh = _train("--config", str(cfg), "--out", str(out), "--set", "sparse_optimizer.kwargs.alpha=0.5",
                   "--set", "train.epochs=1")
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    return {"cfg": cfg, "out": out, "first": first, "run_a": run_a, "resumed": resumed, "after_resume": after_resume,
            "record_after_resume": record, "fresh": fresh}


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(runs_in_one_folder):
    r = runs_in_one_folder
    text = r["resumed"].stdout
    assert "__1_0.distcp" in text and "epoch_2" in text and "falling back" in text, text[-3000:]
    assert "fell back to" in text and "epoch_1" in text and "removed an unfinished save" in text, text[-3000:]
    recs = r["after_resume"]
    assert [x["epoch"] for x in recs] == [1, 2, 3], recs
    # Epoch 2 retrained from epoch 1's checkpoint equals the uninterrupted epoch 2.
    for key in ("train_loss", "test_auc", "test_logloss"):
        assert recs[1][key] == pytest.approx(r["first"][1][key], abs=1e-6), key
    assert {x["run_id"] for x in recs} == {r["run_a"]}
    history = r["record_after_resume"]["history"]
    assert [h["event"] for h in history] == ["start", "resume"], history
    assert history[1]["from_epoch"] == 1 and history[1]["changes"] == {"train.epochs": [2, 3]}, history


def test_a_fresh_run_never_inherits_an_earlier_runs_checkpoints(runs_in_one_folder):
    from torchrec_adaptive.distributed.checkpoint import read_info

    r = runs_in_one_folder
    out = r["out"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_1"]
    record = json.loads((out / "config.json").read_text())
    assert record["run_id"] != r["run_a"] and record["config"]["sparse_optimizer"]["kwargs"]["alpha"] == 0.5
    assert read_info(str(out / "checkpoints" / "epoch_1"))["run_id"] == record["run_id"]
    (moved,) = list((out / runs.PREVIOUS).iterdir())
    assert r["run_a"] in moved.name and "moved to" in r["fresh"].stdout
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["epoch_1", "epoch_2", "epoch_3"]
    assert [x["epoch"] for x in _metrics(moved)] == [1, 2, 3]
    assert [x["epoch"] for x in _metrics(out)] == [1]


def test_resume_with_a_changed_config_is_refused_unless_allowed(runs_in_one_folder):
    r = runs_in_one_folder
    out, cfg = r["out"], r["cfg"]  # run B: alpha 0.5, 1 epoch
    changed = to_dict(load_config(cfg, ["sparse_optimizer.kwargs.alpha=0.7", "train.epochs=2"]))
    with pytest.raises(runs.RunError, match=r"sparse_optimizer\.kwargs\.alpha: 0\.5 -> 0\.7"):
        runs.plan_run(out, changed, resume=True)
    plan = runs.plan_run(out, changed, resume=True, allow_config_change=True)
    assert plan.changes == {"sparse_optimizer.kwargs.alpha": [0.5, 0.7], "train.epochs": [1, 2]}
    assert [e for e, _ in plan.candidates] == [1]
    same = to_dict(load_config(cfg, ["sparse_optimizer.kwargs.alpha=0.5", "train.epochs=4"]))
    assert runs.plan_run(out, same, resume=True).changes == {"train.epochs": [1, 4]}  # more epochs: the same run


# ---------------------------------------------------------------- no training needed

def _config(alpha: float = 0.01) -> dict:
    return to_dict(load_config(ROOT / "configs/synthetic/adamar.yaml", [f"sparse_optimizer.kwargs.alpha={alpha}"]))


def _fake_checkpoint(out: Path, epoch: int, run_id: str | None) -> None:
    p = out / "checkpoints" / f"epoch_{epoch}"
    p.mkdir(parents=True)
    (p / ".metadata").write_bytes(b"x")
    if run_id is not None:
        (p / "manifest.json").write_text(json.dumps({"files": {}, "info": {"run_id": run_id, "epoch": epoch}}))


def test_nothing_to_resume_is_said_clearly(tmp_path):
    with pytest.raises(runs.RunError, match="nothing to resume .* no run .*Check --out"):
        runs.plan_run(tmp_path / "typo", _config(), resume=True)
    plan = runs.plan_run(tmp_path / "new", _config(), resume=True, missing_ok=True)  # the study: start it
    assert not plan.candidates and any("starting a new run" in m for m in plan.messages)
    out = tmp_path / "run"
    rec = runs.plan_run(out, _config(), resume=False).record
    _fake_checkpoint(out, 3, "someone-else")  # a stale checkpoint of another run
    _fake_checkpoint(out, 4, None)  # an unfinished save
    with pytest.raises(runs.RunError, match=f"no finished checkpoint of run {rec.run_id}"):
        runs.plan_run(out, _config(), resume=True)
    _fake_checkpoint(out, 2, rec.run_id)
    plan = runs.plan_run(out, _config(), resume=True)
    assert [e for e, _ in plan.candidates] == [2]
    assert any("someone-else" in m for m in plan.messages) and any("no manifest" in m for m in plan.messages)


def test_an_older_apps_folder_is_not_resumed_blindly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config()))  # the old layout: the config alone
    _fake_checkpoint(tmp_path, 1, None)
    with pytest.raises(runs.RunError, match="older version of the app"):
        runs.plan_run(tmp_path, _config(), resume=True)
    plan = runs.plan_run(tmp_path, _config(), resume=False)
    assert any("moved to" in m for m in plan.messages) and not (tmp_path / "checkpoints").exists()


def test_resume_is_a_plain_flag_everywhere():
    from torchx.specs.builders import materialize_appdef

    import launch.components as components
    from torchrec_adaptive.apps.dlrm.train import parser

    assert parser().parse_args(["--config", "c.yaml", "--resume"]).resume is True
    with pytest.raises(SystemExit):
        parser().parse_args(["--config", "c.yaml", "--resume", "yes"])

    def app_args(fn, *argv: str) -> str:
        app = materialize_appdef(fn, list(argv))
        return " ".join(app.roles[0].args)

    for fn in (components.dlrm, components.study):
        assert "--resume" not in app_args(fn)
        assert "--resume" in app_args(fn, "--resume", "true")
        assert "--allow-config-change" in app_args(fn, "--resume", "true", "--allow_config_change", "true")
        for bad in ("yes", "1", "True1"):  # torchx's own bool would read these as False without a word
            with pytest.raises(ValueError, match="takes true or false"):
                app_args(fn, "--resume", bad)


def test_demo_script_passes_resume_as_a_plain_flag():
    env = {**_env(), "DEMO_TORCHX_OPTS": "--dryrun"}
    proc = subprocess.run(["bash", "scripts/demo.sh", "--resume", "train.epochs=2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (proc.stdout + proc.stderr).replace("'\n", "").replace("\n", " ")
    assert "--resume" in text and "train.epochs=2" in text, text[-3000:]
    bad = subprocess.run(["bash", "scripts/demo.sh", "--resume", "yes"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "plain flag" in bad.stderr, bad.stderr[-2000:]


def test_study_resume_with_a_mistyped_out_fails(tmp_path):
    from torchrec_adaptive.apps.dlrm import study

    with pytest.raises(SystemExit, match="no study in"):
        study.main(["--configs", str(ROOT / "configs/synthetic/adam.yaml"), "--out", str(tmp_path / "typo"),
                    "--resume"])


def test_gpus_asked_for_without_a_gpu_is_an_error():
    import torch

    import launch.components as components
    from torchrec_adaptive.apps.dlrm.train import select_device
    from torchx.specs.builders import materialize_appdef

    args = " ".join(materialize_appdef(components.dlrm, ["--gpu", "2"]).roles[0].args)
    assert "--device cuda" in args
    assert "--device cpu" in " ".join(materialize_appdef(components.dlrm, []).roles[0].args)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="torch.cuda.is_available\\(\\) is False"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
