"""The IMP experiment: per trial, train the dense net, prune, rewind, repeat; at every level
also train the controls (same mask with a random re-init; a random mask of the same
per-layer counts). Resumable at any moment from atomic checkpoints.

Split by job: ``rundir`` (files), ``training`` (one unit's loop), ``controls`` (what each
control trains and how it starts), ``schedule`` (the units and their dependencies); this
module drives them. The run directory's files are described in ``rundir``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..pruning.rewind import Snapshot, snapshot
from .controls import CONTROLS, REGISTRY, random_masks
from .data import load_dataset
from .estimate import unit_iterations
from .executors import PresetSpec, UnitError
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
    make_pruner,
    pruner_recipe,
    seed_for,
    train_unit,
    weights_remaining,
)

__all__ = [
    "CONTROLS", "Experiment", "Level", "RunDir", "atomic_torch_save", "atomic_write_bytes",
    "default_out_dir", "evaluate", "load_checkpoint", "load_dataset", "lr_at", "make_optimizer",
    "make_pruner", "pruner_recipe", "random_masks", "read_jsonl", "seed_for", "train_unit",
    "unit_key", "weights_remaining",
]  # fmt: skip


class Experiment:
    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, data_dir=None, progress=True,
                 log: Callable[[str], None] = print, task=None, adopt=False, workers: int = 1,
                 executor: str = "local", ray_address: str | None = None,
                 unit_cpus: float = 1.0, unit_gpus: float = 0.0,
                 retries: int | None = None):  # fmt: skip
        """`task`: a user's ``task.UserTask`` (``TicketSearch``); default: the preset's, with
        its data set loaded from `data_dir`. `adopt`: take results found without a
        config.json as this configuration's (``RunDir.open``). `workers` > 1: that many
        local worker processes; `executor="ray"`: Ray tasks (`ray_address`, each unit asking
        for `unit_cpus`/`unit_gpus`). `retries`: how often a failing unit is run again
        (default 2 with workers or Ray, 0 in this process)."""
        if executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', not {executor!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self.cfg, self.data_dir, self.progress, self.log = cfg, data_dir, progress, log
        self.adopt = adopt
        self.run_dir = RunDir(out_dir)
        self.task = task
        self.workers, self.executor = workers, executor
        self.ray_address, self.unit_cpus, self.unit_gpus = ray_address, unit_cpus, unit_gpus
        parallel = workers > 1 or executor == "ray"
        self.retries = (2 if parallel else 0) if retries is None else int(retries)

    def _model(self) -> nn.Module:
        return self.task.build_model().to(self.device)

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        task_spec = self.task
        if self.task is None:
            # data first: a wrong --data-dir must not leave a run directory behind
            data = load_dataset(cfg.dataset, self.data_dir, val_size=cfg.val_size, seed=cfg.seed)
            self.data = data.to(self.device)
            self.task = PresetTask(cfg, self.data)
            task_spec = PresetSpec(cfg, data)  # what workers get: CPU tensors
            self._open({"input_shape": list(data.input_shape),
                        "num_classes": int(data.num_classes)})  # fmt: skip
        else:
            self._open(None)
        done = self.run_dir.done()
        self.run_dir.drop_stale_units(done)  # a kill between a row and its checkpoint's removal
        units = [tuple(u) for u in schedule_units(cfg)]
        todo = [u for u in units if u not in done]
        if not todo:
            self.run_dir.legacy_unit_path.unlink(missing_ok=True)
            self.log(f"{self.run_dir.path}: all {len(units)} levels already done")
            return self.run_dir.path
        resumes = {u: sd for u in todo if (sd := self.run_dir.load_unit(u)) is not None}
        if len(todo) < len(units) or resumes:
            self.log(self._resume_line(len(units) - len(todo), len(units), todo[0], resumes))
        left = [unit_iterations(cfg, Unit(*u)) for u in todo]
        for i, u in enumerate(todo):
            if u in resumes:
                left[i] = cfg.iterations - int(resumes[u]["iteration"])
        where = self._where()
        self.log(f"plan: {len(todo)} of {len(units)} units to train, {cfg.iterations:,} "
                 f"iterations each (evaluated every {cfg.eval_every}): {sum(left):,} "
                 f"iterations{where}; an estimate follows the first "
                 f"{'evaluation' if not where else 'unit'}")  # fmt: skip
        bar = Progress(left, len(units), log=self.log, enabled=self.progress)
        executor = self._executor(task_spec, bar)
        try:
            self._drive(todo, done, resumes, executor, bar)
        except BaseException:  # a failure or Ctrl-C: stop the workers now
            executor.shutdown(abort=True)
            raise
        else:
            executor.shutdown()
        finally:
            bar.close()
        return self.run_dir.path

    def _open(self, data: dict | None) -> None:
        """Open the run directory; under torchrun rank 0 opens (and checks) it, and every
        rank raises its error, if any, instead of waiting for a rank that failed."""
        from .. import distributed as D

        error = None
        if self.run_dir.writer:
            try:
                self.run_dir.open(self.cfg, data, adopt=self.adopt)
            except ValueError as exc:
                error = str(exc)
        if D.world_size() > 1:
            shared = [error]
            torch.distributed.broadcast_object_list(shared, src=0)
            error = shared[0]
            if not self.run_dir.writer and error is None:
                self.run_dir.open(self.cfg, data, adopt=self.adopt)
        if error is not None:
            raise ValueError(error)

    def _where(self) -> str:
        if self.executor == "ray":
            return " as Ray tasks"
        return f" on {self.workers} worker processes" if self.workers > 1 else ""

    def _executor(self, task_spec, bar):
        from . import executors

        if self.executor == "ray":
            threads = self.cfg.threads or max(1, int(self.unit_cpus))
            return executors.RayExecutor(task_spec, self.ray_address, self.unit_cpus,
                                         self.unit_gpus, threads,
                                         run_id=self.run_dir.hash)  # fmt: skip
        if self.workers > 1:
            threads = executors.worker_threads(self.cfg, self.workers)
            return executors.LocalPool(task_spec, self.workers, threads)
        return executors.InProcess(self.task, self._handle, progress=bar)

    # -- the driver: submits units whose inputs are ready, writes what comes back ------------

    def _resume_line(self, done: int, total: int, nxt: tuple, resumes: dict) -> str:
        """Where a resumed run picks up: units done, the next unit and its iteration."""
        trial, control, level = nxt
        where = f" from iteration {int(resumes[nxt]['iteration'])}" if nxt in resumes else ""
        others = len(resumes) - (nxt in resumes)
        more = f" ({others} more unit(s) resume from their checkpoints)" if others else ""
        return (f"resuming {self.run_dir.path}: {done} of {total} units done; next: trial "
                f"{trial}, {control}, level {level}{where}{more}")  # fmt: skip

    def _devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _drive(self, todo: list[tuple], done: dict, resumes: dict, executor, bar) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        from .schedule import needs

        finished = set(done)
        pending = list(todo)  # in serial order: the in-process executor keeps it
        running: dict = {}  # future -> (unit, attempt)
        attempts: dict[tuple, int] = {}
        self._trials: dict[int, dict] = {}
        self._done = finished
        try:
            order = {u: i for i, u in enumerate(todo)}
            while pending or running:
                # in parallel, tickets first: they are the critical path (rounds + 1 long)
                ready = pending if executor.capacity == 1 else sorted(
                    pending, key=lambda u: (u[1] != "ticket", order[u]))  # fmt: skip
                for u in list(ready):
                    if len(running) >= executor.capacity:
                        break
                    if all(tuple(n) in finished for n in needs(Unit(*u))):
                        pending.remove(u)
                        bar.start_unit(self._name(u), self._first(u, resumes),
                                       self.cfg.iterations)  # fmt: skip
                        running[executor.submit(self._job(u, resumes.pop(u, None)))] = u
                if executor.capacity > 1:
                    bar.status(len(running), len(pending))
                finished_now, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for message in executor.messages():
                    self._handle(message)
                for fut in finished_now:
                    u = running.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        self._finish(fut.result(), bar, parallel=executor.capacity > 1)
                        finished.add(u)
                        continue
                    attempts[u] = attempts.get(u, 0) + 1
                    if attempts[u] > self.retries:
                        raise exc if self.retries == 0 else UnitError(
                            f"trial {u[0]} {u[1]} level {u[2]} failed {attempts[u]} times; "
                            f"the search stops (finished units are kept). Last error: {exc}"
                        ) from exc  # fmt: skip
                    why = (str(exc).splitlines() or [type(exc).__name__])[0]
                    print(f"trial {u[0]} {u[1]} level {u[2]} failed ({why}); retrying "
                          f"({attempts[u]} of {self.retries})", file=sys.stderr)  # fmt: skip
                    pending.insert(0, u)
                    resumes_u = self.run_dir.load_unit(u)
                    if resumes_u is not None:
                        resumes[u] = resumes_u
        except BaseException:
            # stop: what already finished is written; units still running keep their last
            # checkpoint and resume from it
            for fut in running:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._finish(fut.result(), bar, parallel=True)
            raise

    def _name(self, u: tuple) -> str:
        return f"trial {u[0]} {u[1]} L{u[2]}"

    def _first(self, u: tuple, resumes: dict) -> int:
        if u in resumes:
            return int(resumes[u]["iteration"])
        return self.cfg.iterations - unit_iterations(self.cfg, Unit(*u))

    def _trial(self, trial: int) -> dict:
        """θ0 and θk of `trial` (θ0 drawn here under the trial's seed when not yet saved) and
        a model instance for the level-0 masks."""
        if trial in self._trials:
            return self._trials[trial]
        cfg, run_dir = self.cfg, self.run_dir
        own = isinstance(self.task, UserTask)
        if own:  # θ0 is what the user's factory draws, under the trial's seed
            with torch.random.fork_rng(devices=self._devices()):
                torch.manual_seed(seed_for(cfg, trial, "init"))
                model = self._model()
        else:
            model = self._model()
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
        state = {"theta0": theta0, "theta_k": theta_k, "targets": make_pruner(cfg, model).targets}
        self._trials[trial] = state
        return state

    def _job(self, u: tuple, resume: dict | None) -> dict:
        """A unit's inputs: everything a worker needs, nothing it must read from disk."""
        cfg, run_dir = self.cfg, self.run_dir
        trial, control, level = u
        state = self._trial(trial)
        late = REGISTRY[control].late_rewind and level > 0 and cfg.rewind_iteration > 0
        if late and state["theta_k"] is None:
            # θk is captured with the level-0 ticket, which is done: never rewind to θ0 instead
            raise ValueError(
                f"{run_dir.theta_path(trial)}: θk (iteration {cfg.rewind_iteration}) of trial "
                f"{trial} is missing, and the remaining levels rewind to it; restore the file, "
                "or start a new run with another --out (it cannot be silently replaced by θ0)"
            )
        if level == 0:
            masks = {n: torch.ones_like(p, dtype=torch.bool, device="cpu")
                     for n, p in state["targets"].items()}  # fmt: skip
        else:
            masks = run_dir.load_masks(trial, level)
        masks = REGISTRY[control].masks(cfg, masks, trial, level)
        return {
            "cfg": cfg, "unit": u, "masks": {n: m.cpu() for n, m in masks.items()},
            "theta0": state["theta0"].state_dict(),
            "theta_k": state["theta_k"].state_dict() if late else None, "late": late,
            "capture_k": control == "ticket" and level == 0 and cfg.rewind_iteration > 0,
            "resume": resume,
        }  # fmt: skip

    def _handle(self, message: tuple) -> None:
        """What a worker sends while it trains: a mid-unit checkpoint, or θk."""
        if message[0] == "checkpoint":
            sd = message[1]
            if tuple(sd["unit"]) not in self._done:  # one that arrives late is stale
                self.run_dir.save_unit(sd)
        elif message[0] == "theta_k":
            self._save_theta_k(message[1], message[2])

    def _save_theta_k(self, trial: int, theta_k: dict) -> None:
        state = self._trial(trial)
        self.run_dir.save_theta(trial, state["theta0"].state_dict(), theta_k)
        state["theta_k"] = Snapshot.from_state_dict(theta_k)

    def _finish(self, out: dict, bar, parallel: bool) -> None:
        """Write what a unit returned: the next level's masks, θk, its row and curve."""
        cfg, run_dir = self.cfg, self.run_dir
        trial, control, level = u = tuple(out["unit"])
        if out["theta_k"] is not None:
            self._save_theta_k(trial, out["theta_k"])
        if out["next_masks"] is not None and level < cfg.rounds:
            run_dir.save_masks(trial, level + 1, out["next_masks"])
        result, curve = out["result"], out["curve"]
        run_dir.append(result, curve)
        self._done.add(u)
        run_dir.drop_unit(u)
        from .. import distributed as D

        D.barrier()  # torchrun: the other ranks read the masks and θk rank 0 just wrote
        if parallel:
            bar.update(unit_iterations(cfg, Unit(*u)))
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
