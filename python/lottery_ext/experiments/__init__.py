"""The IMP experiment runner: presets of the paper, data loaders, models, reports."""

from .presets import DEFAULT_PRESET, PRESETS, Preset, RunConfig
from .report import report
from .runner import Experiment, RunDir

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "RunConfig", "Experiment", "RunDir", "report"]
