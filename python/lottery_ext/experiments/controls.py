"""The controls of the paper, as a registry: what each trains at a level (its mask) and how
its network starts (its initialisation). ``ticket``: the pruned mask, survivors rewound to θ0
(or θk); ``reinit``: the same mask, a fresh random initialisation; ``random_prune``: a random
mask with the ticket's per-layer counts, rewound like the ticket."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..pruning.pruner import random_like
from ..pruning.rewind import reinitialize, rewind
from .presets import RunConfig
from .recipe import seed_for

Masks = dict[str, torch.Tensor]


def random_masks(cfg: RunConfig, ticket_masks: Masks, trial: int, level: int) -> Masks:
    """The random-mask control: each tensor keeps as many weights as the ticket, at random
    (``MagnitudePruner.random_masks`` draws the same way: one semantic)."""
    gen = torch.Generator().manual_seed(seed_for(cfg, trial, "random_prune", level))
    return random_like(ticket_masks, gen)


def _same_masks(cfg: RunConfig, masks: Masks, trial: int, level: int) -> Masks:
    return masks


def _rewound(cfg, task, model, masks, start, optimizer, trial, level) -> None:
    rewind(model, start, masks, optimizer)


def _reinitialised(cfg, task, model, masks, start, optimizer, trial, level) -> None:
    reinitialize(model, masks, seed=seed_for(cfg, trial, "reinit", level),
                 init_fn=task.reinit_fn, optimizer=optimizer)  # fmt: skip


@dataclass(frozen=True)
class Control:
    """``masks(cfg, ticket_masks, trial, level)``: the mask trained; ``start(cfg, task,
    model, masks, snapshot, optimizer, trial, level)``: puts the model at its starting point
    and hands the masks to the optimizer; ``late_rewind``: starts from θk under late
    rewinding."""

    name: str
    masks: Callable[[RunConfig, Masks, int, int], Masks]
    start: Callable[..., None]
    late_rewind: bool


REGISTRY = {
    "ticket": Control("ticket", _same_masks, _rewound, late_rewind=True),
    "reinit": Control("reinit", _same_masks, _reinitialised, late_rewind=False),
    "random_prune": Control("random_prune", random_masks, _rewound, late_rewind=True),
}
CONTROLS = tuple(REGISTRY)  # the ticket first, then the controls in their fixed order
