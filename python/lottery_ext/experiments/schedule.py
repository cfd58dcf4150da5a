"""The search as an explicit list of units ``(trial, control, level)`` and what each needs:
the ticket at level L needs the ticket at L-1 (its trained weights give L's mask); a control
at L needs the ticket at L (its mask); late rewinding needs θk, captured while training the
ticket at level 0. The order of ``units`` is a valid serial order."""

from __future__ import annotations

from typing import NamedTuple

from .controls import CONTROLS
from .presets import RunConfig


class Unit(NamedTuple):
    trial: int
    control: str
    level: int


def units(cfg: RunConfig) -> list[Unit]:
    out = []
    for t in range(cfg.trials):
        for level in range(cfg.rounds + 1):
            out.append(Unit(t, "ticket", level))
            if level > 0:
                out += [Unit(t, c, level) for c in CONTROLS[1:] if c in cfg.controls]
    return out


def needs(unit: Unit) -> list[Unit]:
    """The units whose outputs `unit` uses directly (each earlier in ``units(cfg)``; θk,
    captured by the level-0 ticket, comes along transitively)."""
    trial, control, level = unit
    if control != "ticket":
        return [Unit(trial, "ticket", level)]
    return [Unit(trial, "ticket", level - 1)] if level > 0 else []
