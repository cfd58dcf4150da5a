"""The experiment runner and the `lottery-ext` command line, end to end: the run directory's
files (config, results, curves, summary, plots), the pruning schedule, determinism, resuming
after kills (SIGKILL of a real process and kills injected at exact points), refusal of a
changed configuration, `report`, `presets`, `info`, checkpoints, options and bad input, and a
short real-MNIST LeNet-300-100 run.

Every run here is tiny (MNIST-1D, generated, no data needed) and single-threaded."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import lottery_ext
from lottery_ext.cli import main
from lottery_ext.experiments import runner
from lottery_ext.experiments.models import build_model
from lottery_ext.experiments.presets import DEFAULT_PRESET, PRESETS, RunConfig
from lottery_ext.experiments.rundir import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = (REPO / ".." / "shared" / "data" / "mnist").resolve()

# A tiny budget: 2 rounds, 1 trial, 60 iterations, evaluated and checkpointed every 20.
TINY = ["--rounds", "2", "--trials", "1", "--iterations", "60", "--eval-every", "20",
        "--checkpoint-every", "20", "--threads", "1", "--no-progress"]  # fmt: skip
NO_PLOTS = "--no-plots"
# The 200-iteration variant used for the SIGKILL tests (levels long enough to be killed in).
TINY200 = [*TINY, "--iterations", "200"]
PLOTS = ("accuracy.png", "early_stop.png", "curves.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# mnist1d-mlp: input length 40 (MNIST-1D), hidden (256, 128), 10 classes; rate 0.2 on the
# hidden layers, the output layer at rate / 2.
MNIST1D_LEN = 40
RESULT_KEYS = {
    "trial", "control", "level", "weights_remaining", "early_stop_iteration",
    "test_accuracy_at_early_stop", "val_loss_at_early_stop", "final_test_accuracy",
    "final_train_accuracy", "iterations", "seconds",
}  # fmt: skip


_MNIST1D_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _module_setup():
    """Single-threaded in-process runs (the runner sets torch's thread count from --threads;
    the caller's count is restored afterwards). Generating MNIST-1D takes seconds: in-process
    runs share one copy per (val_size, seed); the subprocess runs generate their own, and
    must give the same results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    orig = runner.load_dataset

    def load_dataset(name, data_dir=None, **kw):
        if name != "mnist1d":
            return orig(name, data_dir, **kw)
        key = tuple(sorted(kw.items()))
        if key not in _MNIST1D_CACHE:
            _MNIST1D_CACHE[key] = orig(name, data_dir, **kw)
        return _MNIST1D_CACHE[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "load_dataset", load_dataset)
        yield
    torch.set_num_threads(threads)


# ---- helpers ------------------------------------------------------------------------------------


def find(out, *extra) -> int:
    """`lottery-ext find --out OUT <TINY> <extra>` in-process (later options override)."""
    return main(["find", "--out", str(out), *TINY, *extra])


def sub_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "lottery_ext", *args]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Same results (but the wall-clock `seconds`), same curves, same masks."""
    ra, rb = read_jsonl(a / "results.jsonl"), read_jsonl(b / "results.jsonl")
    assert [runner.unit_key(r) for r in ra] == [runner.unit_key(r) for r in rb]
    assert without_seconds(ra) == without_seconds(rb)
    assert (a / "curves.jsonl").read_text() == (b / "curves.jsonl").read_text()
    masks_a = sorted(p.name for p in (a / "state").glob("trial*_masks*.pt"))
    assert masks_a == sorted(p.name for p in (b / "state").glob("trial*_masks*.pt"))
    for name in masks_a:
        ma = load_checkpoint(a / "state" / name)
        mb = load_checkpoint(b / "state" / name)
        assert ma.keys() == mb.keys()
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def expected_units(rounds: int, trials: int, controls=("reinit", "random_prune")) -> list:
    units = []
    for t in range(trials):
        for level in range(rounds + 1):
            units.append((t, "ticket", level))
            if level:
                units += [(t, c, level) for c in ("reinit", "random_prune") if c in controls]
    return units


def mlp_layer_sizes() -> list[int]:
    """Weights per pruned layer of mnist1d-mlp, from the layer sizes alone."""
    sizes = [MNIST1D_LEN, 256, 128, 10]
    return [a * b for a, b in zip(sizes[:-1], sizes[1:])]


def layer_counts(sizes: list[int], rates: list[float], level: int) -> list[int]:
    """Weights kept per layer after `level` rounds: each round removes round(rate * kept)."""
    counts = list(sizes)
    for _ in range(level):
        counts = [n - round(r * n) for n, r in zip(counts, rates)]
    return counts


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if len(data) < 33 or data[:8] != PNG_MAGIC or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return width > 0 and height > 0


class InjectedKill(BaseException):
    """Raised to stop a run at an exact point (as a SIGKILL there would: every file the
    runner writes is fsynced / atomically renamed before it goes on)."""


def kill_at_eval(monkeypatch, unit: tuple, iteration: int) -> None:
    """Kill the run right after the evaluation at `iteration` of `unit` (before the
    checkpoint that iteration may trigger)."""
    orig = runner.Level.evaluate_now

    def evaluate_now(self):
        orig(self)
        if runner.unit_key(self.unit) == unit and self.it == iteration:
            raise InjectedKill(f"{unit} @ {iteration}")

    monkeypatch.setattr(runner.Level, "evaluate_now", evaluate_now)


def kill_after_append(monkeypatch, unit: tuple, halfway: bool = False) -> None:
    """Kill right after `unit`'s result landed (before its checkpoint is removed), or, with
    `halfway`, after its curve was written but before its result was."""
    orig = runner.RunDir.append

    def append(self, result, curve):
        if runner.unit_key(result) == unit:
            if halfway:
                with open(self.curves, "a") as f:
                    f.write(json.dumps(curve) + "\n")
            else:
                orig(self, result, curve)
            raise InjectedKill(str(unit))
        orig(self, result, curve)

    monkeypatch.setattr(runner.RunDir, "append", append)


def run_killed(monkeypatch, out: Path, *extra) -> None:
    with pytest.raises(InjectedKill):
        find(out, NO_PLOTS, *extra)
    monkeypatch.undo()


# ---- shared runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory) -> Path:
    """The tiny budget with 2 trials and plots, in-process."""
    out = tmp_path_factory.mktemp("e2e") / "run"
    assert find(out, "--trials", "2") == 0
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    """An uninterrupted run of the tiny budget (no plots)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert find(out, NO_PLOTS) == 0
    return out


