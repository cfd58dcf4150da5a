"""The run directory of ``lottery-ext find``: its files, atomic writes, and the repair of
what a kill left behind.

  config.json       every setting + library/torch versions (a rerun must match to resume),
                    and the data's input shape and class count (to rebuild the model)
  results.jsonl     one object per (trial, control, level): the figures of the paper
  curves.jsonl      per-eval validation/test curves of each (trial, control, level)
  state/trial{t}_theta.pt   {"theta0": θ0, "theta_k": θk or None} (Snapshot state dicts)
  state/trial{t}_masks{L}.pt  name -> bool mask of trial t's ticket at level L >= 1
  state/unit.pt     the unit in progress: model, optimizer, data order, history (resume)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from .. import __version__
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


def load_checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


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


class RunDir:
    """The run directory: config identity, the append-only results, checkpoints."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state = self.path / "state"
        self.results = self.path / "results.jsonl"
        self.curves = self.path / "curves.jsonl"

    def open(self, cfg: RunConfig, data: dict | None = None) -> None:
        """Create the directory, or check that it holds a run of the same configuration.
        `data` (input_shape, num_classes) is recorded beside the configuration so that an
        exported ticket can rebuild its model."""
        cfg_path = self.path / "config.json"
        if not cfg_path.exists() and self.results.exists() and self.results.stat().st_size:
            raise ValueError(
                f"{self.path} holds results.jsonl but no config.json, so nothing says which "
                "configuration they belong to: start a new run with another --out (or restore "
                "the run's config.json to resume it)"
            )
        self.state.mkdir(parents=True, exist_ok=True)
        self._clean_temp_files()
        ours = cfg.to_dict()
        if cfg_path.exists():
            theirs = self._read_config(cfg_path)
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if diff:
                detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:6])
                raise ValueError(
                    f"{self.path} holds a run with a different configuration ({detail}); "
                    "rerun with the same settings to resume it, or choose another --out"
                )
        else:
            meta = {
                "config": ours,
                "lottery_ext": __version__,
                "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if data is not None:
                meta["data"] = data
            atomic_write_bytes(cfg_path, (json.dumps(meta, indent=2) + "\n").encode())
        self._repair()

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
        return meta["config"]

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
        for path, row in ((self.curves, curve), (self.results, result)):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


def unit_key(row: dict) -> tuple:
    return (row["trial"], row["control"], row["level"])


def default_out_dir(cfg: RunConfig) -> Path:
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"{cfg.preset}-{digest}"
