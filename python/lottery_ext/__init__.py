"""lottery_ext: find lottery tickets (Frankle & Carbin, ICLR 2019) on a fused native core.

Public API (``__all__``):

Masked optimizers (pruned weights and their state stay exactly zero)
    MaskedSGD            -- torch.optim.SGD with masks, one fused native step
    MaskedAdam           -- torch.optim.Adam with masks
    MaskedAdamW          -- torch.optim.AdamW with masks

Pruning
    MagnitudePruner      -- iterative magnitude pruning as in Frankle & Carbin (2019)
    prune_smallest       -- new masks removing exactly `count` smallest magnitudes
    prune_smallest_each  -- ``prune_smallest`` per tensor (layer-wise), batched
    kth_smallest_magnitude -- exact k-th smallest |w| over a list of tensors
    prunable             -- what ``MagnitudePruner(model, **recipe)`` would prune, and why
    format_prunable      -- a table of ``prunable()`` rows

Rewinding
    Snapshot             -- an immutable copy of a model's parameters and buffers
    snapshot             -- take a ``Snapshot`` of a model
    rewind               -- weights back to a snapshot under masks, optimizer restarted
    reinitialize         -- fresh initialization under masks (the random-reinit control)
    restart_scheduler    -- an LR scheduler back to its start, in place

Interoperability with torch.nn.utils.prune
    from_torch_prune     -- take torch's pruning off a model and return its masks
    to_torch_prune       -- prune a model with torch.nn.utils.prune from masks

Tickets and searches
    Ticket               -- a sparse subnetwork: masks, rewind weights and its record
    load_ticket          -- read a ticket file (weights only: it cannot run code)
    TicketSearch         -- find lottery tickets of your own model on your own data

Ops and build
    ops                  -- the validated ops (also ``torch.ops.lottery_ext.*``)
    build_info           -- how this install was built and what it will run on
    __version__          -- the package version
"""

import torch as _torch

from . import _native
from . import _ops as ops
from ._version import __version__
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
        "threads": _torch.get_num_threads(),
        "torch": _torch.__version__,
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
