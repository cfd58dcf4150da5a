"""Tables and plots from a run directory's results alone (finished or still running).

``report(run_dir)`` writes summary.csv (one row per control and level: mean and min/max over
the trials) and the plots of the paper's Figures 1, 3 and 4 (accuracy.png, early_stop.png,
curves.png, end_of_training.png), and returns the printed report: what the run is, which
units are missing if it is partial, the table, a legend of its columns and warnings (units
whose early stop is their last iteration)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path

from .presets import PRESETS, RunConfig
from .rundir import read_jsonl
from .schedule import units as schedule_units

CONTROLS = ("ticket", "reinit", "random_prune")
LABELS = {"ticket": "winning ticket", "reinit": "random reinit", "random_prune": "random pruning"}
COLORS = {"ticket": "tab:blue", "reinit": "tab:orange", "random_prune": "tab:green"}
MARKERS = {"ticket": "o", "reinit": "s", "random_prune": "^"}
STYLES = {"ticket": "-", "reinit": "--", "random_prune": ":"}
# the densities of the paper's Figure 3 (LeNet, % of weights remaining / 100)
FIGURE3 = (1.0, 0.513, 0.211, 0.07, 0.036, 0.019)
# settings that do not change the figures (left out of the titles' "options")
_NOT_FIGURES = {"preset", "device", "threads", "checkpoint_every", "pruner_options"}


# -- what the run is ------------------------------------------------------------------------------


def _run_config(cfg: dict) -> RunConfig | None:
    """config.json's settings as a RunConfig (None when they do not make one)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        return RunConfig(**{k: v for k, v in cfg.items() if k in names})
    except TypeError:
        return None


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) or "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def overrides(cfg: dict) -> list[str]:
    """The settings of `cfg` that differ from its preset's defaults, as ``name=value``."""
    preset = PRESETS.get(cfg.get("preset"))
    if preset is None:
        return []
    default = RunConfig.from_preset(preset).to_dict()
    return [f"{k}={_value(v)}" for k, v in cfg.items()
            if k in default and k not in _NOT_FIGURES and v != default[k]]  # fmt: skip


def title(cfg: dict) -> str:
    """The preset, its model and data, and the options changed from the preset."""
    if cfg.get("preset") not in PRESETS:  # TicketSearch: the user's model and data
        return (f"{cfg.get('preset', '?')}: {cfg.get('model', '?')}, {cfg.get('rounds')} "
                f"rounds, {cfg.get('iterations')} iterations per training")  # fmt: skip
    changed = overrides(cfg)
    return f"{cfg['preset']} ({cfg['model']} on {cfg['dataset']}), " + (
        f"options: {', '.join(changed)}" if changed else "preset defaults"
    )


