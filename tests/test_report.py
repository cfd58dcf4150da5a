"""`lottery-ext report` (experiments/report.py) on small synthetic run directories: partial
runs, the legend, the early-stop-at-the-last-iteration warning, one-trial formatting, the
rounding of summary.csv, and the plots (full, partial, one trial, a search's own metrics)."""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import matplotlib
import pytest

from lottery_ext.experiments.presets import DEFAULT_PRESET, PRESETS, RunConfig
from lottery_ext.experiments.schedule import units

matplotlib.use("Agg")
# the module (lottery_ext.experiments.report, the attribute, is its report function)
rep = importlib.import_module("lottery_ext.experiments.report")

PLOTS = ("accuracy.png", "early_stop.png", "end_of_training.png", "curves.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def preset_config(**overrides) -> RunConfig:
    base = dict(trials=2, rounds=3, iterations=500, eval_every=100)
    base.update(overrides)
    return RunConfig.from_preset(PRESETS[DEFAULT_PRESET], **base)


def user_config(**overrides) -> RunConfig:
    """What TicketSearch records: preset "custom", the user's factory as the model."""
    base = dict(preset="custom", dataset="custom", model="mymod:net", init="factory",
                optimizer="custom", lr=0.0, batch_size=32, iterations=500, rounds=3, trials=2,
                pruner_options={"rate": 0.2})  # fmt: skip
    base.update(overrides)
    return RunConfig(**base)


def accuracy(unit) -> float:
    """A test accuracy with float noise (a third of 1e-6) that summary.csv must round away."""
    trial, control, level = unit
    return (900 - 10 * level + 3 * trial - 20 * (control != "ticket")) / 1000 + 1e-6 / 3


def early_stop(unit) -> int:
    trial, control, level = unit
    return 100 * (1 + (level + trial) % 3)


def make_run(path: Path, cfg: RunConfig, drop=(), es=early_stop, user=False) -> Path:
    """A run directory with a result and a curve for each unit of `cfg` but `drop`; `user`:
    a search's own metrics (val_mse / test_mse, no accuracies)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    results, curves = [], []
    for unit in units(cfg):
        if tuple(unit) in drop:
            continue
        trial, control, level = unit
        acc = accuracy(unit)
        row = dict(trial=trial, control=control, level=level, weights_remaining=0.8**level)
        row.update(early_stop_iteration=es(unit), iterations=cfg.iterations, seconds=1.0)
        its = range(cfg.eval_every, cfg.iterations + 1, cfg.eval_every)
        if user:
            row.update(val_mse_at_early_stop=1 - acc, test_mse_at_early_stop=1.1 - acc,
                       final_val_mse=1 - acc, final_test_mse=1.1 - acc)  # fmt: skip
            history = [dict(iteration=i, val_mse=1 - acc + 100 / i, test_mse=1.1 - acc + 100 / i)
                       for i in its]  # fmt: skip
        else:
            row.update(test_accuracy_at_early_stop=acc, val_loss_at_early_stop=0.3,
                       val_accuracy_at_early_stop=acc, final_test_accuracy=acc - 0.005,
                       final_train_accuracy=1.0 - 0.001 * level,
                       train_test_gap=1.0 - 0.001 * level - (acc - 0.005))  # fmt: skip
            history = [dict(iteration=i, val_loss=0.3 + 10 / i, val_accuracy=acc,
                            test_loss=0.3 + 10 / i, test_accuracy=acc * (1 - math.exp(-i / 150)))
                       for i in its]  # fmt: skip
        if control == "ticket":
            row.update(mean_move_kept_next=0.12345678, mean_move_pruned_next=0.0456789)
        results.append(row)
        curves.append(dict(trial=trial, control=control, level=level, history=history))
    for name, rows in (("results.jsonl", results), ("curves.jsonl", curves)):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def table_rows(text: str) -> dict[int, str]:
    """The table's rows by level."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("level  remain"))
    rows = {}
    for ln in lines[start + 2 :]:
        if not ln.strip():
            break
        rows[int(ln.split()[0])] = ln
    return rows


def read_summary(path: Path) -> list[dict]:
    with open(path / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def figures(monkeypatch):
    """The figures the report saves, by file name, kept open for inspection."""
    saved = {}

    def keep(fig, path, subtitle):
        saved[Path(path).name] = fig
        fig.tight_layout()
        fig.savefig(path, dpi=40)
        return path

    monkeypatch.setattr(rep, "_save", keep)
    yield saved
    import matplotlib.pyplot as plt

    for fig in saved.values():
        plt.close(fig)


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# ---- partial runs -------------------------------------------------------------------------------


def test_partial_run_lists_exactly_the_missing_units(tmp_path):
    cfg = preset_config(trials=2, rounds=3)
    drop = {(1, c, lv) for lv in (2, 3) for c in ("ticket", "reinit", "random_prune")}
    drop.add((0, "random_prune", 3))
    run = make_run(tmp_path / "run", cfg, drop=drop)
    results = rep.read_jsonl(run / "results.jsonl")
    missing = rep.missing_units(cfg, results)
    assert sorted(missing) == sorted(drop)
    total = cfg.trials * (1 + 3 * cfg.rounds)
    text = rep.report(run, make_plots=False)
    assert (
        f"partial run: {len(drop)} of {total} units missing: "
        "trial 0: level 3 (random_prune); trial 1: levels 2-3"
    ) in text
    # a complete run says nothing of the kind
    full = make_run(tmp_path / "full", cfg)
    assert "partial" not in rep.report(full, make_plots=False)


def test_describe_units_merges_trials_and_names_controls():
    cfg = preset_config(trials=4, rounds=2)
    whole = [tuple(u) for u in units(cfg) if u.trial >= 2]
    assert rep.describe_units(whole, cfg) == "trials 2-3: all levels"
    some = [(0, "ticket", 0), (0, "ticket", 1), (0, "reinit", 1), (0, "random_prune", 1),
            (0, "reinit", 2), (1, "random_prune", 1), (1, "random_prune", 2)]  # fmt: skip
    assert rep.describe_units(some, cfg) == (
        "trial 0: levels 0-1, level 2 (reinit); trial 1: levels 1-2 (random_prune)"
    )
    no_controls = preset_config(controls=[], rounds=3)
    assert rep.describe_units([(0, "ticket", 2), (0, "ticket", 3)], no_controls) == (
        "trial 0: levels 2-3"
    )


# ---- the printed report -------------------------------------------------------------------------


def test_legend_explains_every_column_and_title_names_the_options(tmp_path):
    cfg = preset_config(trials=2, rounds=2, iterations=500)
    text = rep.report(make_run(tmp_path / "run", cfg), make_plots=False)
    header = next(ln for ln in text.splitlines() if ln.startswith("level  remain"))
    columns = {w for cell in header.split("|") for w in cell.replace("ES it", "ES_it").split()}
    assert columns == {"level", "remain", "ticket", "reinit", "random_prune", "acc%", "ES_it",
                       "gap%"}  # fmt: skip
    legend = text.split("\n\n")[2].splitlines()  # title / table / legend
    explained = {ln.split()[0] for ln in legend if not ln.startswith(" ")}
    for column in columns:
        assert column.replace("ES_it", "ES") in explained, column
    assert "train minus test accuracy at the end of training" in text  # gap%
    assert "rewound to their initial values θ0" in " ".join(text.split())
    late = rep.legend(["ticket"], "test_accuracy", True, {"rewind_iteration": 100})
    assert "rewound to their values at iteration 100 (θk)" in " ".join(late.split())
    # the title: the preset and what differs from its defaults (2000 iterations, 8 rounds)
    first = text.splitlines()[0]
    assert first.startswith(f"{DEFAULT_PRESET} (mlp on mnist1d), options: ")
    assert set(first.split("options: ")[1].split(", ")) == {"iterations=500", "rounds=2"}
    default = preset_config(trials=2, rounds=8, iterations=2000)
    assert rep.title(default.to_dict()).endswith("preset defaults")


def test_warning_when_early_stop_is_the_last_iteration(tmp_path):
    cfg = preset_config(trials=2, rounds=3, iterations=500)
    clean = rep.report(make_run(tmp_path / "clean", cfg), make_plots=False)
    assert "warning:" not in clean and "*" not in "\n".join(table_rows(clean).values())

    ends = {(0, "reinit", 2), (1, "ticket", 3), (1, "reinit", 3), (1, "random_prune", 3)}
    run = make_run(tmp_path / "late", cfg,
                   es=lambda u: 500 if tuple(u) in ends else early_stop(u))  # fmt: skip
    text = rep.report(run, make_plots=False)
    n = cfg.trials * (1 + 3 * cfg.rounds)
    warning = " ".join(text.split("warning: ", 1)[1].split())
    assert warning.startswith(
        f"in 4 of {n} units the early-stop iteration is the last iteration (500)"
    )
    assert "(trial 0: level 2 (reinit); trial 1: level 3)" in warning
    # the table's ES cells: a star exactly at (reinit, 2) and at level 3 for every control
    rows = table_rows(text)
    starred = {(lv, i) for lv, row in rows.items()
               for i, cell in enumerate(row.split("|")[1:4]) if "*" in cell}  # fmt: skip
    assert starred == {(2, 1), (3, 0), (3, 1), (3, 2)}
    counts = {(r["control"], int(r["level"])): int(r["early_stop_at_last_iteration"])
              for r in read_summary(run)}  # fmt: skip
    assert {k for k, v in counts.items() if v} == {("reinit", 2), ("ticket", 3), ("reinit", 3),
                                                   ("random_prune", 3)}  # fmt: skip


def test_one_trial_prints_one_value_and_several_print_min_max(tmp_path):
    one = preset_config(trials=1, rounds=2)
    rows = table_rows(rep.report(make_run(tmp_path / "one", one), make_plots=False))
    for level, row in rows.items():
        assert "(" not in row and "-" not in row.split("|", 1)[1]
        acc = f"{100 * accuracy((0, 'ticket', level)):.2f}"
        assert row.split("|")[1].split() == [acc, str(early_stop((0, "ticket", level)))]
    two = preset_config(trials=2, rounds=2)
    rows = table_rows(rep.report(make_run(tmp_path / "two", two), make_plots=False))
    a, b = (100 * accuracy((t, "ticket", 1)) for t in (0, 1))
    assert f"{(a + b) / 2:.2f} ({a:.2f}-{b:.2f})" in rows[1]


def test_summary_csv_is_rounded_and_parses_back(tmp_path):
    cfg = preset_config(trials=3, rounds=2)
    run = make_run(tmp_path / "run", cfg)
    rep.report(run, make_plots=False)
    text = (run / "summary.csv").read_text()
    summary = read_summary(run)
    assert len(summary) == 1 + 2 * 3
    for row in summary:
        for key, cell in row.items():
            if cell and key != "control":
                decimals = cell.split(".")[1] if "." in cell else ""
                assert len(decimals) <= 6, (key, cell)  # no float noise
        rs = [(t, row["control"], int(row["level"])) for t in range(cfg.trials)]
        accs = [accuracy(u) for u in rs]
        assert float(row["test_accuracy_at_early_stop_mean"]) == pytest.approx(
            sum(accs) / 3, abs=5e-6
        )
        assert float(row["test_accuracy_at_early_stop_min"]) == round(min(accs), 5)
        its = [early_stop(u) for u in rs]
        assert row["early_stop_iteration_mean"] == f"{sum(its) / 3:.1f}"
        assert int(row["early_stop_iteration_max"]) == max(its)
        assert float(row["weights_remaining"]) == pytest.approx(0.8 ** int(row["level"]), 1e-6)
    assert "0.1235" in text and "0.04568" in text  # weight movement: 4 significant digits
    assert "333" not in text  # the 1e-6 / 3 of every accuracy is gone


# ---- a search's own metrics ---------------------------------------------------------------------


def test_own_metrics_are_tabulated_without_test_accuracy(tmp_path, figures):
    cfg = user_config(trials=2, rounds=2)
    run = make_run(tmp_path / "run", cfg, user=True)
    text = rep.report(run)
    assert "test_mse at early stop is tabulated" in text
    rows = table_rows(text)
    mse = [1.1 - accuracy((t, "ticket", 0)) for t in (0, 1)]
    assert f"{sum(mse) / 2:#.4g}" in rows[0]
    assert any(ln.startswith("test_mse@ES ") for ln in text.splitlines())  # the legend
    assert "gap%" not in text  # no train accuracy: no gap column
    summary = read_summary(run)
    assert summary[0]["test_mse_at_early_stop_mean"] == repr(float(f"{sum(mse) / 2:.6g}"))
    for name in PLOTS:
        assert (run / name).read_bytes().startswith(PNG_MAGIC), name
    assert figures["accuracy.png"].axes[0].get_ylabel() == "test_mse at early stop"
    assert text.splitlines()[0] == "custom: mymod:net, 2 rounds, 500 iterations per training"


def test_results_without_any_metric_give_early_stop_iterations_only(tmp_path):
    cfg = preset_config(trials=1, rounds=1)
    run = make_run(tmp_path / "run", cfg)
    rows = [json.loads(ln) for ln in (run / "results.jsonl").read_text().splitlines()]
    keep = ("trial", "control", "level", "weights_remaining", "early_stop_iteration")
    (run / "results.jsonl").write_text(
        "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows)
    )
    text = rep.report(run)
    assert "early-stop iterations only" in text
    assert (run / "early_stop.png").exists()


# ---- plots --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["full", "partial", "one_trial"])
def test_plots_are_written(tmp_path, figures, kind):
    trials = 1 if kind == "one_trial" else 2
    cfg = preset_config(trials=trials, rounds=3)
    drop = {(1, c, 3) for c in ("ticket", "reinit", "random_prune")} if kind == "partial" else ()
    run = make_run(tmp_path / "run", cfg, drop=drop)
    rep.report(run)
    for name in PLOTS:
        assert (run / name).read_bytes().startswith(PNG_MAGIC), name
    ax = figures["accuracy.png"].axes[0]
    labels = legend_texts(ax)
    n = "n=1" if kind == "one_trial" else ("n=1-2" if kind == "partial" else "n=2")
    assert f"winning ticket ({n})" in labels and f"random reinit ({n})" in labels
    dense = 100 * sum(accuracy((t, "ticket", 0)) for t in range(trials)) / trials
    assert f"dense network ({dense:.4g}%)" in labels
    flat = [ln for ln in ax.lines if ln.get_linestyle() == "--" and len(set(ln.get_ydata())) == 1]
    assert [ln.get_ydata()[0] for ln in flat] == [pytest.approx(dense)]  # horizontal, dashed
    notes = [
        t.get_text() for fig in figures.values() for t in fig.texts if "partial" in t.get_text()
    ]
    if kind == "partial":
        assert notes.count("partial run: 3 of 20 units missing") == len(PLOTS)
    else:
        assert not notes


def test_plot_axes_offsets_and_titles(tmp_path, figures):
    # five trials: the mean of five equal values can miss them by a rounding error, which
    # must not make a negative error bar (matplotlib refuses those)
    cfg = preset_config(trials=5, rounds=12, iterations=500)
    rep.report(make_run(tmp_path / "run", cfg))
    ax = figures["accuracy.png"].axes[0]
    # the preset and the options changed from its defaults
    suptitle = figures["accuracy.png"].get_suptitle().replace("\n", " ")
    assert suptitle.startswith(DEFAULT_PRESET) and "iterations=500" in suptitle
    # readable x labels: at most 10, horizontal, at densities of the run, denser on the left
    labels = [t for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(labels) <= 10
    assert all(t.get_rotation() == 0 and t.get_fontsize() >= 9 for t in labels)
    densities = {f"{100 * 0.8**lv:.3g}" for lv in range(13)}
    assert {t.get_text() for t in labels} <= densities
    left, right = ax.get_xlim()
    assert left > right  # reversed
    # the controls' points sit beside the ticket's, not on them, at the same level
    xs = {c.get_label(): list(c.lines[0].get_xdata()) for c in ax.containers}
    ticket = xs["winning ticket (n=5)"]
    for label in ("random reinit (n=5)", "random pruning (n=5)"):
        for x_ticket, x in zip(ticket[1:], xs[label]):
            assert x != x_ticket and abs(math.log(x / x_ticket)) < math.log(1.05)


def test_curves_show_the_controls_and_mark_early_stops(tmp_path, figures):
    cfg = preset_config(trials=2, rounds=3)
    rep.report(make_run(tmp_path / "run", cfg))
    fig = figures["curves.png"]
    ticket, reinit, random_prune = fig.axes
    chosen = [0, 3]  # 100% and the sparsest (51.2%, near the paper's 51.3%, is level 3)
    for ax, style in ((ticket, "-"), (reinit, "--"), (random_prune, ":")):
        curves = [ln for ln in ax.lines if len(ln.get_xdata()) > 1]
        assert len(curves) == len(chosen)
        if style != "-":  # the dense network (solid) and the control at level 3
            assert sorted(ln.get_linestyle() for ln in curves) == sorted(["-", style])
        dots = [ln for ln in ax.lines if len(ln.get_xdata()) == 1]
        assert len(dots) == len(chosen)  # one early-stop marker per curve
    control = "reinit"
    stops = sorted(float(ln.get_xdata()[0]) for ln in reinit.lines if len(ln.get_xdata()) == 1)
    expected = sorted(
        sum(early_stop((t, c, lv)) for t in range(2)) / 2 for c, lv in (("ticket", 0), (control, 3))
    )
    assert stops == expected
