"""The run directory of ``lottery-ext find``: its files, atomic writes, and the repair of
what a kill left behind.

  config.json       every setting + library/torch versions (a rerun must match to resume),
                    the configuration's hash, and the data's input shape and class count
                    (to rebuild the model)
  results.jsonl     one object per (trial, control, level): the figures of the paper
  curves.jsonl      per-eval validation/test curves of each (trial, control, level)
  state/trial{t}_theta.pt   {"theta0": θ0, "theta_k": θk or None} (Snapshot state dicts)
  state/trial{t}_masks{L}.pt  name -> bool mask of trial t's ticket at level L >= 1
  state/unit_t{t}_{control}_L{L}.pt  a unit in progress: model, optimizer, data order,
                    history (resume); one per unit running (several with --workers)

Nothing here is trusted for what it claims to be. Every results/curves row carries the
configuration's hash. Every checkpoint is one line of magic, one JSON header line naming what
it belongs to (kind, config hash, trial, control, level, iteration) with the payload's SHA-256
and size, then the ``torch.save`` payload (loaded with ``weights_only=True``): flipped bytes, a
truncated file or a file copied from another run, trial or level are detected before use.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import torch

from .._version import __version__
from .presets import RunConfig


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MAGIC = b"lottery_ext checkpoint 1\n"


class CheckpointError(ValueError):
    """A checkpoint that is damaged, truncated, not ours, or not the one asked for."""


def config_hash(cfg: RunConfig | dict) -> str:
    """The identity of a configuration: what every row and checkpoint of its run carries."""
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(obj, path: Path, identity: dict) -> None:
    """`obj` (torch.save-able) under a header naming what it belongs to, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    header = dict(identity, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    atomic_write_bytes(path, MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + data)


def read_checkpoint(path: Path) -> tuple[dict | None, object]:
    """(header, payload) of a checkpoint whose checksum holds. The header is None for a file
    of a lottery_ext that wrote no headers (a bare torch.save zip): it is loaded as it is."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    if raw.startswith(MAGIC):
        end = raw.find(b"\n", len(MAGIC))
        try:
            header = json.loads(raw[len(MAGIC) : end])
            digest, size = header["sha256"], header["bytes"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path}: damaged (its header is unreadable)") from None
        data = raw[end + 1 :]
        if len(data) != size:
            raise CheckpointError(f"{path}: truncated ({len(data)} of {size} bytes)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path}: damaged (its checksum does not match its contents)")
    elif raw.startswith(b"PK"):
        header, data = None, raw
    else:
        raise CheckpointError(f"{path}: not a lottery_ext checkpoint")
    try:
        return header, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a bare zip that is cut short or not torch's
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def _describe(identity: dict) -> str:
    parts = [f"config {identity['config']}"] if "config" in identity else []
    parts += [f"{k} {identity[k]}" for k in ("trial", "control", "level") if k in identity]
    return ", ".join(parts)


def check_identity(path: Path, header: dict | None, expect: dict) -> None:
    """Refuse a checkpoint whose header names another kind, config, trial, control or level
    than `expect` (a header-less file of an older lottery_ext cannot say, and passes)."""
    if header is not None and any(header.get(k) != v for k, v in expect.items()):
        raise CheckpointError(
            f"{path}: belongs to {header.get('kind')} of {_describe(header)}, not to "
            f"{expect.get('kind')} of {_describe(expect)} (copied from another run?)"
        )


def load_checkpoint(path: Path, expect: dict | None = None):
    """The payload of the checkpoint at `path`, checksum checked; with `expect`, its header
    must name the same kind, config, trial, control and level."""
    header, obj = read_checkpoint(path)
    if expect:
        check_identity(path, header, expect)
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file. A torn last line (a write cut short by a kill) is skipped;
    a bad line elsewhere is an error."""
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc})") from exc
    return rows


UNIT_WHERE = ("trial", "control", "level", "iteration")