def _ranges(xs) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    xs, out = sorted(set(xs)), []
    for x in xs:
        if out and x == out[-1][1] + 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def describe_units(units, cfg: RunConfig, most: int = 8) -> str:
    """Units ``(trial, control, level)`` compactly: per trial, runs of levels with the same
    controls ('trial 1: levels 3-6; trial 0: level 6 (random_prune)'); a run of levels
    without a list holds every unit of those levels, trials alike are merged."""
    controls = [c for c in CONTROLS[1:] if c in cfg.controls]
    every = {lv: {"ticket", *(controls if lv else [])} for lv in range(cfg.rounds + 1)}
    by_trial: dict[int, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for trial, control, level in units:
        by_trial[trial][level].add(control)
    said = []  # (trials, text)
    for trial in sorted(by_trial):
        runs = []  # [first level, last level, controls]
        for level in sorted(by_trial[trial]):
            cs = by_trial[trial][level]
            key = "" if cs == every.get(level) else ", ".join(c for c in CONTROLS if c in cs)
            if runs and runs[-1][1] == level - 1 and runs[-1][2] == key:
                runs[-1][1] = level
            else:
                runs.append([level, level, key])
        if len(runs) == 1 and runs[0][:3] == [0, cfg.rounds, ""]:
            text = "all levels"
        else:
            text = ", ".join(
                (f"level {a}" if a == b else f"levels {a}-{b}") + (f" ({key})" if key else "")
                for a, b, key in runs
            )
        if said and said[-1][1] == text and said[-1][0][-1] == trial - 1:
            said[-1][0].append(trial)
        else:
            said.append(([trial], text))
    parts = [f"trial{'s' if len(ts) > 1 else ''} {_ranges(ts)}: {text}" for ts, text in said]
    more = f"; ... ({len(parts) - most} more)" if len(parts) > most else ""
    return "; ".join(parts[:most]) + more


def missing_units(cfg: RunConfig, results: list[dict]) -> list[tuple]:
    """The units of the run's schedule without a result (in schedule order)."""
    done = {(r["trial"], r["control"], r["level"]) for r in results}
    return [tuple(u) for u in schedule_units(cfg) if tuple(u) not in done]


def _stopped_at_end(r: dict, iterations: int | None = None) -> bool:
    """The unit's early-stop iteration is its last one: the validation metric was still
    improving when training ended, so nothing was stopped early."""
    last = r.get("iterations", iterations)
    return last is not None and r["early_stop_iteration"] >= last


def at_last_iteration(results: list[dict], iterations: int | None = None) -> list[tuple]:
    """The units ``(trial, control, level)`` whose early stop is their last iteration."""
    return [
        (r["trial"], r["control"], r["level"]) for r in results if _stopped_at_end(r, iterations)
    ]


# -- the numbers ----------------------------------------------------------------------------------


def metric_of(results: list[dict]) -> str | None:
    """The metric tabulated at early stop: test accuracy for presets; for a user's own
    metrics (TicketSearch) the first test_ one, else the first one."""
    keys = {k[: -len("_at_early_stop")] for r in results for k in r if k.endswith("_at_early_stop")}
    for k in ("test_accuracy", *sorted(k for k in keys if k.startswith("test_")), *sorted(keys)):
        if k in keys:
            return k
    return None


def _order(control: str) -> int:
    return CONTROLS.index(control) if control in CONTROLS else len(CONTROLS)


def _is_fraction(metric: str | None) -> bool:
    return metric is not None and "acc" in metric


def _stats(values) -> tuple:
    xs = [x for x in values if isinstance(x, (int, float)) and not math.isnan(x)]
    return (sum(xs) / len(xs), min(xs), max(xs)) if xs else (None, None, None)


def _spread(metric: str | None) -> list[str]:
    """The figures summarized by their mean, min and max over the trials."""
    keys = [f"{metric}_at_early_stop", "early_stop_iteration", f"final_{metric}"]
    return (keys if metric else keys[1:2]) + ["final_train_accuracy"]


_MEANS = ("train_test_gap_mean", "mean_move_kept_next", "mean_move_pruned_next")


def summary_fields(metric: str | None) -> list[str]:
    """summary.csv's columns (those of a preset run when `metric` is test_accuracy)."""
    fields = ["control", "level", "trials", "weights_remaining"]
    for key in _spread(metric):
        fields += [f"{key}_mean", f"{key}_min", f"{key}_max"]
        if key == "early_stop_iteration":
            fields.append("early_stop_at_last_iteration")
    return fields + list(_MEANS)


def summarize(results: list[dict], metric: str | None = "test_accuracy") -> list[dict]:
    """One row per (control, level): mean and min/max over trials of the metric at early
    stop, the early-stop iteration and the metrics at the end of training."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["control"], r["level"])].append(r)
    rows = []
    for (control, level), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], _order(kv[0][0]))):
        row = {"control": control, "level": level, "trials": len(rs),
               "weights_remaining": _stats(r["weights_remaining"] for r in rs)[0],
               "early_stop_at_last_iteration": sum(_stopped_at_end(r) for r in rs)}  # fmt: skip
        for key in _spread(metric):
            stats = _stats(r.get(key) for r in rs)
            row.update(zip((f"{key}_mean", f"{key}_min", f"{key}_max"), stats))
        for field in _MEANS:
            row[field] = _stats(r.get(field.removesuffix("_mean")) for r in rs)[0]
        rows.append(row)
    return rows


def _rounded(field: str, value, metric: str | None) -> str:
    """A summary.csv cell at the precision of the figures, without float noise: accuracies
    (fractions) to 5 decimals, weights remaining to 6 significant digits (levels apart),
    mean iterations to 1 decimal, weight movements to 4 significant digits, other metrics
    to 6."""
    if value is None:
        return ""
    if isinstance(value, (str, int)):
        return str(value)
    if field.startswith("early_stop_iteration"):
        return f"{value:.1f}" if field.endswith("_mean") else str(int(value))
    if "accuracy" in field or "gap" in field or (_is_fraction(metric) and metric in field):
        return repr(round(value, 5))
    digits = 4 if field.startswith("mean_move") else 6
    return repr(float(f"{value:.{digits}g}"))


def write_summary_csv(rows: list[dict], path: Path, metric: str | None = "test_accuracy") -> None:
    fields = summary_fields(metric)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: _rounded(k, r.get(k), metric) for k in fields})


# -- the printed report -----------------------------------------------------------------------


def _cell(r: dict, key: str, scale: float, fmt: str) -> str:
    mean, lo, hi = (r[f"{key}_{s}"] for s in ("mean", "min", "max"))
    if mean is None:
        return "-"
    text = f"{scale * mean:{fmt}}"
    if r["trials"] > 1:
        text += f" ({scale * lo:{fmt}}-{scale * hi:{fmt}})"
    return text


def format_table(rows: list[dict], metric: str | None = "test_accuracy") -> str:
    """Per level: % weights remaining; per control the metric at early stop, mean (min-max)
    over trials (one value for one trial), and the early-stop iteration (mean; '*' when a
    trial stopped at its last iteration); the ticket's train-test gap at the end."""
    by_level: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_level[r["level"]][r["control"]] = r
    controls = [c for c in CONTROLS if any(c in v for v in by_level.values())]
    scale, fmt = (100, ".2f") if _is_fraction(metric) else (1, "#.4g")
    name = _column(metric)
    gap = any(r.get("train_test_gap_mean") is not None for r in rows)
    cells = {}  # (level, control) -> (value, ES)
    for level, cs in by_level.items():
        for c, r in cs.items():
            value = _cell(r, f"{metric}_at_early_stop", scale, fmt) if metric else "-"
            es = f"{r['early_stop_iteration_mean']:.0f}" + (
                "*" if r["early_stop_at_last_iteration"] else " "
            )
            cells[level, c] = value, es
    width = {c: max([len(f"{c} {name}")] + [len(v[0]) for k, v in cells.items() if k[1] == c])
             for c in controls}  # fmt: skip
    es_w = max([len("ES it ")] + [len(v[1]) for v in cells.values()])
    head = f"{'level':>5} {'remain':>7}"
    for c in controls:
        head += f" | {c + ' ' + name:>{width[c]}}  {'ES it ':>{es_w}}"
    head += " | gap%" if gap else ""
    head = head.rstrip()
    lines = [head, "-" * len(head)]
    for level in sorted(by_level):
        cs = by_level[level]
        ref = cs.get("ticket") or next(iter(cs.values()))
        pct = 100 * ref["weights_remaining"]
        line = f"{level:>5} {pct:6.{1 if pct >= 10 else 2}f}%"  # 3 significant digits below 10%
        for c in controls:
            value, es = cells.get((level, c), ("", ""))
            line += f" | {value:>{width[c]}}  {es:>{es_w}}"
        if gap:
            g = cs["ticket"].get("train_test_gap_mean") if "ticket" in cs else None
            line += f" | {100 * g:4.1f}" if g is not None else " |"
        lines.append(line.rstrip())
    return "\n".join(lines)


def legend(controls: list[str], metric: str | None, gap: bool, cfg: dict) -> str:
    """What each column of the table means (wrapped to 100 characters)."""
    rewind = (f"their values at iteration {cfg['rewind_iteration']} (θk)"
              if cfg.get("rewind_iteration") else "their initial values θ0")  # fmt: skip
    what = {
        "ticket": f"winning ticket: the pruned network, its surviving weights rewound to {rewind}",
        "reinit": "control: the ticket's mask with freshly drawn random weights",
        "random_prune": "control: a random mask with the ticket's per-layer weight counts, "
        "rewound like the ticket",
    }
    best = "loss is lowest" if metric == "test_accuracy" else "metric is best"
    items = [("level", "pruning round (0 = the dense network)"),
             ("remain", "% of the prunable weights remaining"),
             *((c, what[c]) for c in controls)]  # fmt: skip
    if metric:
        value = "test accuracy (%)" if metric == "test_accuracy" else metric
        items.append((_column(metric), f"{value} at the early-stop iteration: mean (min-max) "
                      "over the trials done; one value when one trial is done"))  # fmt: skip
    items.append(("ES it", f"early-stop iteration, where the validation {best}: mean over "
                  "the trials; a star marks a level where a trial stopped at its last "
                  "iteration (see the warning)"))  # fmt: skip
    if gap:
        items.append(("gap%", "the winning ticket's train minus test accuracy at the end of "
                      "training, in percentage points (mean over the trials)"))  # fmt: skip
    pad = max(len(k) for k, _ in items) + 2
    lines = []
    for key, text in items:
        lines += textwrap.wrap(text, 100, initial_indent=f"{key:<{pad}}",
                               subsequent_indent=" " * pad)  # fmt: skip
    return "\n".join(lines)


def _column(metric: str | None) -> str:
    return "acc%" if metric == "test_accuracy" else f"{metric}@ES"


# -- plots --------------------------------------------------------------------------------------


def _series_label(control: str, rows: list[dict]) -> str:
    ns = sorted({r["trials"] for r in rows})
    n = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"{LABELS[control]} (n={n})"


def _density_axis(ax, densities: list[float]) -> None:
    """Log x axis of % weights remaining, reversed (denser on the left, as in the paper),
    labelled at the densities of the run, thinned to at most 10 labels."""
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(densities), reverse=True)
    step = max(1, math.ceil(len(ticks) / 10))
    shown = ticks[::step]
    ax.set_xscale("log")
    ax.set_xticks(shown, [f"{t:.3g}" for t in shown])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(max(ticks) * 1.12, min(ticks) / 1.12)  # reversed
    ax.set_xlabel("% of weights remaining (log scale)")
    ax.grid(alpha=0.3)


