"""Per-epoch tables and the test-AUC plot from runs' ``metrics.jsonl`` files.

    python -m torchrec_adaptive.apps.dlrm.report runs/study/*/metrics.jsonl --plot auc.png
    python -m torchrec_adaptive.apps.dlrm.report --study runs/study --names adam adamar --plot auc.png

With several seeds (a study run with ``--seeds``: ``<study>/seed_<s>/<run>/metrics.jsonl``)
every number is the mean over the seeds ± their standard deviation (sample std, n - 1),
"best" is the best epoch of the *mean* curve, and the plot draws mean ± std as a band.
Pure reading and drawing (matplotlib, headless ``Agg``): it runs on rank 0 after a
study, or later on the saved files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

Records = list[dict[str, Any]]


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


# --- several seeds -------------------------------------------------------------------------------

def read_study(out: str | Path, names: Optional[Sequence[str]] = None) -> dict[str, list[Records]]:
    """Every run of a study, by run name, one record list per seed: ``<out>/seed_<s>/<name>`` (a study
    with ``--seeds``) or ``<out>/<name>`` (one seed). ``names`` picks runs and their order; a name
    with no metrics in any seed is an error naming the folders looked in."""
    out = Path(out)
    seed_dirs = sorted((d for d in out.glob("seed_*") if d.is_dir()), key=lambda d: int(d.name[5:]))
    roots = seed_dirs or [out]
    found: dict[str, list[Records]] = {}
    for root in roots:
        for m in sorted(root.glob("*/metrics.jsonl")):
            rs = read_metrics(m)
            if rs:
                found.setdefault(m.parent.name, []).append(rs)
    if names is None:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"no metrics for {missing} in {[str(r) for r in roots]} (have: {sorted(found)})")
    return {n: found[n] for n in names}


def seed_stats(seeds: list[Records], key: str = "test_auc") -> tuple[list[int], np.ndarray, np.ndarray, int]:
    """(epochs, mean, std, n) of ``key`` per epoch over the seeds that reached every epoch; std is
    the sample standard deviation (0 for one seed)."""
    epochs = sorted({r["epoch"] for rs in seeds for r in rs})
    full = [rs for rs in seeds if {r["epoch"] for r in rs} >= set(epochs)]
    if not full:  # runs of different lengths: the epochs every one of them has
        epochs = sorted(set.intersection(*({r["epoch"] for r in rs} for rs in seeds)))
        full = seeds
    vals = np.array([[next(r[key] for r in rs if r["epoch"] == e) for e in epochs] for rs in full], dtype=float)
    std = vals.std(axis=0, ddof=1) if len(full) > 1 else np.zeros(len(epochs))
    return epochs, vals.mean(axis=0), std, len(full)


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f}" if n < 2 else f"{mean:.4f} ± {std:.4f}"


def mean_table(runs: dict[str, list[Records]], key: str = "test_auc", label: str = "method") -> str:
    """Markdown table of mean ± std per epoch over seeds, the best epoch of the mean curve, last - best
    of the means and the number of seeds."""
    stats = {name: seed_stats(seeds, key) for name, seeds in runs.items()}
    epochs = sorted({e for ep, *_ in stats.values() for e in ep})
    lines = [f"| {label} | " + " | ".join(f"epoch {e}" for e in epochs) + " | best (epoch) | last - best | seeds |",
             "|" + " --- |" * (len(epochs) + 4)]
    for name, (ep, mean, std, n) in stats.items():
        cells = {e: _pm(m, s, n) for e, m, s in zip(ep, mean, std)}
        b = int(np.argmax(mean))
        lines.append(f"| {name} | " + " | ".join(cells.get(e, "-") for e in epochs)
                     + f" | {mean[b]:.4f} ({ep[b]}) | {mean[-1] - mean[b]:+.4f} | {n} |")
    return "\n".join(lines)


def mean_bucket_table(runs: dict[str, list[Records]]) -> str:
    """Test AUC per frequency bucket at the last epoch, mean ± std over seeds."""
    first = next(iter(runs.values()))[0][-1]["buckets"]
    names = [f"[{b['min_count']}, {b['max_count']})" if b["max_count"] is not None else f">= {b['min_count']}"
             for b in first]
    lines = ["| method | " + " | ".join(f"{n} ({b['rows']} rows)" for n, b in zip(names, first)) + " |",
             "|" + " --- |" * (len(names) + 1)]
    for name, seeds in runs.items():
        vals = np.array([[b["auc"] if b["auc"] is not None else np.nan for b in rs[-1]["buckets"]] for rs in seeds])
        std = vals.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(vals.shape[1])
        lines.append(f"| {name} | " + " | ".join(_pm(m, s, len(seeds)) for m, s in zip(vals.mean(axis=0), std)) + " |")
    return "\n".join(lines)


def plot_bands(runs: dict[str, list[Records]], path: str | Path, title: str = "") -> None:
    """Test AUC and log loss per epoch: the mean over seeds as a line, mean ± std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, seeds in runs.items():
        for ax, key in zip(axes, ("test_auc", "test_logloss")):
            ep, mean, std, n = seed_stats(seeds, key)
            (line,) = ax.plot(ep, mean, marker="o", label=f"{name} (n={n})" if key == "test_auc" else None)
            if n > 1:
                ax.fill_between(ep, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for a, label in zip(axes, ("test AUC", "test log loss")):
        a.set_xlabel("epoch")
        a.set_ylabel(label + " (mean ± std over seeds)")
        a.xaxis.get_major_locator().set_params(integer=True)
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "test metrics per epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(runs: dict[str, list[Records]]) -> str:
    """The study's text: the per-epoch table and the per-bucket table (mean ± std with several seeds)."""
    return (f"Test AUC per epoch\n\n{mean_table(runs)}\n\nTest AUC per frequency bucket of the rarest ID "
            f"(last epoch)\n\n{mean_bucket_table(runs)}\n")


# --- diagnostics: the AdamAR paper's quantity ------------------------------------------------------

# Coarse groups of diagnostics.py's power-of-two count buckets (bucket i holds c_r in [2^(i-1), 2^i)):
# c_r is the row's count so far (it grows with the epochs).
NORM_GROUPS = (("c_r < 8", 0, 4), ("8 <= c_r < 128", 4, 8), ("128 <= c_r < 2048", 8, 12), ("c_r >= 2048", 12, None))


def read_norms(diagnostics: str | Path) -> tuple[list[int], np.ndarray]:
    """(epochs, [epochs, groups]) of sum ||theta_r||^2 over every table, by count group (NORM_GROUPS),
    from the app's ``diagnostics.jsonl``."""
    recs = read_metrics(diagnostics)
    out = []
    for r in recs:
        sq = np.sum([t["sq_norm_by_count"] for t in r["tables"].values()], axis=0)
        out.append([sq[lo:hi].sum() for _, lo, hi in NORM_GROUPS])
    return [r["epoch"] for r in recs], np.array(out)


def plot_norms(runs: dict[str, list[Path]], path: str | Path, title: str = "") -> None:
    """One panel per count group: sum ||theta_r||^2 per epoch, mean ± std over seeds per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(NORM_GROUPS), figsize=(4 * len(NORM_GROUPS), 3.8))
    for name, files in runs.items():
        per_seed = [read_norms(f) for f in files]
        ep = per_seed[0][0]
        vals = np.stack([v[: len(ep)] for _, v in per_seed])
        mean, std = vals.mean(axis=0), (vals.std(axis=0, ddof=1) if len(files) > 1 else np.zeros(vals.shape[1:]))
        for g, ax in enumerate(axes):
            (line,) = ax.plot(ep, mean[:, g], marker="o", label=name if g == 0 else None)
            ax.fill_between(ep, mean[:, g] - std[:, g], mean[:, g] + std[:, g], color=line.get_color(), alpha=0.2)
    for (label, *_), ax in zip(NORM_GROUPS, axes):
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("sum of ||theta_r||^2, all tables")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "embedding norms by row count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="*", help="metrics.jsonl files (the run name is taken from the records)")
    ap.add_argument("--study", help="a study folder (one or several seeds); instead of metrics files")
    ap.add_argument("--names", nargs="+", help="with --study: these runs, in this order (default: all)")
    ap.add_argument("--plot", help="write the AUC/log-loss plot here (PNG)")
    ap.add_argument("--norms-plot", help="with --study: write the sum ||theta||^2 by count plot here (PNG)")
    args = ap.parse_args(argv)
    if args.study:
        runs = read_study(args.study, args.names)
        print(summary(runs))
        if args.plot:
            plot_bands(runs, args.plot)
        if args.norms_plot:
            root = Path(args.study)
            files = {n: [d / n / "diagnostics.jsonl" for d in (sorted(root.glob("seed_*")) or [root])
                         if (d / n / "diagnostics.jsonl").exists()] for n in runs}
            plot_norms(files, args.norms_plot)
        return
    if not args.metrics:
        ap.error("give metrics.jsonl files or --study")
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
