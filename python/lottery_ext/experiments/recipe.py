"""A run configuration's recipe: its seeds, pruner, optimizer, learning-rate schedule and
evaluation. Used by the training loop (``training.py``), the tasks (``task.py``) and the
controls (``controls.py``), which sit above it."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..optim import MaskedAdam, MaskedAdamW, MaskedSGD
from ..pruning.pruner import MagnitudePruner
from .presets import RunConfig


def seed_for(cfg: RunConfig, *parts) -> int:
    """A seed per (trial, purpose, level...), stable across runs and Python versions."""
    text = ":".join(str(p) for p in (cfg.seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def pruner_recipe(cfg: RunConfig) -> dict:
    """The MagnitudePruner options of a run (also what ``find --dry-run`` shows)."""
    if cfg.pruner_options is not None:  # TicketSearch: the user's recipe, as given
        return dict(cfg.pruner_options)
    layer_rates = {"conv": cfg.conv_rate} if cfg.conv_rate is not None else None
    return dict(rate=cfg.rate, output_rate=cfg.output_rate, layer_rates=layer_rates,
                scope=cfg.scope)  # fmt: skip


def make_pruner(cfg: RunConfig, model: nn.Module) -> MagnitudePruner:
    return MagnitudePruner(model, **pruner_recipe(cfg))


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    return optimizer_for(cfg, model.parameters())


def optimizer_for(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """The masked optimizer a configuration names (sgd, momentum, adam, adamw)."""
    if cfg.optimizer == "adam":
        return MaskedAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return MaskedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.optimizer == "momentum" else 0.0
    return MaskedSGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: RunConfig, it: int) -> float:
    """Linear warmup over `warmup` iterations, then x0.1 at each milestone."""
    lr = cfg.lr * min(1.0, (it + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    return lr * 0.1 ** sum(it >= m for m in cfg.milestones)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple:
    """(mean cross-entropy, accuracy) in eval mode; (nan, nan) for an empty split."""
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return loss / len(y), correct / len(y)