def _offsets(densities: list[float], controls: list[str]) -> dict[str, float]:
    """Multiplicative x offsets that keep the controls' points apart on a log axis: a fifth
    of the closest two densities' distance at most."""
    logs = sorted({math.log10(d) for d in densities})
    gap = min((b - a for a, b in zip(logs, logs[1:])), default=0.1)
    step = min(0.015, gap / 5)
    signs = {"ticket": 0, "reinit": 1, "random_prune": -1}  # the ticket at its density
    return {c: 10 ** (step * signs[c]) for c in controls}


def _figure(cfg: dict, subtitle: str, ncols: int = 1):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(7.5 if ncols == 1 else 4.6 * ncols, 5),
                             sharey=True, squeeze=False)  # fmt: skip
    fig.suptitle("\n".join(textwrap.wrap(title(cfg), 80 if ncols == 1 else 130)), fontsize=10)
    if subtitle:
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", color="tab:red", fontsize=9)
    return fig, axes[0]


def _save(fig, path: Path, subtitle: str) -> Path:
    fig.tight_layout(rect=(0, 0.035 if subtitle else 0, 1, 1))
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _by_control(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for c in CONTROLS:
        rs = sorted((r for r in rows if r["control"] == c), key=lambda r: r["level"])
        if rs:
            out[c] = rs
    return out


def _errorbars(ax, series, key, scale, offsets, **kw) -> None:
    for control, rs in series.items():
        rs = [r for r in rs if r[f"{key}_mean"] is not None]
        if not rs:
            continue
        x = [100 * r["weights_remaining"] * offsets[control] for r in rs]
        y = [scale * r[f"{key}_mean"] for r in rs]
        # max(0, ...): the mean of equal values can miss them by a rounding error
        err = [[max(0.0, scale * (r[f"{key}_mean"] - r[f"{key}_min"])) for r in rs],
               [max(0.0, scale * (r[f"{key}_max"] - r[f"{key}_mean"])) for r in rs]]  # fmt: skip
        opts = dict(marker=MARKERS[control], ms=4, capsize=2.5, lw=1.3, color=COLORS[control],
                    label=_series_label(control, rs))  # fmt: skip
        opts.update(kw)
        ax.errorbar(x, y, yerr=err, **opts)


def _dense_line(ax, series, key, scale, unit: str) -> None:
    dense = [r for r in series.get("ticket", []) if r["level"] == 0]
    if dense and dense[0][f"{key}_mean"] is not None:
        y = scale * dense[0][f"{key}_mean"]
        ax.axhline(y, ls="--", lw=1, color="0.4", label=f"dense network ({y:.4g}{unit})")


def plot(run_dir: Path, cfg: dict, rows: list[dict], curves: list[dict], results: list[dict],
         metric: str | None = "test_accuracy", partial: str = "") -> list[Path]:  # fmt: skip
    """accuracy.png, early_stop.png (paper Figures 1 and 4), end_of_training.png (Figure 4,
    right) and curves.png (Figure 3) of the summary `rows`; `cfg`: config.json's settings;
    `partial` is said on each."""
    import matplotlib

    matplotlib.use("Agg")

    series = _by_control(rows)
    densities = [100 * r["weights_remaining"] for r in rows]
    offsets = _offsets(densities, list(series))
    scale = 100 if _is_fraction(metric) else 1
    unit = " (%)" if scale == 100 else ""
    test_name = "test accuracy" if metric == "test_accuracy" else metric
    out = []

    best = "lowest validation loss" if metric == "test_accuracy" else "best validation metric"
    plots = [("early_stop_iteration", 1, f"early-stop iteration ({best})", "early_stop.png")]
    if metric:
        plots.insert(0, (f"{metric}_at_early_stop", scale, f"{test_name} at early stop{unit}",
                         "accuracy.png"))  # fmt: skip
    for key, sc, ylabel, fname in plots:
        fig, (ax,) = _figure(cfg, partial)
        _errorbars(ax, series, key, sc, offsets)
        _dense_line(ax, series, key, sc, "%" if sc == 100 else "")
        if key == "early_stop_iteration":
            ends = [r for r in rows if r["early_stop_at_last_iteration"]]
            if ends and cfg.get("iterations"):
                end = f"end of training ({cfg['iterations']}): no early stop"
                ax.axhline(cfg["iterations"], ls=":", color="tab:red", lw=1.2, label=end)
        _density_axis(ax, densities)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=9)
        out.append(_save(fig, run_dir / fname, partial))

    # Figure 4, right: accuracy at the end of training (test solid, train dashed)
    final = f"final_{metric}" if metric else None
    if final and any(r.get(f"{final}_mean") is not None for r in rows):
        fig, (ax,) = _figure(cfg, partial)
        _errorbars(ax, series, final, scale, offsets)
        if any(r.get("final_train_accuracy_mean") is not None for r in rows):
            train = {c: [r for r in rs if r.get("final_train_accuracy_mean") is not None]
                     for c, rs in series.items()}  # fmt: skip
            _errorbars(ax, {c: rs for c, rs in train.items() if rs}, "final_train_accuracy", 100,
                       offsets, ls="--", mfc="white", label=None)  # fmt: skip
            ax.plot([], [], "k-", label="test")
            ax.plot([], [], "k--", marker="o", mfc="white", label="train")
        _density_axis(ax, densities)
        ax.set_ylabel(f"accuracy at the end of training{unit}" if scale == 100
                      else f"{metric} at the end of training")  # fmt: skip
        handles, labels = ax.get_legend_handles_labels()
        keep = [(h, lb) for h, lb in zip(handles, labels) if lb and not lb.startswith("_")]
        ax.legend(*zip(*keep), fontsize=9)
        out.append(_save(fig, run_dir / "end_of_training.png", partial))

    path = _plot_curves(run_dir, cfg, rows, curves, results, metric, scale, partial)
    if path is not None:
        out.append(path)
    return out


