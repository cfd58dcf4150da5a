"""A run directory that cannot lie (first part): damaged or foreign files get one clear line
that names the file and what to do; repairs are announced; crafted data files cannot run
code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lottery_ext.cli import main
from lottery_ext.experiments.data import _read_cifar_batch
from lottery_ext.experiments.rundir import RunDir, config_hash, load_checkpoint, read_checkpoint

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


# -- every file resume depends on names what it belongs to, and carries a checksum -----------


def _rows(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(ln).items() if k != "seconds"}
        for ln in path.read_text().splitlines()
    ]


UNIT = "unit_t0_ticket_L1.pt"


def _killed_in_last_unit(out: Path, monkeypatch, *extra: str) -> None:
    """A run killed after its last unit trained but before its row landed: its checkpoint
    (state/unit_t0_ticket_L1.pt) is at iteration 10."""
    orig = RunDir.append
    calls = []

    def append(self, result, curve):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        orig(self, result, curve)

    monkeypatch.setattr(RunDir, "append", append)
    assert _find(out, *extra) == 130
    monkeypatch.setattr(RunDir, "append", orig)
    assert load_checkpoint(out / "state" / UNIT)["iteration"] == 10


def _flip_byte(path: Path, at: int = -100) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_rows_and_checkpoints_carry_the_config_hash(run):
    meta = json.loads((run / "config.json").read_text())
    h = meta["config_hash"]
    assert h == config_hash(meta["config"])
    for name in ("results.jsonl", "curves.jsonl"):
        assert {r["config_hash"] for r in _rows(run / name)} == {h}
    header, masks = read_checkpoint(run / "state" / "trial0_masks1.pt")
    assert header["kind"] == "masks" and header["config"] == h
    assert (header["trial"], header["level"]) == (0, 1) and masks


@pytest.mark.parametrize("where", ["unit", "foreign_unit"])
def test_damaged_or_foreign_unit_checkpoint_is_set_aside_and_retrained(
    run, tmp_path, monkeypatch, capsys, where
):
    out = tmp_path / "killed"
    _killed_in_last_unit(out, monkeypatch)
    ckpt = out / "state" / UNIT
    if where == "unit":
        _flip_byte(ckpt)
    else:  # the same unit's checkpoint from a run of another configuration
        other = tmp_path / "other"
        _killed_in_last_unit(other, monkeypatch, "--lr", "0.05")
        ckpt.write_bytes((other / "state" / UNIT).read_bytes())
    capsys.readouterr()
    assert _find(out) == 0
    err = capsys.readouterr().err
    assert UNIT in err and "set aside" in err and "Traceback" not in err
    assert ("checksum" in err) if where == "unit" else ("belongs to unit of config" in err)
    assert (out / "state" / (UNIT + ".rejected")).exists()  # kept, not deleted
    assert _rows(out / "results.jsonl") == _rows(run / "results.jsonl")  # retrained, same


def test_unit_checkpoint_resumes_when_intact(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "killed"
    _killed_in_last_unit(out, monkeypatch)
    capsys.readouterr()
    assert _find(out) == 0
    assert "level 1 from iteration 10" in capsys.readouterr().out
    assert _rows(out / "results.jsonl") == _rows(run / "results.jsonl")


def _keep_units(run: Path, n: int) -> None:
    """Forget all but the first `n` finished units (their files stay)."""
    for name in ("results.jsonl", "curves.jsonl"):
        lines = (run / name).read_text().splitlines()
        (run / name).write_text("".join(ln + "\n" for ln in lines[:n]))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "checksum does not match"),
        ("truncate", "truncated"),
        ("garbage", "not a lottery_ext checkpoint"),
        ("header", "header is unreadable"),
        ("other_level", "belongs to masks of config"),
        ("other_run", "belongs to masks of config"),
        ("missing", "missing"),
    ],
)
def test_damaged_masks_are_refused_with_one_line(run, tmp_path, capsys, damage, message):
    # a run whose level 2 is still to train needs the level-2 masks
    assert _find(out := tmp_path / "two", "--rounds", "2") == 0
    _keep_units(out, 2)
    masks = out / "state" / "trial0_masks2.pt"
    if damage == "flip":
        _flip_byte(masks)
    elif damage == "truncate":
        masks.write_bytes(masks.read_bytes()[:-50])
    elif damage == "garbage":
        masks.write_bytes(os.urandom(300))
    elif damage == "header":
        _flip_byte(masks, at=40)
    elif damage == "other_level":
        masks.write_bytes((out / "state" / "trial0_masks1.pt").read_bytes())
    elif damage == "other_run":
        masks.write_bytes((run / "state" / "trial0_masks1.pt").read_bytes())
    else:
        masks.unlink()
    capsys.readouterr()
    assert _find(out, "--rounds", "2") == 2
    err = capsys.readouterr().err
    assert "trial0_masks2.pt" in err and message in err and "restore it" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 2  # nothing trained


def test_rows_of_another_configuration_are_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert _find(other, "--lr", "0.05") == 0
    _keep_units(run, 1)
    foreign = (other / "results.jsonl").read_text().splitlines()[1]
    with open(run / "results.jsonl", "a") as f:
        f.write(foreign + "\n")
    capsys.readouterr()
    assert _find(run) == 2
    err = capsys.readouterr().err
    assert "results.jsonl: line 2 belongs to configuration" in err and "--out" in err
    assert "Traceback" not in err


def test_lost_config_is_adopted_only_when_the_hashes_agree(run, capsys):
    before = (run / "config.json").read_text()
    (run / "config.json").unlink()
    _keep_units(run, 1)
    assert _find(run) == 2 and "--adopt" in capsys.readouterr().err
    assert _find(run, "--lr", "0.05", "--adopt") == 2  # another configuration: refused
    assert "line 1 belongs to configuration" in capsys.readouterr().err
    assert not (run / "config.json").exists()  # nothing written
    assert _find(run, "--adopt") == 0
    assert "adopted the existing results" in capsys.readouterr().err
    meta, old = json.loads((run / "config.json").read_text()), json.loads(before)
    assert meta["config"] == old["config"] and meta["config_hash"] == old["config_hash"]
    assert len(_rows(run / "results.jsonl")) == 2


def test_hand_edited_config_is_refused(run, capsys):
    meta = json.loads((run / "config.json").read_text())
    meta["config"]["lr"] = 0.05  # made to match a new command, but the rows are the old lr's
    (run / "config.json").write_text(json.dumps(meta))
    assert _find(run, "--lr", "0.05") == 2
    err = capsys.readouterr().err
    assert "config.json: its configuration was edited" in err and "Traceback" not in err


def test_export_checks_the_files_it_reads(run, tmp_path, capsys):
    assert main(["export", str(run), "--trial", "0", "--level", "1",
                 "--out", str(tmp_path / "ok.pt")]) == 0  # fmt: skip
    _flip_byte(run / "state" / "trial0_masks1.pt")
    capsys.readouterr()
    assert main(["export", str(run), "--trial", "0", "--level", "1",
                 "--out", str(tmp_path / "bad.pt")]) != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "trial0_masks1.pt" in err and "checksum" in err and not (tmp_path / "bad.pt").exists()


def test_checkpoints_without_a_header_are_read_with_a_notice(run, tmp_path, capsys):
    """Files of a lottery_ext that wrote bare torch.save zips still resume."""
    assert _find(out := tmp_path / "two", "--rounds", "2") == 0
    ref = _rows(out / "results.jsonl")
    _keep_units(out, 2)
    masks = out / "state" / "trial0_masks2.pt"
    torch.save(load_checkpoint(masks), masks)
    capsys.readouterr()
    assert _find(out, "--rounds", "2") == 0
    assert "trial0_masks2.pt: written without a checksum" in capsys.readouterr().err
    assert _rows(out / "results.jsonl") == ref


@pytest.mark.parametrize("errno_, text", [(13, "Permission denied"), (28, "No space left")])
def test_read_only_directory_or_full_disk_is_one_line(run, monkeypatch, capsys, errno_, text):
    """A write that the file system refuses (EACCES: a read-only run directory; ENOSPC: a
    full disk): one line, and the finished units are kept. (Simulated: the tests run as
    root, whom chmod does not stop.)"""
    _keep_units(run, 1)
    before = (run / "results.jsonl").read_bytes()

    def refused(self, result, curve):
        raise OSError(errno_, os.strerror(errno_), str(self.results))

    monkeypatch.setattr(RunDir, "append", refused)
    capsys.readouterr()
    assert _find(run) == 2
    err = capsys.readouterr().err
    assert text in err and "results.jsonl" in err and "rerun the same command" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (run / "results.jsonl").read_bytes() == before
