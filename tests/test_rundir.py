"""A run directory that cannot lie (first part): damaged or foreign files get one clear line
that names the file and what to do; repairs are announced; crafted data files cannot run
code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lottery_ext.cli import main
from lottery_ext.experiments.data import _read_cifar_batch

TINY = ["--rounds", "1", "--trials", "1", "--iterations", "20", "--eval-every", "10",
        "--checkpoint-every", "10", "--threads", "1", "--no-progress", "--no-plots",
        "--controls", "none"]  # fmt: skip


def _find(out: Path, *extra: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["find", "--out", str(out), *TINY, *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    assert _find(out) == 0
    return out


def test_results_without_config_are_refused(run, capsys):
    (run / "config.json").unlink()
    assert _find(run, "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "results.jsonl but no config.json" in err and "--out" in err
    assert not (run / "config.json").exists()  # nothing adopted silently


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"created": "x"}'])
def test_broken_config_is_one_line(run, capsys, text):
    (run / "config.json").write_text(text)
    assert _find(run) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_leftover_temp_files_are_removed_and_said(run, capsys):
    for leftover in (run / ".results.jsonl.tmp123", run / "state" / ".unit.pt.tmp456"):
        leftover.write_bytes(b"half a write")
    assert _find(run) == 0
    err = capsys.readouterr().err
    assert ".results.jsonl.tmp123" in err and ".unit.pt.tmp456" in err
    assert not list(run.glob(".*.tmp*")) and not list((run / "state").glob(".*.tmp*"))


def test_torn_last_line_is_dropped_with_a_notice(run, capsys):
    raw = (run / "results.jsonl").read_bytes()
    (run / "results.jsonl").write_bytes(raw[:-20])  # the last row cut short by a kill
    assert _find(run) == 0
    assert "dropped an incomplete last line" in capsys.readouterr().err
    assert (run / "results.jsonl").read_bytes().count(b"\n") == raw.count(b"\n")


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_batches_are_read_without_running_code(tmp_path):
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2], b"filenames": [b"a", b"b"]}
    for protocol in (2, 4):
        path = tmp_path / f"good{protocol}"
        path.write_bytes(pickle.dumps(good, protocol=protocol))
        data, labels = _read_cifar_batch(path)
        assert data.shape == (2, 3, 32, 32) and labels.tolist() == [1, 2]
    evil = tmp_path / "evil"
    evil.write_bytes(pickle.dumps({b"data": _Boom(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="refused to load posix.system|refused to load os"):
        _read_cifar_batch(evil)


def test_missing_theta_k_is_refused_not_replaced_by_theta0(tmp_path, capsys):
    out = tmp_path / "late"
    assert _find(out, "--rewind-iteration", "5") == 0
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(rows[0] + "\n")  # level 1 still to train
    (out / "curves.jsonl").write_text((out / "curves.jsonl").read_text().splitlines()[0] + "\n")
    (out / "state" / "trial0_theta.pt").unlink()  # θ0 and θk lost
    assert _find(out, "--rewind-iteration", "5") == 2
    err = capsys.readouterr().err
    assert "θk (iteration 5) of trial 0 is missing" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 1  # nothing trained
