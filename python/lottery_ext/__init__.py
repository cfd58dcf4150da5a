"""lottery_ext: find lottery tickets (Frankle & Carbin, ICLR 2019) on a fused native core.

Public API: the masked optimizers (``MaskedSGD``, ``MaskedAdam``, ``MaskedAdamW``), the
validated ops in ``lottery_ext.ops`` (also registered as ``torch.ops.lottery_ext.*``) and
``build_info()``.
"""

from __future__ import annotations

import torch

from . import _native
from . import _ops as ops
from .optim import MaskedAdam, MaskedAdamW, MaskedSGD
from .pruning import (
    MagnitudePruner,
    Snapshot,
    format_prunable,
    from_torch_prune,
    kth_smallest_magnitude,
    prunable,
    prune_smallest,
    prune_smallest_each,
    reinitialize,
    restart_scheduler,
    rewind,
    snapshot,
    to_torch_prune,
)

__version__ = "0.1.0"

from .search import TicketSearch  # noqa: E402
from .ticket import Ticket, load_ticket  # noqa: E402


def build_info() -> dict:
    """How this install was built and what it will run on.

    Keys: ``native`` (compiled core loaded), ``cuda`` (CUDA kernels compiled in),
    ``cuda_version``, ``compiler``, ``threads`` (CPU threads the kernels use, i.e.
    ``torch.get_num_threads()``), plus ``cpu_flags``, ``cuda_architectures``, ``native_error``.
    """
    info = {
        "version": __version__,
        "native": _native.core is not None,
        "cuda": False,
        "cuda_version": None,
        "compiler": None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_error": _native.load_error,
    }
    if _native.core is not None:
        info.update(_native.core.build_config())
    return info


__all__ = [
    "MaskedSGD",
    "MaskedAdam",
    "MaskedAdamW",
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
    "Ticket",
    "TicketSearch",
    "load_ticket",
    "build_info",
    "ops",
    "__version__",
]
