"""Magnitude thresholds, the pruner, and rewinding."""

from .interop import from_torch_prune, to_torch_prune
from .pruner import MagnitudePruner, format_prunable, prunable
from .rewind import Snapshot, reinitialize, restart_scheduler, rewind, snapshot
from .threshold import kth_smallest_magnitude, prune_smallest, prune_smallest_each

__all__ = [
    "MagnitudePruner",
    "Snapshot",
    "kth_smallest_magnitude",
    "prune_smallest",
    "prune_smallest_each",
    "reinitialize",
    "restart_scheduler",
    "rewind",
    "snapshot",
    "from_torch_prune",
    "to_torch_prune",
    "prunable",
    "format_prunable",
]