@pytest.fixture(scope="module")
def ref200(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref200") / "run"
    assert main(["find", "--out", str(out), *TINY200, NO_PLOTS]) == 0
    return out


REWIND = ["--eval-every", "5", "--rewind-iteration", "10"]


@pytest.fixture(scope="module")
def ref_rewind(tmp_path_factory) -> Path:
    """Late rewinding to iteration 10, evaluated every 5 (checkpoints every 20)."""
    out = tmp_path_factory.mktemp("rewind") / "run"
    assert find(out, NO_PLOTS, *REWIND) == 0
    return out


# ---- 1. end to end ------------------------------------------------------------------------------


def test_config_json_holds_every_setting_and_versions(e2e_run):
    meta = json.loads((e2e_run / "config.json").read_text())
    cfg = meta["config"]
    # pruner_options is TicketSearch's: left out for presets (their run-directory hash holds)
    assert set(cfg) == {f.name for f in dataclasses.fields(RunConfig)} - {"pruner_options"}
    assert meta["lottery_ext"] == lottery_ext.__version__
    assert meta["torch"] == torch.__version__
    expected = RunConfig.from_preset(
        PRESETS[DEFAULT_PRESET], rounds=2, trials=2, iterations=60, eval_every=20,
        checkpoint_every=20, threads=1,
    ).to_dict()  # fmt: skip
    assert cfg == expected
    assert cfg["preset"] == "mnist1d-mlp" and cfg["iterations"] == 60 and cfg["trials"] == 2


def test_results_one_row_per_unit_with_the_paper_figures(e2e_run):
    rows = read_jsonl(e2e_run / "results.jsonl")
    assert [runner.unit_key(r) for r in rows] == expected_units(rounds=2, trials=2)
    for r in rows:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["iterations"] == 60
        assert isinstance(r["seconds"], float) and r["seconds"] >= 0
        for key in ("test_accuracy_at_early_stop", "final_test_accuracy", "final_train_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        assert math.isfinite(r["val_loss_at_early_stop"]) and r["val_loss_at_early_stop"] > 0
        # better than chance (10 classes) after 60 iterations of Adam
        assert r["final_train_accuracy"] > 0.15
    # the trials are distinct networks
    t0 = [r for r in rows if r["trial"] == 0]
    t1 = [r for r in rows if r["trial"] == 1]
    assert without_seconds(t0) != [{**r, "trial": 0} for r in without_seconds(t1)]


def test_weights_remaining_follows_the_round_compounded_rates(e2e_run):
    rows = read_jsonl(e2e_run / "results.jsonl")
    sizes = mlp_layer_sizes()
    rates = [0.2, 0.2, 0.1]  # hidden at rate, output at rate / 2
    by_level: dict[int, set] = {}
    for r in rows:
        assert 0.0 < r["weights_remaining"] <= 1.0
        by_level.setdefault(r["level"], set()).add(r["weights_remaining"])
        expected = sum(layer_counts(sizes, rates, r["level"])) / sum(sizes)
        assert r["weights_remaining"] == pytest.approx(expected, rel=0, abs=1e-12), r
    # equal across controls and trials at a level, strictly decreasing with the level
    assert all(len(v) == 1 for v in by_level.values())
    fractions = [by_level[lv].pop() for lv in sorted(by_level)]
    assert fractions[0] == 1.0
    assert all(a > b for a, b in zip(fractions, fractions[1:]))
    # the saved masks hold exactly these counts per layer, and are nested
    m1 = load_checkpoint(e2e_run / "state" / "trial0_masks1.pt")
    m2 = load_checkpoint(e2e_run / "state" / "trial0_masks2.pt")
    assert [m.numel() for m in m1.values()] == sizes
    assert [int(m.sum()) for m in m1.values()] == layer_counts(sizes, rates, 1)
    assert [int(m.sum()) for m in m2.values()] == layer_counts(sizes, rates, 2)
    assert all(not (m2[k] & ~m1[k]).any() for k in m1)


def check_early_stop(run: Path, eval_every: int, iterations: int) -> list[int]:
    rows = read_jsonl(run / "results.jsonl")
    curves = read_jsonl(run / "curves.jsonl")
    assert [runner.unit_key(c) for c in curves] == [runner.unit_key(r) for r in rows]
    stops = []
    for r, c in zip(rows, curves):
        hist = c["history"]
        its = [h["iteration"] for h in hist]
        assert its == sorted(set(its)) and its[-1] == iterations
        assert all(it % eval_every == 0 or it == iterations for it in its)
        for h in hist:
            assert {"iteration", "val_loss", "val_accuracy", "test_loss", "test_accuracy"} <= set(h)
        es = r["early_stop_iteration"]
        assert es % eval_every == 0 or es == iterations
        best = min(hist, key=lambda h: h["val_loss"])  # the first minimum
        assert es == best["iteration"], r
        assert r["val_loss_at_early_stop"] == best["val_loss"]
        assert r["test_accuracy_at_early_stop"] == best["test_accuracy"]
        assert r["final_test_accuracy"] == hist[-1]["test_accuracy"]
        stops.append(es)
    return stops


def test_early_stop_is_the_argmin_of_validation_loss_in_the_curves(e2e_run, ref200, ref_rewind):
    curves = read_jsonl(e2e_run / "curves.jsonl")
    assert all([h["iteration"] for h in c["history"]] == [20, 40, 60] for c in curves)
    stops = check_early_stop(e2e_run, 20, 60)
    stops += check_early_stop(ref200, 20, 200)
    stops += check_early_stop(ref_rewind, 5, 60)
    # some units stop before their last iteration, so the argmin is really exercised
    assert any(s not in (60, 200) for s in stops)


def test_summary_csv_is_consistent_with_results(e2e_run):
    rows = read_jsonl(e2e_run / "results.jsonl")
    with open(e2e_run / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["control"], r["level"]), []).append(r)
    assert {(s["control"], int(s["level"])) for s in summary} == set(groups)
    assert len(summary) == len(groups)
    for s in summary:
        rs = groups[(s["control"], int(s["level"]))]
        assert int(s["trials"]) == len(rs) == 2
        for key in ("test_accuracy_at_early_stop", "early_stop_iteration"):
            vals = [r[key] for r in rs]
            assert float(s[f"{key}_mean"]) == pytest.approx(sum(vals) / len(vals), abs=5e-6)
            assert float(s[f"{key}_min"]) == pytest.approx(min(vals), abs=5e-6)
            assert float(s[f"{key}_max"]) == pytest.approx(max(vals), abs=5e-6)
        assert float(s["weights_remaining"]) == pytest.approx(rs[0]["weights_remaining"], rel=1e-5)
        for key in ("final_test_accuracy", "final_train_accuracy"):
            assert float(s[f"{key}_mean"]) == pytest.approx(sum(r[key] for r in rs) / 2, abs=5e-6)


def test_plots_are_png_files(e2e_run):
    for name in PLOTS:
        assert is_png(e2e_run / name), name


def test_checkpoints_load_with_weights_only(e2e_run):
    theta = load_checkpoint(e2e_run / "state" / "trial0_theta.pt")
    assert theta["theta_k"] is None  # no late rewinding
    tensors = theta["theta0"]["tensors"]
    assert tensors["fc.weight"].shape == (10, 128)
    assert theta["theta0"]["iteration"] == 0
    masks = load_checkpoint(e2e_run / "state" / "trial0_masks1.pt")
    assert set(masks) == {"fc_layers.0.weight", "fc_layers.1.weight", "fc.weight"}
    assert all(m.dtype == torch.bool for m in masks.values())
    # the mid-level checkpoint is gone once a run is complete
    assert not list((e2e_run / "state").glob("unit*.pt"))
    # theta0 differs between trials
    theta1 = load_checkpoint(e2e_run / "state" / "trial1_theta.pt")
    assert not torch.equal(tensors["fc.weight"], theta1["theta0"]["tensors"]["fc.weight"])


def test_python_dash_m_gives_the_same_run_as_in_process(e2e_run, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        cli_cmd("find", "--out", str(out), *TINY, "--trials", "2"),
        capture_output=True, text=True, env=sub_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"run directory: {out}" in proc.stdout
    assert "summary.csv" in proc.stdout
    assert_same_run(out, e2e_run)
    meta_a = json.loads((out / "config.json").read_text())
    meta_b = json.loads((e2e_run / "config.json").read_text())
    assert meta_a["config"] == meta_b["config"]
    for name in (*PLOTS, "summary.csv"):
        assert (out / name).stat().st_size > 0
    for name in PLOTS:
        assert is_png(out / name)


# ---- 2. determinism -----------------------------------------------------------------------------


def test_same_seed_same_results_different_seed_different(ref, tmp_path):
    assert find(tmp_path / "again", NO_PLOTS) == 0
    assert_same_run(tmp_path / "again", ref)
    rows = read_jsonl(ref / "results.jsonl")

    assert find(tmp_path / "seed1", NO_PLOTS, "--seed", "1") == 0
    other = read_jsonl(tmp_path / "seed1" / "results.jsonl")
    assert [runner.unit_key(r) for r in other] == [runner.unit_key(r) for r in rows]
    # the pruning schedule is the same, the numbers are not
    assert [r["weights_remaining"] for r in other] == [r["weights_remaining"] for r in rows]
    diff = [a["val_loss_at_early_stop"] != b["val_loss_at_early_stop"] for a, b in zip(rows, other)]
    assert all(diff)


# ---- 3. resuming --------------------------------------------------------------------------------


def _wait_and_kill(proc: subprocess.Popen, run: Path, when: str, timeout: float = 240) -> None:
    """Poll the run directory; SIGKILL the process at the first moment `when` holds:
    "mid_level": a result landed and a mid-level checkpoint newer than it exists (not the
    stale one of the level that just finished);
    "after_level": the second result just landed."""
    results = run / "results.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            n = results.read_bytes().count(b"\n")
        except FileNotFoundError:
            n = 0
        try:
            newest = max((u.stat().st_mtime_ns for u in (run / "state").glob("unit_*.pt")),
                         default=0)  # fmt: skip
            fresh = n >= 1 and newest > results.stat().st_mtime_ns
        except FileNotFoundError:
            fresh = False
        if (when == "mid_level" and fresh) or (when == "after_level" and n >= 2):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed ({when})")


@pytest.mark.parametrize("when", ["mid_level", "after_level"])
def test_sigkill_then_rerun_matches_an_uninterrupted_run(ref200, tmp_path, capsys, when):
    out = tmp_path / "run"
    args = ["find", "--out", str(out), *TINY200, NO_PLOTS]
    proc = subprocess.Popen(cli_cmd(*args), env=sub_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_and_kill(proc, out, when)
    assert proc.returncode == -signal.SIGKILL
    done = read_jsonl(out / "results.jsonl")
    n_units = len(expected_units(rounds=2, trials=1))
    assert 1 <= len(done) < n_units
    ckpts = list((out / "state").glob("unit_*.pt"))
    if when == "mid_level":
        # the interrupted level's checkpoint: loadable with weights_only, not a finished unit
        assert ckpts
        sd = load_checkpoint(max(ckpts, key=lambda c: c.stat().st_mtime_ns))
        assert tuple(sd["unit"]) not in {runner.unit_key(r) for r in done}
        assert 0 < sd["iteration"] < 200 and sd["iteration"] % 20 == 0
        assert [h["iteration"] for h in sd["history"]] == list(range(20, sd["iteration"] + 1, 20))
        assert {"model", "optimizer", "batches", "aug_gen", "torch_rng"} <= set(sd)
    # the same command again finishes it
    capsys.readouterr()
    assert main(args) == 0
    assert_same_run(out, ref200)
    assert not list((out / "state").glob("unit*.pt"))


def test_injected_kill_mid_level_resumes_from_the_checkpoint(ref, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # ticket level 1, right after the evaluation at 40: the checkpoint at 20 is on disk
    kill_at_eval(monkeypatch, (0, "ticket", 1), 40)
    run_killed(monkeypatch, out)
    sd = load_checkpoint(out / "state" / "unit_t0_ticket_L1.pt")
    assert sd["unit"] == [0, "ticket", 1] and sd["iteration"] == 20
    assert [runner.unit_key(r) for r in read_jsonl(out / "results.jsonl")] == [(0, "ticket", 0)]
    resumed_from = []
    orig = runner.Level.load_state_dict

    def load_state_dict(self, sd):
        resumed_from.append((runner.unit_key(self.unit), sd["iteration"]))
        orig(self, sd)

    monkeypatch.setattr(runner.Level, "load_state_dict", load_state_dict)
    assert find(out, NO_PLOTS) == 0
    assert resumed_from == [((0, "ticket", 1), 20)]
    assert_same_run(out, ref)


def test_injected_kill_right_after_a_level_finished(ref, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_after_append(monkeypatch, (0, "reinit", 1))
    run_killed(monkeypatch, out)
    keys = [runner.unit_key(r) for r in read_jsonl(out / "results.jsonl")]
    assert keys == [(0, "ticket", 0), (0, "ticket", 1), (0, "reinit", 1)]
    assert (out / "state" / "unit_t0_reinit_L1.pt").exists()  # the finished level's, stale
    assert find(out, NO_PLOTS) == 0
    assert_same_run(out, ref)
    assert not list((out / "state").glob("unit*.pt"))


def test_injected_kill_between_curve_and_result(ref, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_after_append(monkeypatch, (0, "ticket", 1), halfway=True)
    run_killed(monkeypatch, out)
    assert len(read_jsonl(out / "curves.jsonl")) == 2  # one more curve than results
    assert len(read_jsonl(out / "results.jsonl")) == 1
    assert find(out, NO_PLOTS) == 0
    assert_same_run(out, ref)


def test_torn_last_result_line_is_repaired_and_redone(ref, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "run")
    raw = (out / "results.jsonl").read_bytes()
    lines = raw.splitlines(keepends=True)
    last = lines[-1]
    (out / "results.jsonl").write_bytes(b"".join(lines[:-1]) + last[: len(last) // 2])
    assert find(out, NO_PLOTS) == 0
    out_text = capsys.readouterr().out
    assert "random_prune level  2" in out_text  # the torn level was trained again
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")
    assert_same_run(out, ref)


def test_appended_half_line_is_dropped(ref, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "run")
    raw = (out / "results.jsonl").read_bytes()
    half = json.dumps({"trial": 0, "control": "ticket", "level": 3, "weights_remaining": 0.5})
    (out / "results.jsonl").write_bytes(raw + half[: len(half) // 2].encode())
    assert find(out, NO_PLOTS) == 0
    assert "already done" in capsys.readouterr().out
    assert (out / "results.jsonl").read_bytes() == raw
    assert_same_run(out, ref)


def test_late_rewinding_resumes_after_a_checkpoint(ref_rewind, tmp_path, monkeypatch):
    # killed in the dense level after theta_k was captured (10) and checkpointed (20)
    out = tmp_path / "run"
    kill_at_eval(monkeypatch, (0, "ticket", 0), 25)
    run_killed(monkeypatch, out, *REWIND)
    assert find(out, NO_PLOTS, *REWIND) == 0
    assert_same_run(out, ref_rewind)


def test_late_rewinding_resumes_between_capture_and_first_checkpoint(
    ref_rewind, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    kill_at_eval(monkeypatch, (0, "ticket", 0), 15)  # after capture at 10, before ckpt 20
    run_killed(monkeypatch, out, *REWIND)
    saved = load_checkpoint(out / "state" / "trial0_theta.pt")
    assert saved["theta_k"] is not None and saved["theta_k"]["iteration"] == 10
    assert not list((out / "state").glob("unit*.pt"))
    assert find(out, NO_PLOTS, *REWIND) == 0
    assert_same_run(out, ref_rewind)


# ---- 4. configuration identity ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, key, old, new",
    [
        (["--iterations", "80"], "iterations", "60", "80"),
        (["--seed", "3"], "seed", "0", "3"),
        (["--controls", "none"], "controls", "['reinit', 'random_prune']", "[]"),
    ],
)
def test_changed_configuration_is_refused(ref, tmp_path, capsys, change, key, old, new):
    out = copy_run(ref, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert find(out, NO_PLOTS, *change) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "different configuration" in err and f"{key}: {old} -> {new}" in err
    assert "--out" in err  # says how to proceed
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_same_configuration_resumes_and_says_all_done(ref, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "run")
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    assert find(out, NO_PLOTS) == 0
    printed = capsys.readouterr().out
    assert "all 7 levels already done" in printed
    assert "trial 0 ticket" not in printed  # nothing trained
    assert (out / "results.jsonl").read_bytes() == before


def test_changed_configuration_refused_for_an_interrupted_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    kill_at_eval(monkeypatch, (0, "ticket", 0), 40)
    run_killed(monkeypatch, out)
    capsys.readouterr()
    assert find(out, NO_PLOTS, "--lr", "0.01") == 2
    assert "lr: 0.002 -> 0.01" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()
    assert load_checkpoint(out / "state" / "unit_t0_ticket_L0.pt")["iteration"] == 20


# ---- 5. report ----------------------------------------------------------------------------------


def test_report_regenerates_summary_and_plots(e2e_run, tmp_path, capsys):
    out = copy_run(e2e_run, tmp_path / "run")
    summary = (out / "summary.csv").read_text()
    for name in ("summary.csv", *PLOTS):
        (out / name).unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "level" in printed and "ticket acc%" in printed and "random_prune" in printed
    assert (out / "summary.csv").read_text() == summary
    for name in PLOTS:
        assert is_png(out / name)
    # --no-plots: the table and summary.csv only
    for name in ("summary.csv", *PLOTS):
        (out / name).unlink()
    assert main(["report", str(out), "--no-plots"]) == 0
    assert (out / "summary.csv").read_text() == summary
    assert not any((out / name).exists() for name in PLOTS)


def test_report_of_an_interrupted_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    kill_at_eval(monkeypatch, (0, "random_prune", 1), 40)
    run_killed(monkeypatch, out)
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    with open(out / "summary.csv", newline="") as f:
        summary = {(r["control"], int(r["level"])) for r in csv.DictReader(f)}
    assert summary == {("ticket", 0), ("ticket", 1), ("reinit", 1)}
    for name in PLOTS:
        assert is_png(out / name)


def test_report_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "config.json" in err
    # a run directory whose run has not finished a level yet
    ref_cfg = RunConfig.from_preset(PRESETS[DEFAULT_PRESET], threads=1)
    runner.RunDir(tmp_path / "fresh").open(ref_cfg)
    assert main(["report", str(tmp_path / "fresh")]) == 2
    assert "no finished levels" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "summary.csv").exists()
    # a path that does not exist
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_tolerates_a_torn_last_line(ref, tmp_path, capsys):
    out = copy_run(ref, tmp_path / "run")
    for name in ("results.jsonl", "curves.jsonl"):
        lines = (out / name).read_bytes().splitlines(keepends=True)
        (out / name).write_bytes(b"".join(lines[:-1]) + lines[-1][:40])
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 0
    with open(out / "summary.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6  # the torn 7th unit is not counted


def test_report_after_a_kill_between_curve_and_result(tmp_path, monkeypatch):
    out = tmp_path / "run"
    kill_after_append(monkeypatch, (0, "ticket", 1), halfway=True)
    run_killed(monkeypatch, out)
    assert main(["report", str(out)]) == 0
    for name in PLOTS:
        assert is_png(out / name)


# ---- 6. presets and info ------------------------------------------------------------------------


def test_presets_lists_every_preset_with_its_recipe(capsys):
    names = ["mnist1d-mlp", "lenet300-mnist", "conv2-cifar10", "conv4-cifar10",
             "conv6-cifar10", "resnet20-cifar10", "vgg19-cifar10"]  # fmt: skip
    assert sorted(PRESETS) == sorted(names)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in names:
        p = PRESETS[name]
        assert f"{name}: " in out or f"{name} (default): " in out
        assert p.recipe() in out
        if p.needs_data:
            assert p.needs_data in out
    assert "mnist1d-mlp (default)" in out
    assert "lenet300 on mnist; adam lr 0.0012" in out
    assert "conv 10%, fc 20%, output 10%" in out  # conv-2's rates
    assert "global 20%, output 0%" in out  # resnet-20
    # listed in order, each once
    positions = [out.index(n) for n in names]
    assert positions == sorted(positions)


def test_info_prints_json_with_native(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["native"] is True
    assert info["version"] == lottery_ext.__version__
    assert info["torch"] == torch.__version__


def test_random_mask_control_keeps_the_ticket_counts_at_random(ref):
    cfg = RunConfig(**json.loads((ref / "config.json").read_text())["config"])
    ticket = load_checkpoint(ref / "state" / "trial0_masks1.pt")
    rand1 = runner.random_masks(cfg, ticket, 0, 1)
    assert rand1.keys() == ticket.keys()
    for name, m in ticket.items():
        r = rand1[name]
        assert r.dtype == torch.bool and r.shape == m.shape
        assert int(r.sum()) == int(m.sum())  # the same count per tensor
        assert not torch.equal(r, m)  # but not the magnitude mask
    # seeded per (trial, level): reproducible, different across levels and trials
    again = runner.random_masks(cfg, ticket, 0, 1)
    assert all(torch.equal(rand1[k], again[k]) for k in ticket)
    for other in (runner.random_masks(cfg, ticket, 0, 2), runner.random_masks(cfg, ticket, 1, 1)):
        assert not all(torch.equal(rand1[k], other[k]) for k in ticket)


# ---- 8. options ---------------------------------------------------------------------------------


def test_late_rewinding_trains_the_pruned_levels_from_k(ref_rewind):
    rows = read_jsonl(ref_rewind / "results.jsonl")
    curves = {runner.unit_key(c): c["history"] for c in read_jsonl(ref_rewind / "curves.jsonl")}
    assert [runner.unit_key(r) for r in rows] == expected_units(rounds=2, trials=1)
    for (_, control, level), hist in curves.items():
        its = [h["iteration"] for h in hist]
        if level >= 1 and control != "reinit":  # the ticket and the random mask rewind to k
            assert its == list(range(15, 61, 5)), (control, level)
        else:  # the dense level and the re-initialised control train from 0
            assert its == list(range(5, 61, 5)), (control, level)
    for r in rows:
        assert r["early_stop_iteration"] in [h["iteration"] for h in curves[runner.unit_key(r)]]
    saved = load_checkpoint(ref_rewind / "state" / "trial0_theta.pt")
    assert saved["theta_k"]["iteration"] == 10
    w0, wk = saved["theta0"]["tensors"]["fc.weight"], saved["theta_k"]["tensors"]["fc.weight"]
    assert not torch.equal(w0, wk)
    cfg = json.loads((ref_rewind / "config.json").read_text())["config"]
    assert cfg["rewind_iteration"] == 10


def test_controls_none_runs_only_tickets(tmp_path):
    out = tmp_path / "run"
    assert find(out, NO_PLOTS, "--controls", "none", "--iterations", "20") == 0
    rows = read_jsonl(out / "results.jsonl")
    assert [runner.unit_key(r) for r in rows] == expected_units(2, 1, controls=())
    assert json.loads((out / "config.json").read_text())["config"]["controls"] == []


def test_single_control(tmp_path):
    out = tmp_path / "run"
    assert find(out, NO_PLOTS, "--controls", "reinit", "--iterations", "20") == 0
    rows = read_jsonl(out / "results.jsonl")
    assert [runner.unit_key(r) for r in rows] == expected_units(2, 1, controls=("reinit",))


@pytest.mark.parametrize(
    "opts",
    [
        ["--optimizer", "sgd", "--lr", "0.05"],
        ["--optimizer", "momentum", "--momentum", "0.9", "--lr", "0.05"],
        ["--optimizer", "adamw", "--weight-decay", "0.01"],
        ["--scope", "global"],
    ],
    ids=["sgd", "momentum", "adamw", "global"],
)
def test_optimizers_and_global_scope(ref, tmp_path, opts):
    out = tmp_path / "run"
    assert find(out, NO_PLOTS, "--rounds", "1", "--iterations", "20", "--eval-every", "10",
                *opts) == 0  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg[opts[0][2:]] == opts[1]
    rows = read_jsonl(out / "results.jsonl")
    assert [runner.unit_key(r) for r in rows] == expected_units(rounds=1, trials=1)
    for r in rows:
        assert math.isfinite(r["val_loss_at_early_stop"])
        assert r["final_train_accuracy"] > 0.12  # it learns something
    sizes = mlp_layer_sizes()
    if opts[0] == "--scope":
        # one threshold over the hidden layers (20% of them together), the output at 10%
        hidden = sizes[0] + sizes[1]
        kept = hidden - round(0.2 * hidden) + sizes[2] - round(0.1 * sizes[2])
        masks = load_checkpoint(out / "state" / "trial0_masks1.pt")
        assert int(masks["fc.weight"].sum()) == sizes[2] - round(0.1 * sizes[2])
        # a global threshold does not take exactly 20% of each hidden layer
        per_layer = [int(m.sum()) for m in masks.values()][:2]
        assert per_layer != layer_counts(sizes[:2], [0.2, 0.2], 1)
    else:
        kept = sum(layer_counts(sizes, [0.2, 0.2, 0.1], 1))
    assert rows[1]["weights_remaining"] == pytest.approx(kept / sum(sizes), rel=0, abs=1e-12)
    # the option changed the training: the dense level differs from adam's (the reference)
    dense = read_jsonl(ref / "results.jsonl")[0]
    if opts[0] == "--optimizer":
        assert rows[0]["val_loss_at_early_stop"] != dense["val_loss_at_early_stop"]


# ---- 9. bad input -------------------------------------------------------------------------------


def test_unknown_preset(tmp_path, capsys):
    argv = ["find", "--preset", "lenet5-imagenet", "--out", str(tmp_path / "r"), "--threads", "1"]
    assert main(argv) == 2  # like every other input error
    msg = capsys.readouterr().err
    assert "unknown preset 'lenet5-imagenet'" in msg and "lottery-ext presets" in msg
    assert not (tmp_path / "r").exists()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


def test_lenet_without_data_dir(tmp_path, capsys, no_network):
    assert main(["find", "--preset", "lenet300-mnist", "--out", str(tmp_path / "r"),
                 "--threads", "1", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "--data-dir" in err and "nothing is downloaded" in err
    assert "Traceback" not in err
    assert no_network == []
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_data_dir_without_mnist_files(tmp_path, capsys, no_network):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte").write_bytes(b"")  # one present (even if empty)
    assert main(["find", "--preset", "lenet300-mnist", "--data-dir", str(data),
                 "--out", str(tmp_path / "r"), "--threads", "1", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "is missing" in err
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in err
    assert "missing: train-images" not in err
    assert no_network == []
    # a directory that does not exist
    nope, out2 = str(tmp_path / "nope"), str(tmp_path / "r2")
    assert main(["find", "--preset", "lenet300-mnist", "--data-dir", nope,
                 "--out", out2, "--threads", "1", "--no-progress"]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rewind-iteration", "60"], "rewind_iteration must be in [0, iterations=60)"),
        (["--rewind-iteration", "100"], "rewind_iteration must be in [0, iterations=60)"),
        (["--controls", "reinit,shuffle"], "--controls: unknown ['shuffle']"),
        (["--iterations", "0"], "iterations must be >= 1"),
        (["--controls", ""], "--controls: unknown"),
    ],
)
def test_bad_settings_exit_2_before_creating_the_run(tmp_path, capsys, args, message):
    out = tmp_path / "r"
    assert find(out, NO_PLOTS, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_rate_is_refused_before_the_run_directory_is_created(tmp_path, capsys):
    out = tmp_path / "r"
    assert find(out, NO_PLOTS, "--rate", "1.5") == 2
    assert "rate must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert find(out, NO_PLOTS, "--rate", "0.5", "--rounds", "1", "--iterations", "20") == 0


def test_bad_choice_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        find(tmp_path / "r", "--optimizer", "rmsprop")
    assert exc.value.code == 2
    assert "invalid choice: 'rmsprop'" in capsys.readouterr().err


# ---- 10. real MNIST -----------------------------------------------------------------------------


@pytest.mark.skipif(
    not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    and not (MNIST_DIR / "train-images-idx3-ubyte").exists(),
    reason=f"no MNIST at {MNIST_DIR}",
)
def test_lenet300_ticket_at_51_percent_matches_dense_on_mnist(tmp_path):
    out = tmp_path / "run"
    assert main(["find", "--preset", "lenet300-mnist", "--data-dir", str(MNIST_DIR),
                 "--out", str(out), "--rounds", "3", "--trials", "1", "--iterations", "1500",
                 "--eval-every", "100", "--controls", "none", "--threads", "1",
                 "--no-progress", NO_PLOTS]) == 0  # fmt: skip
    rows = {r["level"]: r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(rows) == [0, 1, 2, 3]
    model = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [784 * 300, 300 * 100, 100 * 10]
    expected = sum(layer_counts(sizes, [0.2, 0.2, 0.1], 3)) / sum(sizes)
    assert rows[3]["weights_remaining"] == pytest.approx(expected, rel=0, abs=1e-12)
    assert rows[3]["weights_remaining"] == pytest.approx(0.513, abs=0.001)
    dense = rows[0]["test_accuracy_at_early_stop"]
    ticket = rows[3]["test_accuracy_at_early_stop"]
    assert dense > 0.95
    assert ticket >= dense - 0.015, (dense, ticket)
    for r in rows.values():
        assert r["early_stop_iteration"] % 100 == 0
