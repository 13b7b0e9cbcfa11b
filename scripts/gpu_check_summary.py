"""``OUT_DIR/summary.json`` of ``scripts/gpu_check.sh``: what each step left, against issue 10's targets.

    .venv/bin/python scripts/gpu_check_summary.py OUT_DIR

Reads ``steps.tsv`` (step, exit status, seconds, limit), ``env.log``, ``gpu_tests.xml`` (pytest's
JUnit report), ``kernel_step.json`` and the app's ``app/<run>/metrics.jsonl``; whatever a failed
step did not write is reported missing, never guessed. Targets (benchmarks, not tests):
our AdamAR and FAL+AdamAR step <= 1.5x FBGEMM's fused Adam (both pooling factors); the app's
samples/s with our AdamAR >= 0.9x the same DLRM with FBGEMM's fused Adam; the app trained on CUDA
over NCCL. Exits 0 when every step passed and every target was met, else 1.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

KERNEL_TARGET = 1.5  # ours / FBGEMM fused Adam, step time
APP_TARGET = 0.9  # ours / FBGEMM fused Adam, samples/s
APP_RUNS = ("adamar", "adam", "stock_adam")


def _steps(out: Path) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    p = out / "steps.tsv"
    if p.exists():
        for line in p.read_text().splitlines():
            name, rc, secs, limit = line.split("\t")
            steps[name] = {"exit": int(rc), "seconds": int(secs), "limit_s": int(limit), "timed_out": rc == "124"}
    return steps


def _tests(out: Path) -> Optional[dict[str, int]]:
    p = out / "gpu_tests.xml"
    if not p.exists():
        return None
    root = ET.parse(p).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{p}: no testsuite"
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _kernel(out: Path, targets: dict[str, Any]) -> Optional[dict[str, Any]]:
    p = out / "kernel_step.json"
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    table: dict[str, Any] = {}
    for r in data["results"]:
        table.setdefault(r["case"], {})[f"pooling_{r['pooling']}"] = {
            k: r[k] for k in ("step_ms", "vs_fbgemm_rowwise_adagrad", "vs_fbgemm_adam", "floor_ms", "vs_floor")
            if k in r}
        if r["case"] in ("ours AdamAR", "ours FAL+AdamAR"):
            ratio = r.get("vs_fbgemm_adam")
            targets[f"kernel {r['case']} pooling {r['pooling']} / FBGEMM Adam"] = {
                "value": ratio, "target": f"<= {KERNEL_TARGET}", "met": ratio is not None and ratio <= KERNEL_TARGET}
    return {"device": data.get("device"), "bandwidth_GBps": data.get("bandwidth_Bps", 0) / 1e9,
            "shape": data.get("shape"), "cases": table}


def _app(out: Path, targets: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for name in APP_RUNS:
        p = out / "app" / name / "metrics.jsonl"
        if not p.exists():
            runs[name] = None
            continue
        last = json.loads(p.read_text().splitlines()[-1])
        runs[name] = {k: last.get(k) for k in ("epoch", "train_loss", "test_auc", "samples_per_s_per_rank",
                                                "train_seconds", "device", "process_group", "pipeline")}
    stock = runs.get("stock_adam")
    for name in ("adamar", "adam"):
        mine = runs.get(name)
        ratio = (mine["samples_per_s_per_rank"] / stock["samples_per_s_per_rank"]) if mine and stock else None
        if name == "adamar":
            targets["app AdamAR samples/s / FBGEMM Adam"] = {"value": ratio, "target": f">= {APP_TARGET}",
                                                            "met": ratio is not None and ratio >= APP_TARGET}
        if mine:
            mine["vs_stock_adam"] = ratio
    trained = [r for r in runs.values() if r]
    targets["app on CUDA over NCCL"] = {
        "value": sorted({f"{r['device']} {r['process_group']}" for r in trained}), "target": "cuda, nccl",
        "met": bool(trained) and all(str(r["device"]).startswith("cuda") and r["process_group"] == "nccl"
                                     for r in trained)}
    return runs


def summarize(out: Path) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    env = out / "env.log"
    tests = _tests(out)
    if tests is not None:
        targets["gpu tests all passed (none skipped)"] = {
            "value": tests, "target": "failures = errors = skipped = 0",
            "met": tests["tests"] > 0 and tests["passed"] == tests["tests"]}
    summary = {
        "steps": _steps(out),
        "env": env.read_text().strip().splitlines()[-1] if env.exists() and env.read_text().strip() else None,
        "gpu_tests": tests,
        "kernel_step": _kernel(out, targets),
        "app": _app(out, targets),
        "targets": targets,
    }
    steps_ok = bool(summary["steps"]) and all(s["exit"] == 0 for n, s in summary["steps"].items() if n != "summary")
    summary["ok"] = steps_ok and all(t["met"] for t in targets.values())
    return summary


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = Path(argv[0])
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, t in summary["targets"].items():
        print(f"{'met' if t['met'] else 'NOT MET':8s} {name}: {t['value']} (target {t['target']})")
    print(f"steps: {summary['steps']}\nok: {summary['ok']}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