def _mean_curve(hs: list[list[dict]], key: str) -> tuple[list, list, list, list]:
    """Iterations, mean, min and max over trials of `key` at each evaluation."""
    its = [h["iteration"] for h in max(hs, key=len)]
    stats = [_stats(h[i].get(key) for h in hs if i < len(h)) for i in range(len(its))]
    mean, lo, hi = (list(column) for column in zip(*stats))
    return its, mean, lo, hi


def _plot_curves(run_dir, cfg, rows, curves, results, metric, scale, partial) -> Path | None:
    """Figure 3: the metric during training at (about) the paper's densities and the
    sparsest one, one panel per control (the dense network in each); a dot marks the mean
    early-stop iteration on each curve."""
    import numpy as np

    remaining = {r["level"]: r["weights_remaining"] for r in rows if r["control"] == "ticket"}
    done = {(r["trial"], r["control"], r["level"]) for r in results}
    # curves of units whose result has not landed yet (a run in progress) are left out
    curves = [c for c in curves if (c["trial"], c["control"], c["level"]) in done]
    if not remaining or not curves or metric is None:
        return None
    key = metric
    levels = sorted(remaining)
    chosen = {levels[0], levels[-1]}  # the densest and the sparsest, and near the paper's
    for w in FIGURE3:
        near = min(levels, key=lambda lv: abs(math.log(remaining[lv] / w)))
        if abs(math.log(remaining[near] / w)) < math.log(1.5):
            chosen.add(near)
    chosen = sorted(chosen)
    colors = {lv: f"C{i % 10}" for i, lv in enumerate(chosen)}
    es = defaultdict(list)
    for r in results:
        es[r["control"], r["level"]].append(r["early_stop_iteration"])
    panels = [c for c in CONTROLS if any(cv["control"] == c for cv in curves)]
    fig, axes = _figure(cfg, partial, ncols=len(panels))
    ymin = []
    for ax, control in zip(axes, panels):
        for lv in chosen:
            who = "ticket" if lv == 0 else control
            hs = [c["history"] for c in curves
                  if c["control"] == who and c["level"] == lv and c["history"]]  # fmt: skip
            if not hs:
                continue
            its, mean, lo, hi = _mean_curve(hs, key)
            ok = [i for i, m in enumerate(mean) if m is not None]
            if not ok:
                continue
            x = [its[i] for i in ok]
            y, ylo, yhi = ([scale * v[i] for i in ok] for v in (mean, lo, hi))
            style = "-" if who == "ticket" else STYLES[control]
            n = len(hs)
            ax.plot(x, y, style, color=colors[lv], lw=1.4,
                    label=f"{100 * remaining[lv]:.3g}%" + (" (dense)" if lv == 0 else "")
                    + (f", n={n}" if n != cfg.get("trials") else ""))  # fmt: skip
            if n > 1:
                ax.fill_between(x, ylo, yhi, color=colors[lv], alpha=0.12, lw=0)
            if es.get((who, lv)):
                stop = sum(es[who, lv]) / len(es[who, lv])
                ax.plot([stop], [float(np.interp(stop, x, y))], "o", color=colors[lv], ms=6,
                        mec="black", mew=0.8, zorder=5)  # fmt: skip
            late = [v for xi, v in zip(x, ylo) if xi >= 0.2 * x[-1]]
            ymin.append(min(late or ylo))
        ax.plot([], [], "o", color="0.6", mec="black", mew=0.8, label="early stop (mean)")
        style = {"reinit": "dashed", "random_prune": "dotted"}.get(control)
        ax.set_title(LABELS[control] + (f" ({style}; solid: dense)" if style else ""),
                     fontsize=10)  # fmt: skip
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="weights remaining", title_fontsize=8)
    axes[0].set_ylabel(f"{'test accuracy' if metric == 'test_accuracy' else metric}"
                       + (" (%)" if scale == 100 else ""))  # fmt: skip
    if ymin and scale == 100:  # the first evaluations' low accuracies would flatten the rest
        bottom, top = axes[0].get_ylim()
        axes[0].set_ylim(max(bottom, min(ymin) - 0.1 * (top - min(ymin))), top)
    return _save(fig, run_dir / "curves.png", partial)


