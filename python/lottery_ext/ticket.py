"""A lottery ticket as an artefact: its masks, its rewind point (θ0 or θk), the pruning recipe
that found it and where it came from (run configuration, trial, level, figures).

Saved as one ``torch.save`` file of plain tensors, numbers, strings, lists and dicts, so it
loads with ``torch.load(weights_only=True)``: nothing in a ticket file can run code. (One file
rather than safetensors + JSON: masks, snapshot and provenance stay together and atomic, and
torch is already a dependency.)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .pruning.rewind import Snapshot, rewind

Tensor = torch.Tensor
FORMAT = "lottery_ext.ticket/1"


class Ticket:
    """A sparse subnetwork: ``masks`` (parameter name -> bool, True = kept), the ``rewind``
    snapshot its survivors start from, the ``recipe`` (pruning options) and ``provenance``
    (run configuration, trial, level, figures; JSON-compatible)."""

    def __init__(
        self,
        masks: Mapping[str, Tensor],
        rewind_point: Snapshot,
        recipe: Mapping | None = None,
        provenance: Mapping | None = None,
    ) -> None:
        if not isinstance(rewind_point, Snapshot):
            raise TypeError(f"rewind_point must be a Snapshot, got {type(rewind_point).__name__}")
        self.masks = {}
        for name, m in masks.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise TypeError(f"mask {name!r}: expected a bool tensor")
            if name not in rewind_point.param_names:
                raise ValueError(f"mask {name!r} names no parameter of the rewind snapshot")
            if m.shape != rewind_point[name].shape:
                raise ValueError(
                    f"mask {name!r}: shape {tuple(m.shape)} but the parameter's is "
                    f"{tuple(rewind_point[name].shape)}"
                )
            self.masks[name] = m.detach().to("cpu", copy=True)
        self.rewind_point = rewind_point
        self.recipe = json.loads(json.dumps(dict(recipe or {})))  # JSON-compatible, a copy
        self.factory: Callable[[], nn.Module] | None = None  # builds the model (not saved)
        self.provenance = json.loads(json.dumps(dict(provenance or {})))

    # -- figures ---------------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        """The rewind iteration: 0 for θ0, k for late rewinding to θk."""
        return self.rewind_point.iteration

    def density(self) -> float:
        """Fraction of the masked tensors' weights that are kept."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / total if total else 1.0

    def __repr__(self) -> str:
        where = {k: self.provenance[k] for k in ("trial", "level") if k in self.provenance}
        return (
            f"Ticket({len(self.masks)} masked tensors, {100 * self.density():.2f}% kept, "
            f"rewind to iteration {self.iteration}{', ' if where else ''}"
            f"{', '.join(f'{k}={v}' for k, v in where.items())})"
        )

    # -- use ------------------------------------------------------------------------------------

    def check(self, model: nn.Module) -> None:
        """Refuse a model this ticket does not fit, saying exactly what differs."""
        params = dict(model.named_parameters())
        tensors = {**params, **dict(model.named_buffers())}
        problems = []
        missing = sorted(set(self.rewind_point) - set(tensors))
        unexpected = sorted(set(tensors) - set(self.rewind_point))
        if missing:
            problems.append(f"the model has no {_few(missing)}")
        if unexpected:
            problems.append(f"the ticket has no value for the model's {_few(unexpected)}")
        for name in sorted(set(tensors) & set(self.rewind_point)):
            want, got = self.rewind_point[name].shape, tensors[name].shape
            if want != got:
                problems.append(f"{name}: ticket {tuple(want)} vs model {tuple(got)}")
        if problems:
            raise ValueError("the ticket does not fit this model: " + "; ".join(problems[:8]))

    def apply(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler=None
    ) -> nn.Module:
        """Reset `model` to the ticket: survivors to the rewind point, pruned weights 0,
        buffers restored (``lottery_ext.rewind``); a lottery_ext `optimizer` gets the masks
        and a state reset. Checks names and shapes first."""
        self.check(model)
        device = next(model.parameters()).device
        masks = {n: m.to(device) for n, m in self.masks.items()}
        snap = self.rewind_point
        if any(t.device != device for t in (snap[n] for n in snap)):
            snap = Snapshot({n: snap[n].to(device) for n in snap}, set(snap.param_names),
                            snap.iteration)  # fmt: skip
        rewind(model, snap, masks, optimizer, scheduler)
        return model

    def build(self, factory: Callable[[], nn.Module] | None = None) -> nn.Module:
        """A fresh model with the ticket applied, ready to train (with a masked optimizer:
        ``lottery_ext.MaskedSGD(model.parameters(), ..., masks=ticket.masks)``). `factory`
        builds the architecture; tickets exported from a preset run know theirs."""
        if factory is None:
            factory = self.factory or self._preset_factory()
        model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory must return an nn.Module, got {type(model).__name__}")
        import warnings

        with warnings.catch_warnings():  # the caller builds the masked optimizer next
            warnings.filterwarnings("ignore", message=".*nothing keeps the pruned weights")
            return self.apply(model)

    def _preset_factory(self) -> Callable[[], nn.Module]:
        spec = self.provenance.get("model")
        if not spec:
            raise ValueError(
                "this ticket does not say how to build its model: pass build(factory=...)"
            )
        from .experiments.models import build_model

        def factory() -> nn.Module:
            return build_model(spec["name"], input_shape=tuple(spec["input_shape"]),
                               num_classes=spec["num_classes"], dropout=spec.get("dropout", 0.0),
                               hidden=spec.get("hidden"))  # fmt: skip

        return factory

    # -- files ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "masks": dict(self.masks),
            "rewind": self.rewind_point.state_dict(),
            "recipe": self.recipe,
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ticket atomically (a temp file renamed over `path`)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(self.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def load_ticket(path: str | os.PathLike) -> Ticket:
    """Read a ticket file (``torch.load(weights_only=True)``: it cannot run code)."""
    path = Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated, foreign or not a torch file at all
        raise ValueError(
            f"{path}: not a readable ticket file ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path}: not a lottery_ext ticket (format {got!r}, expected {FORMAT!r})")
    try:
        return Ticket(sd["masks"], Snapshot.from_state_dict(sd["rewind"]), sd.get("recipe"),
                      sd.get("provenance"))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: damaged ticket ({type(exc).__name__}: {exc})") from exc


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


# -- tickets of a run directory (lottery-ext find) ----------------------------------------------


def _run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.json (is it a lottery-ext find run?)")
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: not a lottery-ext run configuration")
    return meta


def export_ticket(run_dir: str | os.PathLike, trial: int, level: int) -> Ticket:
    """The ticket of `trial` at `level` of a ``lottery-ext find`` run: the level's masks, the
    run's rewind point (θ0, or θk with ``--rewind-iteration k``), the recipe and the level's
    figures from results.jsonl."""
    from ._version import __version__
    from .experiments.rundir import config_hash, load_checkpoint, read_jsonl

    run_dir = Path(run_dir)
    meta = _run_config(run_dir)
    cfg = meta["config"]
    if not 0 <= level <= cfg["rounds"]:
        raise ValueError(f"level must be in [0, {cfg['rounds']}] for this run, got {level}")
    if not 0 <= trial < cfg["trials"]:
        raise ValueError(f"trial must be in [0, {cfg['trials'] - 1}] for this run, got {trial}")
    key = (trial, "ticket", level)
    rows = [
        r
        for r in read_jsonl(run_dir / "results.jsonl")
        if (r.get("trial"), r.get("control"), r.get("level")) == key
    ]
    if not rows:
        raise ValueError(f"{run_dir}: trial {trial} level {level} has not finished yet")
    theta_path = run_dir / "state" / f"trial{trial}_theta.pt"
    if not theta_path.exists():
        raise FileNotFoundError(f"{theta_path}: missing; the ticket's rewind point is lost")
    h = meta.get("config_hash") or config_hash(cfg)  # checksums and identity checked
    theta = load_checkpoint(theta_path, {"kind": "theta", "config": h, "trial": trial})
    late = level > 0 and theta.get("theta_k")
    snap = Snapshot.from_state_dict(theta["theta_k"] if late else theta["theta0"])
    if level == 0:
        masks = {}  # the dense network
    else:
        masks_path = run_dir / "state" / f"trial{trial}_masks{level}.pt"
        if not masks_path.exists():
            raise FileNotFoundError(f"{masks_path}: missing")
        masks = load_checkpoint(
            masks_path, {"kind": "masks", "config": h, "trial": trial, "level": level}
        )
    recipe = {k: cfg.get(k) for k in ("rate", "output_rate", "conv_rate", "scope",
                                      "rewind_iteration")}  # fmt: skip
    provenance = {
        "run": str(run_dir),
        "config": cfg,
        "trial": trial,
        "level": level,
        "figures": rows[-1],
        "exported": time.strftime("%Y-%m-%d %H:%M:%S"),
        "lottery_ext": __version__,
    }
    if "data" in meta:  # what the preset model needs to be rebuilt (ticket.build())
        provenance["model"] = {"name": cfg["model"], "dropout": cfg.get("dropout", 0.0),
                               "hidden": cfg.get("hidden"), **meta["data"]}  # fmt: skip
    return Ticket(masks, snap, recipe, provenance)


def best_level(run_dir: str | os.PathLike, tolerance: float = 0.5) -> tuple[int, int, str]:
    """(trial, level, why): the sparsest level whose ticket's mean test accuracy at early
    stopping (over the run's trials) is within `tolerance` percentage points of the dense
    network's (level 0), and the trial whose ticket scored best there."""
    from .experiments.rundir import read_jsonl

    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number of percentage points, got {tolerance!r}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    run_dir = Path(run_dir)
    _run_config(run_dir)
    rows = [r for r in read_jsonl(run_dir / "results.jsonl") if r.get("control") == "ticket"]
    by_level: dict[int, list[dict]] = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(r)
    if 0 not in by_level:
        raise ValueError(f"{run_dir}: the dense level (0) has not finished yet")

    def mean_acc(level: int) -> float:
        accs = [r["test_accuracy_at_early_stop"] for r in by_level[level]]
        return 100 * sum(accs) / len(accs)

    dense = mean_acc(0)
    fine = [lv for lv in by_level if mean_acc(lv) >= dense - tolerance]
    level = max(fine, key=lambda lv: (-by_level[lv][0]["weights_remaining"], lv))
    best = max(by_level[level], key=lambda r: r["test_accuracy_at_early_stop"])
    why = (
        f"level {level} ({100 * best['weights_remaining']:.1f}% of the weights) is the sparsest "
        f"whose ticket's mean test accuracy at early stopping, {mean_acc(level):.2f}%, is within "
        f"{tolerance:g} points of the dense {dense:.2f}% (levels done: {sorted(by_level)}); "
        f"trial {best['trial']} scored best there "
        f"({100 * best['test_accuracy_at_early_stop']:.2f}%)"
    )
    return best["trial"], level, why
