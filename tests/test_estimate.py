"""Long work says how long: the plan and estimate a search prints, its ETA, progress that
suits a log file, and the size and rough time `lottery-ext presets` shows."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from lottery_ext.cli import main
from lottery_ext.experiments import estimate
from lottery_ext.experiments.estimate import (
    DATA_SHAPES,
    format_duration,
    preset_size,
    rough_seconds,
    search_iterations,
    unit_iterations,
)
from lottery_ext.experiments.models import build_model
from lottery_ext.experiments.presets import DEFAULT_PRESET, PRESETS, RunConfig
from lottery_ext.experiments.progress import Progress
from lottery_ext.experiments.schedule import units

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def test_data_shapes_match_the_loaders():
    from lottery_ext.experiments.data import load_dataset

    data = load_dataset("mnist1d", None)
    shape, classes, n_train, n_test = DATA_SHAPES["mnist1d"]
    assert data.input_shape == shape and data.num_classes == classes
    assert len(data.y_train) + len(data.y_val) == n_train and len(data.y_test) == n_test
    if MNIST.is_dir():
        data = load_dataset("mnist", MNIST)
        shape, classes, n_train, n_test = DATA_SHAPES["mnist"]
        assert data.input_shape == shape and len(data.y_test) == n_test
        assert len(data.y_train) + len(data.y_val) == n_train


@pytest.mark.parametrize("k", [0, 7])
def test_units_rewound_to_theta_k_train_from_k(k):
    cfg = RunConfig.from_preset(PRESETS[DEFAULT_PRESET], rewind_iteration=k, iterations=50,
                                rounds=2, trials=2)  # fmt: skip
    expected = 0
    for u in units(cfg):
        late = k and u.level > 0 and u.control in ("ticket", "random_prune")
        assert unit_iterations(cfg, u) == (50 - k if late else 50)
        expected += 50 - k if late else 50
    assert search_iterations(cfg) == expected


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (89.4, "89 s"), (90, "2 min"),
                                           (600, "10 min"), (3 * 3600 + 300, "3 h 05 min"),
                                           (50 * 3600, "2 d 2 h")])  # fmt: skip
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_rough_seconds_counts_steps_evaluations_and_the_train_pass():
    cfg = RunConfig.from_preset(PRESETS[DEFAULT_PRESET], iterations=250, eval_every=100,
                                rounds=1, trials=1, controls=[])  # fmt: skip
    step = 0.01
    per_example = step / (3 * cfg.batch_size)
    n_train, n_test = DATA_SHAPES["mnist1d"][2:]
    evals = 3 * (n_train // 10 + n_test)  # at 100, 200, 250
    one = 250 * step + (evals + n_train) * per_example
    assert rough_seconds(cfg, step) == pytest.approx(2 * one)  # two units
    assert rough_seconds(cfg, 2 * step) == pytest.approx(4 * one)


def test_preset_size_counts_the_weights_and_caches_the_timing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(estimate, "measure_step", lambda cfg: calls.append(cfg) or 0.002)
    cfg = RunConfig.from_preset(PRESETS["lenet300-mnist"])
    model = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    weights = sum(p.numel() for p in model.parameters())
    line = preset_size(cfg)
    assert f"{weights:,} weights" in line and f"{len(units(cfg))} units" in line
    assert format_duration(rough_seconds(cfg, 0.002)) in line and "2 ms per step" in line
    assert preset_size(cfg) == line and len(calls) == 1  # the second time from the cache
    cache = tmp_path / "lottery_ext" / "step_times.json"
    assert list(json.loads(cache.read_text()).values()) == [0.002]
    cache.write_text("{torn")  # a damaged cache is measured again, never trusted
    assert preset_size(cfg) == line and len(calls) == 2
    assert "about" not in preset_size(cfg, timed=False)


def test_measure_step_is_a_positive_time():
    cfg = RunConfig.from_preset(PRESETS[DEFAULT_PRESET])
    assert 0 < estimate.measure_step(cfg, min_seconds=0.0) < 10


def test_presets_lists_size_and_time(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(estimate, "measure_step", lambda cfg: 0.001)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.count("size: ") == len(PRESETS) and out.count("in one process here") == len(PRESETS)
    assert main(["presets", "--no-time"]) == 0
    assert "in one process here" not in capsys.readouterr().out


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _drive(progress: Progress, clock: FakeClock, units_its: list[int], eval_every: int,
           step_s: float) -> None:  # fmt: skip
    for i, its in enumerate(units_its):
        progress.start_unit(f"unit {i}", 0, its)
        for it in range(1, its + 1):
            clock.t += step_s
            progress.update(1)
            if it % eval_every == 0 or it == its:
                progress.evaluated(it)
        progress.unit_done(f"unit {i} done")
    progress.close()


def test_progress_in_a_log_is_lines_with_an_eta():
    clock, lines = FakeClock(), []
    stream = io.StringIO()  # not a terminal
    p = Progress([300, 300], 3, log=lines.append, stream=stream, clock=clock)
    _drive(p, clock, [300, 300], eval_every=50, step_s=1.0)  # 1 s per iteration
    assert stream.getvalue() == "" and not any("\r" in ln for ln in lines)
    assert lines[0].startswith("measured 1 s per iteration")
    assert "about 9 min for the 550 iterations left" in lines[0]
    # a heartbeat at most once a minute (evaluations every 50 s): every other evaluation
    beats = [ln for ln in lines if ln.startswith("  unit 0:")]
    assert len(beats) == 2 and "iteration 150 of 300; ETA 8 min" in beats[0]
    assert any(ln.startswith("unit 0 done  [2/3 units; ETA 5 min") for ln in lines)
    assert lines[-1] == "unit 1 done"  # nothing left: no ETA


def test_progress_on_a_terminal_is_one_bar_with_the_eta():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, lines, tty = FakeClock(), [], Tty()
    p = Progress([200], 1, log=lines.append, stream=tty, clock=clock)
    _drive(p, clock, [200], eval_every=100, step_s=0.5)
    text = tty.getvalue()
    assert "[1/1] unit 0" in text and "200/200" in text and "measured 500 ms" in text
    assert lines == []  # everything went through the bar


def test_progress_disabled_still_says_plan_and_units():
    clock, lines = FakeClock(), []
    p = Progress([100], 1, log=lines.append, enabled=False, stream=io.StringIO(), clock=clock)
    _drive(p, clock, [100], eval_every=10, step_s=2.0)
    assert lines[0].startswith("measured") and lines[-1] == "unit 0 done"
    assert len(lines) == 2  # no heartbeats


def test_find_prints_the_plan_and_an_estimate(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["find", "--out", str(tmp_path / "run"), "--rounds", "1", "--trials", "1",
                     "--iterations", "30", "--eval-every", "10", "--threads", "1",
                     "--no-plots", "--controls", "none"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert (
        "plan: 2 of 2 units to train, 30 iterations each (evaluated every 10): 60 iterations" in out
    )
    assert "ms per iteration" in out and "[1/2 units; ETA" in out and "\r" not in out


def test_rough_time_of_a_config_with_overrides():
    base = RunConfig.from_preset(PRESETS[DEFAULT_PRESET])
    longer = dataclasses.replace(base, iterations=2 * base.iterations)
    assert rough_seconds(longer, 0.001) > 1.9 * rough_seconds(base, 0.001)
