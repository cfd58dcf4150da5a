"""Training one unit (trial, control, level): the loop with its early-stopping bookkeeping,
seeded data order, optimizer and learning-rate schedule, and resumable state."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import MaskedAdam, MaskedAdamW, MaskedSGD
from .data import Batches, Dataset, augment_cifar
from .presets import RunConfig
from .rundir import atomic_torch_save


def seed_for(cfg: RunConfig, *parts) -> int:
    """A seed per (trial, purpose, level...), stable across runs and Python versions."""
    text = ":".join(str(p) for p in (cfg.seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
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


class Level:
    """Trains `model` (already initialised and masked) for cfg.iterations, evaluating every
    cfg.eval_every iterations; checkpoints to `ckpt_path` every cfg.checkpoint_every."""

    def __init__(
        self,
        cfg: RunConfig,
        data: Dataset,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        unit: dict,
        ckpt_path: Path,
        start_iteration: int = 0,
        on_iteration: Callable[[int], None] | None = None,
    ):
        self.cfg, self.data, self.model, self.opt = cfg, data, model, optimizer
        self.unit, self.ckpt_path = unit, ckpt_path
        self.it = start_iteration
        self.history: list[dict] = []
        self.seconds = 0.0
        seed = seed_for(cfg, unit["trial"], unit["control"], unit["level"])
        self.batches = Batches(len(data.y_train), cfg.batch_size, seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1)
        self.on_iteration = on_iteration
        torch.manual_seed(seed + 2)  # dropout draws from the global generator

    def state_dict(self) -> dict:
        return {
            "unit": [self.unit["trial"], self.unit["control"], self.unit["level"]],
            "iteration": self.it,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "batches": self.batches.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "seconds": self.seconds,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.it = int(sd["iteration"])
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.batches.load_state_dict(sd["batches"])
        self.aug_gen.set_state(sd["aug_gen"])
        torch.set_rng_state(sd["torch_rng"])
        self.history = list(sd["history"])
        self.seconds = float(sd["seconds"])

    def evaluate_now(self) -> None:
        d = self.data
        val_loss, val_acc = evaluate(self.model, d.x_val, d.y_val)
        test_loss, test_acc = evaluate(self.model, d.x_test, d.y_test)
        self.history.append(dict(iteration=self.it, val_loss=val_loss, val_accuracy=val_acc,
                                 test_loss=test_loss, test_accuracy=test_acc))  # fmt: skip

    def run(self, progress=None) -> None:
        cfg, d, model, opt = self.cfg, self.data, self.model, self.opt
        model.train()
        t0 = time.perf_counter()
        loss_fn = nn.functional.cross_entropy
        while self.it < cfg.iterations:
            lr = lr_at(cfg, self.it)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = self.batches.next()
            xb, yb = d.x_train[idx], d.y_train[idx]
            if cfg.augment:
                xb = augment_cifar(xb, self.aug_gen)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            self.it += 1
            if self.on_iteration is not None:
                self.on_iteration(self.it)
            if self.it % cfg.eval_every == 0 or self.it == cfg.iterations:
                self.evaluate_now()
            if progress is not None:
                progress.update(1)
            if self.it % cfg.checkpoint_every == 0 and self.it < cfg.iterations:
                self.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                atomic_torch_save(self.state_dict(), self.ckpt_path)
        self.seconds += time.perf_counter() - t0

    def result(self, weights_left: float) -> tuple[dict, dict]:
        d = self.data
        finite = [h for h in self.history if not math.isnan(h["val_loss"])]
        best = min(finite, key=lambda h: h["val_loss"]) if finite else self.history[-1]
        _, train_acc = evaluate(self.model, d.x_train, d.y_train)
        final = self.history[-1]
        result = dict(
            **self.unit,
            weights_remaining=weights_left,
            early_stop_iteration=best["iteration"],
            test_accuracy_at_early_stop=best["test_accuracy"],
            val_loss_at_early_stop=best["val_loss"],
            val_accuracy_at_early_stop=best["val_accuracy"],
            final_test_accuracy=final["test_accuracy"],
            final_train_accuracy=train_acc,
            train_test_gap=train_acc - final["test_accuracy"],
            iterations=self.cfg.iterations,
            seconds=round(self.seconds, 3),
        )
        curve = dict(**self.unit, history=self.history)
        return result, curve
