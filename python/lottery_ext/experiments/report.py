"""Tables and plots from a run directory's results alone (finished or still running)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from .rundir import read_jsonl

LABELS = {
    "ticket": "winning ticket (rewind)",
    "reinit": "random reinit",
    "random_prune": "random mask",
}
COLORS = {"ticket": "tab:blue", "reinit": "tab:orange", "random_prune": "tab:green"}
SUMMARY_FIELDS = [
    "control", "level", "trials", "weights_remaining",
    "test_accuracy_at_early_stop_mean", "test_accuracy_at_early_stop_min",
    "test_accuracy_at_early_stop_max", "early_stop_iteration_mean", "early_stop_iteration_min",
    "early_stop_iteration_max", "final_test_accuracy_mean", "final_train_accuracy_mean",
    "train_test_gap_mean", "mean_move_kept_next", "mean_move_pruned_next",
]  # fmt: skip


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per (control, level): mean and min/max over trials."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["control"], r["level"])].append(r)
    rows = []
    for (control, level), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        acc = [r["test_accuracy_at_early_stop"] for r in rs]
        es = [r["early_stop_iteration"] for r in rs]
        rows.append({
            "control": control, "level": level, "trials": len(rs),
            "weights_remaining": _mean([r["weights_remaining"] for r in rs]),
            "test_accuracy_at_early_stop_mean": _mean(acc),
            "test_accuracy_at_early_stop_min": min(acc),
            "test_accuracy_at_early_stop_max": max(acc),
            "early_stop_iteration_mean": _mean(es), "early_stop_iteration_min": min(es),
            "early_stop_iteration_max": max(es),
            "final_test_accuracy_mean": _mean([r["final_test_accuracy"] for r in rs]),
            "final_train_accuracy_mean": _mean([r["final_train_accuracy"] for r in rs]),
            "train_test_gap_mean": _mean([r["train_test_gap"] for r in rs]),
            "mean_move_kept_next": _mean([r.get("mean_move_kept_next") for r in rs]),
            "mean_move_pruned_next": _mean([r.get("mean_move_pruned_next") for r in rs]),
        })  # fmt: skip
    return rows


def write_summary_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in SUMMARY_FIELDS})


def format_table(rows: list[dict]) -> str:
    """Per level: % weights remaining, then test accuracy at early stop (mean [min, max]) and
    the early-stop iteration for the ticket and each control."""
    by_level: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_level[r["level"]][r["control"]] = r
    controls = [
        c for c in ("ticket", "reinit", "random_prune") if any(c in v for v in by_level.values())
    ]
    head = f"{'level':>5} {'remain':>7}"
    for c in controls:
        head += f" | {c + ' acc% (min-max)':>26} {'ES iter':>8}"
    head += f" | {'gap%':>5}"
    lines = [head, "-" * len(head)]
    for level in sorted(by_level):
        cells = by_level[level]
        ref = cells.get("ticket") or next(iter(cells.values()))
        line = f"{level:>5} {100 * ref['weights_remaining']:6.1f}%"
        for c in controls:
            r = cells.get(c)
            if r is None:
                line += f" | {'':>26} {'':>8}"
                continue
            acc = (f"{100 * r['test_accuracy_at_early_stop_mean']:.2f} "
                   f"({100 * r['test_accuracy_at_early_stop_min']:.2f}-"
                   f"{100 * r['test_accuracy_at_early_stop_max']:.2f})")  # fmt: skip
            line += f" | {acc:>26} {r['early_stop_iteration_mean']:>8.0f}"
        gap = ref["train_test_gap_mean"]
        line += f" | {100 * gap:5.1f}" if gap is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def plot(run_dir: Path, rows: list[dict], curves: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    title = f"{cfg['preset']} ({cfg['model']} on {cfg['dataset']})"
    out = []
    for key, ylabel, fname, scale in (
        ("test_accuracy_at_early_stop", "test accuracy at early stop (%)", "accuracy.png", 100),
        ("early_stop_iteration", "early-stop iteration (min val loss)", "early_stop.png", 1),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for control in ("ticket", "reinit", "random_prune"):
            rs = sorted((r for r in rows if r["control"] == control or
                         (r["level"] == 0 and r["control"] == "ticket")),
                        key=lambda r: r["level"])  # fmt: skip
            if not any(r["control"] == control for r in rs):
                continue
            x = [100 * r["weights_remaining"] for r in rs]
            y = [scale * r[f"{key}_mean"] for r in rs]
            lo = [scale * (r[f"{key}_mean"] - r[f"{key}_min"]) for r in rs]
            hi = [scale * (r[f"{key}_max"] - r[f"{key}_mean"]) for r in rs]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=3, color=COLORS[control],
                        label=LABELS[control])  # fmt: skip
        ax.set_xscale("log")
        ax.invert_xaxis()
        ticks = sorted({round(100 * r["weights_remaining"], 1) for r in rows}, reverse=True)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks], rotation=60, fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("% of weights remaining")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / fname, dpi=120)
        plt.close(fig)
        out.append(run_dir / fname)

    # test accuracy over training for a few levels of the ticket (mean over trials)
    remaining = {r["level"]: r["weights_remaining"] for r in rows if r["control"] == "ticket"}
    # curves of levels whose result has not landed yet (a run in progress) are left out
    ticket = [c for c in curves if c["control"] == "ticket" and c["level"] in remaining]
    levels = sorted({c["level"] for c in ticket})
    if levels:
        wanted = [1.0, 0.513, 0.211, 0.07, 0.036, 0.019]
        chosen = sorted({min(levels, key=lambda lv: abs(math.log(remaining[lv] / w)))
                         for w in wanted})  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for lv in chosen:
            hs = [c["history"] for c in ticket if c["level"] == lv]
            its = [h["iteration"] for h in hs[0]]
            acc = [
                100 * _mean([h[i]["test_accuracy"] for h in hs if i < len(h)])
                for i in range(len(its))
            ]
            ax.plot(its, acc, label=f"{100 * remaining[lv]:.1f}% remaining")
        ax.set_xlabel("training iteration")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{title}: winning tickets during training")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=120)
        plt.close(fig)
        out.append(run_dir / "curves.png")
    return out


def report(run_dir: str | Path, make_plots: bool = True) -> str:
    """Write summary.csv (and the plots) for `run_dir`; return the printed table."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    results = read_jsonl(run_dir / "results.jsonl")
    if not results:
        raise ValueError(f"{run_dir} has no finished levels yet (results.jsonl is empty)")
    rows = summarize(results)
    write_summary_csv(rows, run_dir / "summary.csv")
    if make_plots:
        plot(run_dir, rows, read_jsonl(run_dir / "curves.jsonl"))
    return format_table(rows)
