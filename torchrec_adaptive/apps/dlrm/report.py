"""Per-epoch tables and the test-AUC plot from runs' ``metrics.jsonl`` files.

    python -m torchrec_adaptive.apps.dlrm.report runs/study/*/metrics.jsonl --plot auc.png

Pure reading and drawing (matplotlib, headless ``Agg``): it runs on rank 0 after a
study, or later on the saved files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return sorted((json.loads(ln) for ln in lines if ln.strip()), key=lambda r: r["epoch"])


def _fmt(x: Optional[float]) -> str:
    return "   -  " if x is None else f"{x:.4f}"


def auc_table(runs: dict[str, list[dict[str, Any]]], key: str = "test_auc") -> str:
    """Markdown table: one row per run, one column per epoch, plus best epoch and last - best."""
    epochs = sorted({r["epoch"] for rs in runs.values() for r in rs})
    head = f"| method | " + " | ".join(f"epoch {e}" for e in epochs) + " | best | last - best |"
    lines = [head, "|" + " --- |" * (len(epochs) + 3)]
    for name, rs in runs.items():
        by = {r["epoch"]: r.get(key) for r in rs}
        vals = [v for v in by.values() if v is not None]
        best = max(vals) if vals else None
        last = by.get(max(by)) if by else None
        drop = None if best is None or last is None else last - best
        lines.append(f"| {name} | " + " | ".join(_fmt(by.get(e)) for e in epochs)
                     + f" | {_fmt(best)} | {'   -  ' if drop is None else f'{drop:+.4f}'} |")
    return "\n".join(lines)


def bucket_table(runs: dict[str, list[dict[str, Any]]], epoch: Optional[int] = None) -> str:
    """Test AUC per frequency bucket (training count of the row's rarest ID) at one epoch (default: last)."""
    first = next(iter(runs.values()))
    ranges = [(b["min_count"], b["max_count"]) for b in first[-1]["buckets"]]
    names = [f"[{lo}, {hi})" if hi is not None else f">= {lo}" for lo, hi in ranges]
    rows_ = first[-1]["buckets"]
    lines = ["| method | " + " | ".join(f"{n} ({b['rows']} rows)" for n, b in zip(names, rows_)) + " |",
             "|" + " --- |" * (len(names) + 1)]
    for name, rs in runs.items():
        rec = rs[-1] if epoch is None else next(r for r in rs if r["epoch"] == epoch)
        lines.append(f"| {name} | " + " | ".join(_fmt(b["auc"]) for b in rec["buckets"]) + " |")
    return "\n".join(lines)


def plot_auc(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rs in runs.items():
        ep = [r["epoch"] for r in rs]
        ax.plot(ep, [r["test_auc"] for r in rs], marker="o", label=name)
        ax2.plot(ep, [r["test_logloss"] for r in rs], marker="o", label=name)
    for a, label in ((ax, "test AUC"), (ax2, "test log loss")):
        a.set_xlabel("epoch")
        a.set_ylabel(label)
        a.xaxis.get_major_locator().set_params(integer=True)
        a.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title or "test metrics per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files (the run name is taken from the records)")
    ap.add_argument("--plot", help="write the AUC/log-loss plot here (PNG)")
    args = ap.parse_args(argv)
    runs = {}
    for p in args.metrics:
        rs = read_metrics(p)
        if rs:
            runs[rs[0]["run"]] = rs
    print(auc_table(runs))
    print()
    print(bucket_table(runs))
    if args.plot:
        plot_auc(runs, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
