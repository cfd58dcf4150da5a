"""Many units at once: local worker processes and Ray tasks give the rows of a serial run;
a killed driver resumes; a unit that fails once is retried; one that keeps failing stops the
search with its error and keeps what finished."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import lottery_ext as lx
from lottery_ext.cli import main
from lottery_ext.experiments.executors import UnitError

TINY = ["--rounds", "2", "--trials", "2", "--iterations", "60", "--eval-every", "20",
        "--checkpoint-every", "20", "--threads", "1", "--no-progress", "--no-plots"]  # fmt: skip


def _find(out: Path, *extra: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["find", "--out", str(out), *TINY, *extra])
    finally:
        torch.set_num_threads(threads)


def _rows(out: Path, name: str = "results.jsonl") -> list[dict]:
    rows = []
    for ln in (out / name).read_text().splitlines():
        r = json.loads(ln)
        r.pop("seconds", None)
        rows.append(r)
    return sorted(rows, key=lambda r: (r["trial"], r["level"], r["control"]))


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "run"
    assert _find(out, "--rewind-iteration", "10") == 0
    return out


def test_two_workers_give_the_serial_rows(serial, tmp_path, capsys):
    out = tmp_path / "run"
    assert _find(out, "--rewind-iteration", "10", "--workers", "2") == 0
    assert "on 2 worker processes" in capsys.readouterr().out
    assert _rows(out) == _rows(serial)
    assert _rows(out, "curves.jsonl") == _rows(serial, "curves.jsonl")
    for name in ("trial0_masks2.pt", "trial1_masks1.pt", "trial1_theta.pt"):
        a = lx.experiments.rundir.load_checkpoint(out / "state" / name)
        b = lx.experiments.rundir.load_checkpoint(serial / "state" / name)
        assert repr(a) == repr(b)
    assert not list((out / "state").glob("unit*"))


def test_killed_driver_resumes_and_ends_identical(serial, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lottery_ext", "find", "--out", str(out), *TINY,
           "--rewind-iteration", "10", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    results = out / "results.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers
    proc.wait()
    assert 3 <= len(_rows(out)) < len(_rows(serial))
    assert _find(out, "--rewind-iteration", "10", "--workers", "2") == 0
    assert _rows(out) == _rows(serial)


# -- failures: a user's task whose training step fails on purpose --------------------------


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return (x[:200], y[:200]), (x[200:250], y[200:250]), (x[250:], y[250:])


def adam(params):
    return lx.MaskedAdam(params, lr=1e-2)


def flaky_step(model, batch, optimizer):
    """The training step, failing where FLAKY says: "once": at the start of each pruned unit
    on its first attempt (marker files in FLAKY_DIR, keyed by the unit's starting weights,
    so a retry in any process passes); "crash": the worker process dies, once in the run;
    "always": at the start of every pruned unit."""
    first = model[0].weight.detach()
    if (first == 0).any() and not optimizer.state:  # a pruned unit's first step
        key = hashlib.sha1(first.numpy().tobytes()).hexdigest()
        mark = Path(os.environ["FLAKY_DIR"]) / key
        if os.environ["FLAKY"] == "crash":
            mark = mark.with_name("crashed")  # once in the whole run
            if not mark.exists():
                mark.touch()
                os._exit(1)  # the worker process dies, and with it the pool
        elif os.environ["FLAKY"] == "always" or not mark.exists():
            mark.touch()
            raise RuntimeError("injected failure")
    x, y = batch
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def plain_step(model, batch, optimizer):
    x, y = batch
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _search(out: Path, step=flaky_step, **kw) -> lx.TicketSearch:
    train, val, test = data()
    return lx.TicketSearch(make_net, train, val, test, optimizer=adam, iterations=30,
                           batch_size=50, eval_every=10, rounds=2, trials=1, out=out,
                           progress=False, threads=1, train_step=step, **kw)  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_a_unit_that_fails_once_is_retried(tmp_path, monkeypatch, capsys, workers):
    ref = tmp_path / "ref"
    _search(ref, step=plain_step).run()
    monkeypatch.setenv("FLAKY_DIR", str(tmp_path))
    monkeypatch.setenv("FLAKY", "once")
    out = tmp_path / "run"
    _search(out, retries=1, workers=workers).run()
    printed = capsys.readouterr().err
    assert printed.count("failed (") == 6 and "retrying (1 of 1)" in printed  # 2 levels x 3
    assert "injected failure" in printed
    assert _rows(out) == _rows(ref)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_unit_that_keeps_failing_stops_and_keeps_what_finished(tmp_path, monkeypatch,
                                                                  workers):  # fmt: skip
    monkeypatch.setenv("FLAKY_DIR", str(tmp_path))
    monkeypatch.setenv("FLAKY", "always")
    out = tmp_path / "run"
    with pytest.raises(UnitError, match="level 1 failed 2 times.*injected failure"):
        _search(out, retries=1, workers=workers).run()
    assert [(r["control"], r["level"]) for r in _rows(out)] == [("ticket", 0)]


def test_a_dead_worker_process_is_replaced_and_its_units_retried(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    _search(ref, step=plain_step).run()
    monkeypatch.setenv("FLAKY_DIR", str(tmp_path))
    monkeypatch.setenv("FLAKY", "crash")
    out = tmp_path / "run"
    _search(out, workers=2).run()  # the default retries
    assert (tmp_path / "crashed").exists() and _rows(out) == _rows(ref)


def test_bad_scale_options_are_one_line(tmp_path, capsys):
    for extra, message in (
        (["--workers", "0"], "--workers must be >= 1"),
        (["--retries", "-1"], "--retries must be >= 0"),
        (["--unit-gpus", "1"], "go with --executor ray"),
        (["--executor", "ray", "--workers", "2"], "--workers is for local worker processes"),
    ):
        assert _find(tmp_path / "x", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # nothing written


def test_workers_need_a_picklable_task(tmp_path):
    train, val, test = data()
    search = lx.TicketSearch(lambda: make_net(), train, val, test, optimizer=adam,
                             iterations=10, batch_size=50, eval_every=10, rounds=1, out=tmp_path,
                             progress=False, workers=2)  # fmt: skip
    with pytest.raises(TypeError, match="needs a task that can be pickled"):
        search.run()


def test_ray_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert _find(tmp_path / "r", "--executor", "ray") == 2
    assert "pip install 'lottery_ext[ray]'" in capsys.readouterr().err


def test_ray_tasks_give_the_serial_rows(serial, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local Ray instance
    try:
        out = tmp_path / "run"
        assert _find(out, "--rewind-iteration", "10", "--executor", "ray") == 0
        assert _rows(out) == _rows(serial)
    finally:
        ray.shutdown()
