"""Training one unit (trial, control, level): the loop with its early-stopping bookkeeping,
seeded data order, optimizer and learning-rate schedule, and resumable state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import distributed as D
from ..distributed import shard_batch, shard_rows, unwrap
from .data import Batches, Dataset
from .presets import RunConfig
from .recipe import (  # noqa: F401 - re-exported: the recipe is part of this module's API
    evaluate,
    lr_at,
    make_optimizer,
    make_pruner,
    optimizer_for,
    pruner_recipe,
    seed_for,
)
from .rundir import atomic_torch_save


class Level:
    """Trains `model` (already initialised and masked) for cfg.iterations, evaluating every
    cfg.eval_every iterations; checkpoints to `ckpt_path` every cfg.checkpoint_every.
    `task` (a ``task.PresetTask`` or ``task.UserTask``; a preset's ``Dataset`` is wrapped)
    supplies the batches, the training step, the schedule and the metrics.

    ``shard=(rank, world)`` (DDP, `model` wrapped with ``distributed.ddp_wrap``): this rank
    trains on rows ``[rank * b / world, (rank + 1) * b / world)`` of every global batch of
    ``b = cfg.batch_size`` rows, drawn (and augmented) exactly as a single process draws
    them, so the ranks together see a single-process run's batches. Evaluation and saved
    state use the unwrapped model (checkpoints read the same with and without DDP)."""

    def __init__(
        self,
        cfg: RunConfig,
        task,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        unit: dict,
        ckpt_path: Path,
        start_iteration: int = 0,
        on_iteration: Callable[[int], None] | None = None,
        scheduler=None,
        shard: tuple[int, int] | None = None,
    ):
        from .task import PresetTask

        if isinstance(task, Dataset):
            task = PresetTask(cfg, task)
        self.cfg, self.task, self.model, self.opt = cfg, task, model, optimizer
        self.scheduler = scheduler
        self.unit, self.ckpt_path = unit, ckpt_path
        self.it = start_iteration
        self.history: list[dict] = []
        self.seconds = 0.0
        seed = seed_for(cfg, unit["trial"], unit["control"], unit["level"])
        self.batches = Batches(task.n_train, cfg.batch_size, seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1)
        self.on_iteration = on_iteration
        # DDP: this rank's rows of each global batch (None: the whole batch, one process)
        self.rows = None if shard is None else shard_rows(cfg.batch_size, shard)
        torch.manual_seed(seed + 2)  # dropout draws from the global generator

    def state_dict(self) -> dict:
        sd = {
            "unit": [self.unit["trial"], self.unit["control"], self.unit["level"]],
            "iteration": self.it,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "batches": self.batches.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "seconds": self.seconds,
        }
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.it = int(sd["iteration"])
        unwrap(self.model).load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.batches.load_state_dict(sd["batches"])
        self.aug_gen.set_state(sd["aug_gen"])
        torch.set_rng_state(sd["torch_rng"])
        self.history = list(sd["history"])
        self.seconds = float(sd["seconds"])
        if self.scheduler is not None and "scheduler" in sd:
            self.scheduler.load_state_dict(sd["scheduler"])

    def evaluate_now(self) -> None:
        self.history.append(dict(iteration=self.it, **self.task.evaluate(unwrap(self.model))))

    def run(self, progress=None) -> None:
        cfg, task, model, opt = self.cfg, self.task, self.model, self.opt
        model.train()
        t0 = time.perf_counter()
        while self.it < cfg.iterations:
            task.set_lr(opt, self.it)
            batch = task.batch(self.batches.next(), self.aug_gen)
            if self.rows is not None:  # DDP: this rank's rows of the global batch
                batch = shard_batch(batch, self.rows, cfg.batch_size)
            task.train_step(model, batch, opt)
            if self.scheduler is not None:
                self.scheduler.step()
            self.it += 1
            if self.on_iteration is not None:
                self.on_iteration(self.it)
            evaluated = self.it % cfg.eval_every == 0 or self.it == cfg.iterations
            if evaluated:
                self.evaluate_now()
            if progress is not None:
                progress.update(1)
                if evaluated and hasattr(progress, "evaluated"):  # a ``progress.Progress``
                    progress.evaluated(self.it)
            if self.it % cfg.checkpoint_every == 0 and self.it < cfg.iterations:
                self.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                if callable(self.ckpt_path):  # the caller keeps the files (train_unit)
                    self.ckpt_path(self.state_dict())
                elif self.ckpt_path is not None:
                    atomic_torch_save(self.state_dict(), self.ckpt_path)
        self.seconds += time.perf_counter() - t0

    def result(self, weights_left: float) -> tuple[dict, dict]:
        """The unit's row: figures at the early-stopping iteration (best ``early_stop_on``
        on the validation split) and at the end."""
        task = self.task
        key, sign = task.early_stop_on, (1 if task.lower_is_better else -1)
        finite = [h for h in self.history if not math.isnan(h[key])]
        best = min(finite, key=lambda h: sign * h[key]) if finite else self.history[-1]
        train_acc = task.train_accuracy(unwrap(self.model))
        final = self.history[-1]
        result = dict(**self.unit, weights_remaining=weights_left,
                      early_stop_iteration=best["iteration"])  # fmt: skip
        if "test_accuracy" in best and "val_loss" in best and "val_accuracy" in best:
            result.update(
                test_accuracy_at_early_stop=best["test_accuracy"],
                val_loss_at_early_stop=best["val_loss"],
                val_accuracy_at_early_stop=best["val_accuracy"],
                final_test_accuracy=final["test_accuracy"],
            )
        else:  # a user's own metrics: every one, at early stopping and at the end
            result.update({f"{k}_at_early_stop": v for k, v in best.items() if k != "iteration"})
            result.update({f"final_{k}": v for k, v in final.items() if k != "iteration"})
        if train_acc is not None and "final_test_accuracy" in result:
            result.update(final_train_accuracy=train_acc,
                          train_test_gap=train_acc - result["final_test_accuracy"])  # fmt: skip
        result.update(iterations=self.cfg.iterations, seconds=round(self.seconds, 3))
        curve = dict(**self.unit, history=self.history)
        return result, curve


def weights_remaining(pruner, masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(p.numel() for p in pruner.targets.values())
    return kept / total


@torch.no_grad()
def movement(model: nn.Module, theta0, masks: dict, next_masks: dict) -> dict:
    """Mean |w_T - w_0| of the weights the next round keeps vs those it prunes."""
    named = dict(model.named_parameters())
    kept = pruned = 0.0
    n_kept = n_pruned = 0
    for name, m in masks.items():
        move = (named[name].detach() - theta0[name].to(named[name].device)).abs()
        k, p = next_masks[name], m & ~next_masks[name]
        kept += float(move[k].sum())
        n_kept += int(k.sum())
        pruned += float(move[p].sum())
        n_pruned += int(p.sum())
    return {
        "mean_move_kept_next": kept / n_kept if n_kept else None,
        "mean_move_pruned_next": pruned / n_pruned if n_pruned else None,
    }


@dataclass
class UnitOutput:
    """What a unit hands back: its results row, its curve, and for a ticket the next level's
    masks (what the dependants need)."""

    result: dict
    curve: dict
    next_masks: dict | None


def train_unit(
    cfg: RunConfig,
    task,
    unit,
    model: nn.Module,
    pruner,
    masks: dict,
    start,
    theta0,
    *,
    resume: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    on_theta_k: Callable | None = None,
    progress=None,
) -> UnitOutput:
    """One unit ``(trial, control, level)`` as a function of its inputs: the configuration,
    the task, the masks it trains, its starting snapshot (θ0 or θk) and θ0 (for the weight
    movement figures) -> its row, curve and the next level's masks. `model` is any instance
    of the architecture (it is fully reset here); `pruner` only supplies the recipe (it is not
    changed). Files are the caller's: `checkpoint(state)` receives mid-unit checkpoints and
    `resume` is the last one; `on_theta_k(snapshot)` receives θk when this unit captures it
    (the level-0 ticket under late rewinding)."""
    from ..pruning.rewind import snapshot
    from .controls import REGISTRY
    from .task import fast_forward

    trial, control, level = unit
    opt, sched = task.make_optimizer(model)
    # Initialise: the ticket and the random mask rewind to θ0 (or θk), which also hands
    # the masks to the optimizer in the same pass; reinit draws fresh weights.
    REGISTRY[control].start(cfg, task, model, masks, start, opt, trial, level)
    start_it = cfg.rewind_iteration if (start is not theta0 and level > 0) else 0
    fast_forward(sched, start_it)  # a schedule rewound to θk restarts at k

    def capture(it: int) -> None:
        if on_theta_k is not None and it == cfg.rewind_iteration:
            on_theta_k(snapshot(model, iteration=it))

    trained, shard = model, None
    if D.world_size() > 1:  # DDP (torchrun): every rank trains its rows of each global batch
        D.check_same_masks(masks)  # the same masks on every rank, or a loud error
        trained, shard = D.ddp_wrap(model), (D.rank(), D.world_size())
    lvl = Level(cfg, task, trained, opt, {"trial": trial, "control": control, "level": level},
                checkpoint, start_it, on_iteration=capture, scheduler=sched,
                shard=shard)  # fmt: skip
    if resume is not None:
        lvl.load_state_dict(resume)
    lvl.run(progress)
    result, curve = lvl.result(weights_remaining(pruner, masks))
    next_masks = None
    if control == "ticket":
        # Prune now: the next level's masks, and how far kept vs to-be-pruned weights moved.
        next_masks = pruner.compute_masks(masks)  # pure: the pruner is not changed
        if shard is not None:
            D.broadcast_masks(next_masks)  # rank 0's, whatever rounding did elsewhere
        result.update(movement(model, theta0, masks, next_masks))
    return UnitOutput(result, curve, next_masks)