def warn_last_iteration(ends: list, n: int, cfg_dict: dict, cfg, metric) -> str:
    """The warning about units whose early stop is their last iteration."""
    where = describe_units(ends, cfg) if cfg is not None else f"{len(ends)} units"
    falling = ("loss was still falling" if metric == "test_accuracy"
               else "metric was still improving")  # fmt: skip
    return (
        f"warning: in {len(ends)} of {n} units the early-stop iteration is the last iteration "
        f"({cfg_dict.get('iterations')}): the validation {falling} when training ended, so "
        "training was too short to find its best point, and the early-stop figures of these "
        f"units are those at the end of training ({where}); train longer (--iterations)"
    )


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 100, subsequent_indent="  "))


# -- entry point -----------------------------------------------------------------------------------


def report(run_dir: str | Path, make_plots: bool = True) -> str:
    """Write summary.csv (and the plots) for `run_dir`; return the printed report."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    try:
        meta = json.loads((run_dir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{run_dir / 'config.json'}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{run_dir / 'config.json'}: not a lottery-ext run configuration")
    cfg_dict = meta["config"]
    results = read_jsonl(run_dir / "results.jsonl")
    if not results:
        raise ValueError(f"{run_dir} has no finished levels yet (results.jsonl is empty)")
    metric = metric_of(results)
    rows = summarize(results, metric)
    write_summary_csv(rows, run_dir / "summary.csv", metric)

    cfg = _run_config(cfg_dict)
    lines = [title(cfg_dict)]
    partial = ""
    if cfg is not None:
        total = len(schedule_units(cfg))
        missing = missing_units(cfg, results)
        if missing:
            partial = f"partial run: {len(missing)} of {total} units missing"
            lines.append(_wrap(f"{partial}: {describe_units(missing, cfg)}"))
    if metric is None:
        lines.append("no metric at early stop in results.jsonl: early-stop iterations only")
    elif metric != "test_accuracy":
        lines.append(f"no test accuracy in results.jsonl (a search's own metrics): {metric} "
                     "at early stop is tabulated")  # fmt: skip
    table = format_table(rows, metric)
    controls = [c for c in CONTROLS if any(r["control"] == c for r in rows)]
    gap = any(r.get("train_test_gap_mean") is not None for r in rows)
    lines += ["", table, "", legend(controls, metric, gap, cfg_dict)]
    ends = at_last_iteration(results, cfg_dict.get("iterations"))
    if ends:
        lines += ["", _wrap(warn_last_iteration(ends, len(results), cfg_dict, cfg, metric))]
    if make_plots:
        curves = read_jsonl(run_dir / "curves.jsonl")
        plot(run_dir, cfg_dict, rows, curves, results, metric, partial)
    return "\n".join(lines)
