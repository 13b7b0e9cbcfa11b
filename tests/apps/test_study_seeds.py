"""The study over several seeds: the aggregation (mean ± std per epoch, bands) on hand-made
metrics, and one tiny 2-rank ``study --seeds`` launch through torchrun."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from torchrec_adaptive.apps.dlrm import report

from .test_app_runs import ROOT, TINY, _torchrun

AUC = {  # seed -> run -> per-epoch AUC (made up; the numbers the aggregation must reproduce)
    0: {"a": [0.70, 0.75, 0.74], "b": [0.60, 0.70, 0.80]},
    1: {"a": [0.72, 0.73, 0.70], "b": [0.62, 0.71, 0.79]},
    2: {"a": [0.71, 0.77, 0.72], "b": [0.61, 0.69, 0.84]},
}


def _write(root: Path, run: str, aucs: list[float]) -> None:
    d = root / run
    d.mkdir(parents=True)
    buckets = [{"min_count": 0, "max_count": 1, "rows": 5, "auc": aucs[-1] - 0.1},
               {"min_count": 1, "max_count": None, "rows": 7, "auc": None}]
    d.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"run": run, "epoch": e, "test_auc": a, "test_logloss": 1 - a, "buckets": buckets}) + "\n"
        for e, a in enumerate(aucs, start=1)))
    d.joinpath("diagnostics.jsonl").write_text("".join(
        json.dumps({"run": run, "epoch": e, "tables": {"t": {"sq_norm_by_count": [a] * 24}}}) + "\n"
        for e, a in enumerate(aucs, start=1)))


@pytest.fixture
def study(tmp_path: Path) -> Path:
    for seed, runs in AUC.items():
        for run, aucs in runs.items():
            _write(tmp_path / f"seed_{seed}", run, aucs)
    return tmp_path


def test_mean_and_std_per_epoch_over_seeds(study: Path) -> None:
    runs = report.read_study(study, ["b", "a"])
    assert list(runs) == ["b", "a"] and all(len(s) == 3 for s in runs.values())
    for name in ("a", "b"):
        epochs, mean, std, n = report.seed_stats(runs[name])
        cols = list(zip(*(AUC[s][name] for s in AUC)))
        assert epochs == [1, 2, 3] and n == 3
        assert mean.tolist() == pytest.approx([statistics.mean(c) for c in cols], abs=1e-12)
        assert std.tolist() == pytest.approx([statistics.stdev(c) for c in cols], abs=1e-12)
    table = report.mean_table(runs)
    # a: means 0.71, 0.75, 0.72 -> best epoch 2, last - best -0.03; b: best is the last epoch
    assert "| a | 0.7100 ± 0.0100 | 0.7500 ± 0.0200 | 0.7200 ± 0.0200 | 0.7500 (2) | -0.0300 | 3 |" in table
    assert "| b |" in table and "0.8100 (3) | +0.0000 | 3 |" in table
    buckets = report.mean_bucket_table(runs)
    assert "| a | 0.6200 ± 0.0200 | nan" in buckets


def test_plots_with_bands_and_norms(study: Path, tmp_path_factory) -> None:
    out = tmp_path_factory.mktemp("plots")
    report.main(["--study", str(study), "--plot", str(out / "auc.png"), "--norms-plot", str(out / "norms.png")])
    for name in ("auc.png", "norms.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epochs, norms = report.read_norms(study / "seed_0" / "a" / "diagnostics.jsonl")
    assert epochs == [1, 2, 3] and norms[:, 0].tolist() == pytest.approx([4 * a for a in AUC[0]["a"]])


def test_a_missing_run_is_named(study: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"\['c'\]"):
        report.read_study(study, ["a", "c"])


def test_study_with_seeds_end_to_end(tmp_path: Path) -> None:
    cfg = tmp_path / "adamar.yaml"
    cfg.write_text(f"base: [{ROOT}/configs/synthetic/adamar.yaml]\nname: adamar\n{TINY}")
    out = tmp_path / "study"
    proc = _torchrun("torchrec_adaptive.apps.dlrm.study", "--configs", str(cfg), "--out", str(out),
                     "--seeds", "3", "5", "--set", "train.epochs=1", "--set", "train.checkpoint=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    runs = report.read_study(out, ["adamar"])["adamar"]
    assert [rs[0]["epoch"] for rs in runs] == [1, 1]
    assert runs[0][0]["test_auc"] != runs[1][0]["test_auc"], "the seed must change the run (init, shuffling)"
    for seed in (3, 5):
        saved = json.loads((out / f"seed_{seed}" / "adamar" / "config.json").read_text())["config"]
        assert saved["train"]["seed"] == seed and saved["data"]["synthetic"]["seed"] == 0  # same data set
    assert [p.name for p in (out / ".data_cache").iterdir()], "one data cache shared by the seeds"
    assert not (out / "seed_3" / ".data_cache").exists()
    assert " ± " in (out / "summary.md").read_text() and "| adamar |" in proc.stdout
    assert (out / "auc_by_epoch.png").stat().st_size > 10_000


STUDY_CONFIGS = sorted(p for d in ("study", "regimes") for p in (ROOT / "configs" / "synthetic" / d).glob("[!_]*.yaml"))


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_study_configs_load(path: Path) -> None:
    """The grids and regimes of docs/results.md (configs/synthetic/{study,regimes}) load, named by file."""
    from torchrec_adaptive.apps.dlrm.config import load_config

    assert load_config(path).name == path.stem


def test_alpha_per_epoch_becomes_alpha_per_step() -> None:
    """AdamAR's decay per epoch (docs/results.md section 5): alpha = alpha_per_epoch / steps per epoch,
    handed to the tables' optimizer by build_model; bad combinations fail at config load."""
    import torch

    from torchrec_adaptive.apps.dlrm.config import ConfigError, SparseOptimizerConfig, load_config
    from torchrec_adaptive.apps.dlrm.model import build_model
    from torchrec_adaptive.apps.dlrm.decay_units import per_step_kwargs

    so = SparseOptimizerConfig("adamar", {"lr": 1e-3, "alpha_per_epoch": 2.44})
    assert per_step_kwargs(so, 244) == {"lr": 1e-3, "alpha": pytest.approx(0.01, rel=1e-12)}
    assert per_step_kwargs(so, 1)["alpha"] == 1.0  # clipped: the linear decay's alpha is at most 1
    cfg = load_config(ROOT / "configs/synthetic/adamar.yaml", ["sparse_optimizer.kwargs={lr: 1.0e-3, alpha_per_epoch: 2.44}"])
    _, emb = build_model(cfg, [f"f{i}" for i in range(3)], [50, 60, 70], 4, torch.device("cpu"), steps_per_epoch=122)
    kwargs = [p._optimizer_kwargs[0] for p in emb.parameters()]
    assert kwargs and all(k["alpha"] == pytest.approx(0.02, rel=1e-12) and "alpha_per_epoch" not in k for k in kwargs)
    both = SparseOptimizerConfig("adamar", {"lr": 1e-3, "alpha": 3e-2, "alpha_per_epoch": 2.44})
    assert per_step_kwargs(both, 244) == {"lr": 1e-3, "alpha": 3e-2}  # an explicit per-step alpha wins
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(ROOT / "configs/synthetic/adamar.yaml", ["sparse_optimizer.kwargs={lr: 1.0e-3, alpha_per_epoch: -1.0}"])
    with pytest.raises(ConfigError, match="AdamAR's decay per epoch"):
        load_config(ROOT / "configs/synthetic/adam.yaml", ["sparse_optimizer.kwargs={lr: 1.0e-3, alpha_per_epoch: 2.0}"])
