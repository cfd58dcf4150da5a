"""The IMP experiment: per trial, train the dense net, prune, rewind, repeat; at every level
also train the controls (same mask with a random re-init; a random mask of the same
per-layer counts). Resumable at any moment from atomic checkpoints.

Split by job: ``rundir`` (files), ``training`` (one unit's loop), ``controls`` (what each
control trains and how it starts), ``schedule`` (the units and their dependencies); this
module drives them. The run directory's files are described in ``rundir``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import MagnitudePruner
from ..pruning.rewind import Snapshot, snapshot
from .controls import CONTROLS, REGISTRY, random_masks
from .data import load_dataset
from .estimate import unit_iterations
from .models import init_weights
from .presets import RunConfig
from .progress import Progress
from .rundir import (
    RunDir,
    atomic_torch_save,
    atomic_write_bytes,
    default_out_dir,
    load_checkpoint,
    read_jsonl,
    unit_key,
)
from .schedule import Unit
from .schedule import units as schedule_units
from .task import PresetTask, UserTask
from .training import (
    Level,
    evaluate,
    lr_at,
    make_optimizer,
    seed_for,
    train_unit,
    weights_remaining,
)

__all__ = [
    "CONTROLS", "Experiment", "Level", "RunDir", "atomic_torch_save", "atomic_write_bytes",
    "default_out_dir", "evaluate", "load_checkpoint", "load_dataset", "lr_at", "make_optimizer",
    "make_pruner", "pruner_recipe", "random_masks", "read_jsonl", "seed_for", "unit_key",
    "weights_remaining",
]  # fmt: skip


def pruner_recipe(cfg: RunConfig) -> dict:
    """The MagnitudePruner options of a run (also what ``find --dry-run`` shows)."""
    if cfg.pruner_options is not None:  # TicketSearch: the user's recipe, as given
        return dict(cfg.pruner_options)
    layer_rates = {"conv": cfg.conv_rate} if cfg.conv_rate is not None else None
    return dict(rate=cfg.rate, output_rate=cfg.output_rate, layer_rates=layer_rates,
                scope=cfg.scope)  # fmt: skip


def make_pruner(cfg: RunConfig, model: nn.Module) -> MagnitudePruner:
    return MagnitudePruner(model, **pruner_recipe(cfg))


class Experiment:
    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, data_dir=None, progress=True,
                 log: Callable[[str], None] = print, task=None, adopt=False):  # fmt: skip
        """`task`: a user's ``task.UserTask`` (``TicketSearch``); default: the preset's, with
        its data set loaded from `data_dir`. `adopt`: take results found without a
        config.json as this configuration's (``RunDir.open``)."""
        self.cfg, self.data_dir, self.progress, self.log = cfg, data_dir, progress, log
        self.adopt = adopt
        self.run_dir = RunDir(out_dir)
        self.task = task

    def _model(self) -> nn.Module:
        return self.task.build_model().to(self.device)

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        if self.task is None:
            # data first: a wrong --data-dir must not leave a run directory behind
            data = load_dataset(cfg.dataset, self.data_dir, val_size=cfg.val_size, seed=cfg.seed)
            self.data = data.to(self.device)
            self.task = PresetTask(cfg, self.data)
            self.run_dir.open(cfg, {"input_shape": list(data.input_shape),
                                    "num_classes": int(data.num_classes)},
                              adopt=self.adopt)  # fmt: skip
        else:
            self.run_dir.open(cfg, adopt=self.adopt)
        done = self.run_dir.done()
        units = [tuple(u) for u in schedule_units(cfg)]
        todo = [u for u in units if u not in done]
        if not todo:
            self.run_dir.unit_path.unlink(missing_ok=True)  # a kill after the last result
            self.log(f"{self.run_dir.path}: all {len(units)} levels already done")
            return self.run_dir.path
        resume = self.run_dir.load_unit()  # a damaged or foreign one is set aside, and said so
        if resume is not None and tuple(resume["unit"]) != todo[0]:
            resume = None  # a finished unit's, left by a kill before it was removed
        if len(todo) < len(units) or resume is not None:
            self.log(self._resume_line(len(units) - len(todo), len(units), todo[0], resume))
        left = [unit_iterations(cfg, Unit(*u)) for u in todo]
        if resume is not None:
            left[0] = cfg.iterations - int(resume["iteration"])
        self.log(f"plan: {len(todo)} of {len(units)} units to train, {cfg.iterations:,} "
                 f"iterations each (evaluated every {cfg.eval_every}): {sum(left):,} "
                 "iterations; an estimate follows the first evaluation")  # fmt: skip
        bar = Progress(left, len(units), log=self.log, enabled=self.progress)
        try:
            for trial in range(cfg.trials):
                trial_units = [u for u in todo if u[0] == trial]
                if trial_units:
                    self._run_trial(trial, trial_units, bar)
        finally:
            bar.close()
        return self.run_dir.path

    # -- one trial -----------------------------------------------------------------------------

    def _resume_line(self, done: int, total: int, nxt: tuple, resume: dict | None) -> str:
        """Where a resumed run picks up: units done, the next unit and its iteration."""
        trial, control, level = nxt
        where = f" from iteration {int(resume['iteration'])}" if resume is not None else ""
        return (f"resuming {self.run_dir.path}: {done} of {total} units done; next: trial "
                f"{trial}, {control}, level {level}{where}")  # fmt: skip

    def _devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _run_trial(self, trial: int, todo: list[tuple], bar) -> None:
        cfg = self.cfg
        run_dir = self.run_dir
        own = isinstance(self.task, UserTask)
        if own:  # θ0 is what the user's factory draws, under the trial's seed
            with torch.random.fork_rng(devices=self._devices()):
                torch.manual_seed(seed_for(cfg, trial, "init"))
                model = self._model()
        else:
            model = self._model()
        pruner = make_pruner(cfg, model)
        saved = run_dir.load_theta(trial)
        if saved is not None:
            theta0 = Snapshot.from_state_dict(saved["theta0"])
            theta_k = Snapshot.from_state_dict(saved["theta_k"]) if saved["theta_k"] else None
        else:
            if not own:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed_for(cfg, trial, "init"))
                    init_weights(model, cfg.init)
            theta0, theta_k = snapshot(model), None
            if cfg.rewind_iteration == 0:
                run_dir.save_theta(trial, theta0.state_dict(), None)
        late_units = [u for u in todo if u[2] > 0 and REGISTRY[u[1]].late_rewind]
        if (
            cfg.rewind_iteration > 0
            and theta_k is None
            and late_units
            and ((trial, "ticket", 0) not in todo)
        ):  # θk was captured with the level-0 ticket, which is done: never rewind to θ0 instead
            raise ValueError(
                f"{run_dir.theta_path(trial)}: θk (iteration {cfg.rewind_iteration}) of trial "
                f"{trial} is missing, and the remaining levels rewind to it; restore the file, "
                "or start a new run with another --out (it cannot be silently replaced by θ0)"
            )
        for trial_, control, level in todo:
            assert trial_ == trial
            if level == 0:
                masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in pruner.targets.items()}
            else:
                masks = {n: m.to(self.device) for n, m in run_dir.load_masks(trial, level).items()}
            masks = REGISTRY[control].masks(cfg, masks, trial, level)
            # tickets and random masks of later levels rewind to θk; the dense level starts at θ0
            late = theta_k is not None and REGISTRY[control].late_rewind and level > 0
            start = theta_k if late else theta0
            capture_k = control == "ticket" and level == 0 and cfg.rewind_iteration > 0
            self._train_unit(trial, control, level, model, pruner, masks, start, theta0,
                             capture_k, bar)  # fmt: skip
            if capture_k:
                theta_k = Snapshot.from_state_dict(run_dir.load_theta(trial)["theta_k"])

    def _train_unit(self, trial, control, level, model, pruner, masks, start, theta0, capture_k,
                    bar) -> None:  # fmt: skip
        """Train one unit (``training.train_unit``, which knows no files) and write what it
        returns: the row and curve, the next level's masks, checkpoints and θk on the way."""
        cfg, run_dir = self.cfg, self.run_dir
        resume = run_dir.load_unit()
        if resume is not None and resume["unit"] != [trial, control, level]:
            resume = None  # a finished unit's, left by a kill before it was removed
        unit = Unit(trial, control, level)
        first = int(resume["iteration"]) if resume else cfg.iterations - unit_iterations(cfg, unit)
        bar.start_unit(f"trial {trial} {control} L{level}", first, cfg.iterations)
        out = train_unit(
            cfg, self.task, unit, model, pruner, masks, start, theta0,
            resume=resume, checkpoint=run_dir.save_unit,
            on_theta_k=(lambda snap: run_dir.save_theta(trial, theta0.state_dict(),
                                                        snap.state_dict()))
            if capture_k else None, progress=bar,
        )  # fmt: skip
        result, curve = out.result, out.curve
        if out.next_masks is not None and level < cfg.rounds:
            run_dir.save_masks(trial, level + 1, out.next_masks)
        run_dir.append(result, curve)
        run_dir.unit_path.unlink(missing_ok=True)
        if "test_accuracy_at_early_stop" in result:
            figure = f"test acc {100 * result['test_accuracy_at_early_stop']:.2f}%"
        else:  # a user's own metric
            key = f"{self.task.early_stop_on}_at_early_stop"
            figure = f"{key} {result.get(key, float('nan')):.4g}"
        bar.unit_done(
            f"trial {trial} {control:12s} level {level:2d}: "
            f"{100 * result['weights_remaining']:6.2f}% weights, early stop @ "
            f"{result['early_stop_iteration']:>6d}, {figure}"
        )