class RunDir:
    """The run directory: config identity, the append-only results, checkpoints. Every file
    that resume depends on is written and read here, and checked against the run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state = self.path / "state"
        self.results = self.path / "results.jsonl"
        self.curves = self.path / "curves.jsonl"
        self.legacy_unit_path = self.state / "unit.pt"  # before per-unit files
        self.hash: str | None = None  # set by open()
        # torch.distributed: rank 0 writes, the other ranks read what it wrote
        from .. import distributed as D

        self.writer = D.is_writer()

    def open(self, cfg: RunConfig, data: dict | None = None, adopt: bool = False) -> None:
        """Create the directory, or check that it holds a run of the same configuration.
        `data` (input_shape, num_classes) is recorded beside the configuration so that an
        exported ticket can rebuild its model. `adopt`: results without a config.json are
        taken as this configuration's (their rows' config hash must agree)."""
        self.hash = config_hash(cfg)
        if not self.writer:  # torchrun: rank 0 opened and checked it (runner._open)
            return
        cfg_path = self.path / "config.json"
        orphaned = (
            not cfg_path.exists() and self.results.exists() and self.results.stat().st_size > 0
        )
        if orphaned and not adopt:
            raise ValueError(
                f"{self.path} holds results.jsonl but no config.json, so nothing says which "
                "configuration they belong to: start a new run with another --out, restore "
                "the run's config.json, or, if they came from this very command, rerun it with "
                "--adopt (each row's configuration hash is checked)"
            )
        self.state.mkdir(parents=True, exist_ok=True)
        self._clean_temp_files()
        ours = cfg.to_dict()
        if cfg_path.exists():
            meta = self._read_config(cfg_path)
            theirs = meta["config"]
            if meta.get("config_hash", config_hash(theirs)) != config_hash(theirs):
                raise ValueError(
                    f"{cfg_path}: its configuration was edited after the run started (it no "
                    "longer matches its config_hash); restore it, or start a new run with "
                    "another --out"
                )
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if diff:
                detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:6])
                raise ValueError(
                    f"{self.path} holds a run with a different configuration ({detail}); "
                    "rerun with the same settings to resume it, or choose another --out"
                )
        else:
            if orphaned:
                self._check_rows(self.results)  # before anything is written
            meta = {
                "config": ours,
                "config_hash": self.hash,
                "lottery_ext": __version__,
                "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if orphaned:
                meta["adopted"] = "config.json was rewritten by --adopt for existing results"
                print(f"{self.path}: adopted the existing results as this configuration's "
                      f"(config {self.hash})", file=sys.stderr)  # fmt: skip
            if data is not None:
                meta["data"] = data
            atomic_write_bytes(cfg_path, (json.dumps(meta, indent=2) + "\n").encode())
        self._repair()
        for path in (self.results, self.curves):
            self._check_rows(path)

    @staticmethod
    def _read_config(path: Path) -> dict:
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"{path}: not valid JSON ({exc}); restore it, or start a new run with another --out"
            ) from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError(
                f"{path}: not a lottery-ext run configuration (no 'config' object); restore "
                "it, or start a new run with another --out"
            )
        return meta

    def _check_rows(self, path: Path) -> None:
        """Every row must carry this run's config hash (rows of an older lottery_ext carry
        none and pass): results of another configuration are never mixed in."""
        for i, row in enumerate(read_jsonl(path), 1):
            theirs = row.get("config_hash") if isinstance(row, dict) else None
            if not isinstance(row, dict) or not all(
                k in row for k in ("trial", "control", "level")
            ):
                raise ValueError(f"{path}: line {i} is not a result row of lottery-ext")
            if theirs is not None and theirs != self.hash:
                raise ValueError(
                    f"{path}: line {i} belongs to configuration {theirs}, not to this run's "
                    f"{self.hash}: results of different configurations must not be mixed; "
                    "start a new run with another --out"
                )

    def _clean_temp_files(self) -> None:
        """Temp files of writes a kill cut short (atomic writes rename them into place, so
        a leftover one was never the real file): removed, and said so."""
        for folder in (self.path, self.state):
            for tmp in folder.glob(".*.tmp*"):
                tmp.unlink(missing_ok=True)
                print(f"{self.path}: removed {tmp.name}, left by an interrupted write",
                      file=sys.stderr)  # fmt: skip

    def _repair(self) -> None:
        """After a kill: drop a torn last line of results.jsonl, and curves of units whose
        result never landed (curves are written first, results define what is done)."""
        if self.results.exists():
            raw = self.results.read_bytes()
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(self.results, raw[: raw.rfind(b"\n") + 1])
                print(f"{self.results}: dropped an incomplete last line (a write cut short by "
                      "a kill); that unit will be trained again", file=sys.stderr)  # fmt: skip
        done = {unit_key(r) for r in read_jsonl(self.results)}
        if self.curves.exists():
            raw = self.curves.read_bytes()
            lines = [ln for ln in raw.splitlines() if ln.strip()]
            keep = []
            for ln in lines:
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if unit_key(row) in done:
                    keep.append(ln)
            fixed = b"".join(ln + b"\n" for ln in keep)
            if fixed != raw:
                atomic_write_bytes(self.curves, fixed)

    def done(self) -> dict[tuple, dict]:
        return {unit_key(r): r for r in read_jsonl(self.results)}

    def append(self, result: dict, curve: dict) -> None:
        if not self.writer:
            return
        for path, row in ((self.curves, curve), (self.results, result)):
            with open(path, "a") as f:
                f.write(json.dumps(dict(row, config_hash=self.hash)) + "\n")
                f.flush()
                os.fsync(f.fileno())

    # -- checkpoints: each names what it belongs to, and is checked before use ---------------

    def _identity(self, kind: str, **where) -> dict:
        return {"kind": kind, "config": self.hash, **where}

    def _load(self, path: Path, expect: dict):
        header, obj = read_checkpoint(path)
        check_identity(path, header, expect)
        if header is None:
            print(f"{path}: written without a checksum (an older lottery_ext); used as it is",
                  file=sys.stderr)  # fmt: skip
        return obj

    def theta_path(self, trial: int) -> Path:
        return self.state / f"trial{trial}_theta.pt"

    def masks_path(self, trial: int, level: int) -> Path:
        return self.state / f"trial{trial}_masks{level}.pt"

    def save_theta(self, trial: int, theta0: dict, theta_k: dict | None) -> None:
        if not self.writer:
            return
        save_checkpoint({"theta0": theta0, "theta_k": theta_k}, self.theta_path(trial),
                        self._identity("theta", trial=trial))  # fmt: skip

    def load_theta(self, trial: int) -> dict | None:
        """{"theta0", "theta_k"} of `trial`, or None when it was never written."""
        path = self.theta_path(trial)
        if not path.exists():
            return None
        return self._needed(path, self._identity("theta", trial=trial))

    def save_masks(self, trial: int, level: int, masks: dict) -> None:
        if not self.writer:
            return
        save_checkpoint({n: m.cpu() for n, m in masks.items()}, self.masks_path(trial, level),
                        self._identity("masks", trial=trial, level=level))  # fmt: skip

    def load_masks(self, trial: int, level: int) -> dict:
        path = self.masks_path(trial, level)
        return self._needed(path, self._identity("masks", trial=trial, level=level))

    def _needed(self, path: Path, expect: dict):
        """A file the remaining units cannot do without: refused, never replaced."""
        try:
            return self._load(path, expect)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}; the remaining units need it: restore it, or start a new run with "
                "another --out"
            ) from None

    def unit_path(self, unit) -> Path:
        trial, control, level = unit
        return self.state / f"unit_t{trial}_{control}_L{level}.pt"

    def save_unit(self, sd: dict) -> None:
        if not self.writer:
            return
        trial, control, level = sd["unit"]
        where = dict(trial=trial, control=control, level=level, iteration=int(sd["iteration"]))
        save_checkpoint(sd, self.unit_path(sd["unit"]), self._identity("unit", **where))

    def drop_unit(self, unit) -> None:
        """A finished unit's checkpoint is no longer needed."""
        if not self.writer:
            return
        self.unit_path(unit).unlink(missing_ok=True)
        legacy = self.legacy_unit_path
        if legacy.exists():
            try:
                if tuple(read_checkpoint(legacy)[1]["unit"]) == tuple(unit):
                    legacy.unlink()
            except (CheckpointError, KeyError, TypeError):
                pass

    def drop_stale_units(self, done) -> None:
        """Checkpoints of units whose row landed (a kill between the two): removed."""
        if not self.writer:
            return
        for path in self.state.glob("unit_t*_L*.pt"):
            if any(path == self.unit_path(u) for u in done):
                path.unlink()

    def load_unit(self, unit) -> dict | None:
        """The checkpoint of `unit` in progress, or None. One that is damaged or belongs to
        another run or unit is set aside (``.rejected``) and said so: its unit is trained
        again from the start, which loses time, never correctness."""
        for path in (self.unit_path(unit), self.legacy_unit_path):
            if not path.exists():
                continue
            try:
                header, sd = read_checkpoint(path)
                if path == self.legacy_unit_path:
                    if tuple(sd["unit"]) != tuple(unit):
                        continue  # another unit's, from before per-unit files
                    expect = self._identity("unit")
                else:
                    expect = self._identity("unit", trial=unit[0], control=unit[1], level=unit[2])
                check_identity(path, header, expect)
                where = [*sd["unit"], int(sd["iteration"])]
                if header is not None and where != [header.get(k) for k in UNIT_WHERE]:
                    raise CheckpointError(f"{path}: its header and contents disagree")
                if tuple(sd["unit"]) != tuple(unit):
                    raise CheckpointError(f"{path}: holds unit {sd['unit']}, not {list(unit)}")
            except (CheckpointError, KeyError, TypeError, ValueError) as exc:
                if not self.writer:  # rank 0 sets it aside and says so
                    continue
                aside = path.with_name(path.name + ".rejected")
                os.replace(path, aside)
                print(f"{exc}; set aside as {aside}: that unit is trained again from the start",
                      file=sys.stderr)  # fmt: skip
                continue
            return sd
        return None


def unit_key(row: dict) -> tuple:
    return (row["trial"], row["control"], row["level"])


def default_out_dir(cfg: RunConfig) -> Path:
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"{cfg.preset}-{digest}"
