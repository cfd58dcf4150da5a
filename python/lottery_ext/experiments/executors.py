"""Where units train: in this process, in a local pool of spawned worker processes, or as Ray
tasks. The driver (``runner.Experiment``) owns the run directory; a worker receives one unit's
inputs (configuration, masks, θ0/θk, the last checkpoint) and returns its outputs, and sends
its mid-unit checkpoints and θk back through a queue (a multiprocessing queue, or Ray's
``ray.util.queue.Queue``). A worker on another node therefore needs no shared filesystem, and
only the driver writes files.

Each worker receives the task (the data set and model factory) once, not once per unit: it
is pickled once, into the pool's initialiser or Ray's object store, and kept per process."""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

_TASKS: dict[str, Any] = {}  # per worker process: task id -> task
_SEND = None  # per worker process: where checkpoints go


@dataclass(frozen=True)
class PresetSpec:
    """A preset's task as it travels to workers: the configuration and the data set loaded
    by the driver (CPU tensors; sent once per worker, so a remote node needs no copy of
    --data-dir), moved to the unit's device in the worker."""

    cfg: Any
    data: Any  # data.Dataset

    def build(self):
        from .task import PresetTask

        return PresetTask(self.cfg, self.data.to(torch.device(self.cfg.device)))


class UnitError(RuntimeError):
    """A unit that kept failing; carries the worker's traceback."""


def worker_threads(cfg, workers: int) -> int:
    """Threads per worker: the configuration's, or an equal share of this machine's cores."""
    if cfg.threads:
        return int(cfg.threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


def run_unit(task, job: dict, send, progress=None) -> dict:
    """Train one unit from its inputs (see ``runner.Experiment._job``): its result, curve,
    next masks and (when it captures it) θk. `send(message)` receives mid-unit checkpoints
    ``("checkpoint", state)`` and θk ``("theta_k", trial, state_dict)`` as they happen."""
    from ..pruning.rewind import Snapshot
    from .schedule import Unit
    from .training import make_pruner, train_unit

    cfg, unit = job["cfg"], Unit(*job["unit"])
    device = torch.device(cfg.device)
    model = task.build_model().to(device)
    pruner = make_pruner(cfg, model)
    masks = {n: m.to(device) for n, m in job["masks"].items()}
    theta0 = Snapshot.from_state_dict(job["theta0"])
    start = Snapshot.from_state_dict(job["theta_k"]) if job["late"] else theta0
    captured = []

    def on_theta_k(snap) -> None:
        captured.append(snap.state_dict())
        send(("theta_k", unit.trial, captured[-1]))

    out = train_unit(
        cfg, task, unit, model, pruner, masks, start, theta0, resume=job["resume"],
        checkpoint=lambda sd: send(("checkpoint", sd)),
        on_theta_k=on_theta_k if job["capture_k"] else None, progress=progress,
    )  # fmt: skip
    next_masks = None if out.next_masks is None else {
        n: m.cpu() for n, m in out.next_masks.items()}  # fmt: skip
    return {"unit": tuple(unit), "result": out.result, "curve": out.curve,
            "next_masks": next_masks, "theta_k": captured[-1] if captured else None}  # fmt: skip


# Messages, jobs and results cross processes as plain pickles (bytes). Never hand a tensor
# to multiprocessing directly: torch registers reductions that move its storage into shared
# memory in place, under the training loop that still uses it (a live model's state dict).
def pack(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(blob: bytes):
    return pickle.loads(blob)


def _task(task_id: str, blob) -> Any:
    if task_id not in _TASKS:
        obj = pickle.loads(blob) if isinstance(blob, bytes) else blob
        _TASKS[task_id] = obj.build() if isinstance(obj, PresetSpec) else obj
    return _TASKS[task_id]


def _pickled(task) -> bytes:
    try:
        return pickle.dumps(task)
    except Exception as exc:  # lambdas, local functions, open files
        raise TypeError(
            f"--workers needs a task that can be pickled to send it to worker processes "
            f"({type(exc).__name__}: {exc}); define the model factory, optimizer and hooks at "
            "module level, or use --executor ray (which pickles closures)"
        ) from None


def _unpacked(fut: Future) -> Future:
    """A future of the unpickled result of `fut` (whose result is a pickle)."""
    out: Future = Future()

    def done(f: Future) -> None:
        if f.cancelled():
            out.cancel()
            return
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
        else:
            try:
                out.set_result(unpack(f.result()))
            except Exception as err:
                out.set_exception(err)

    fut.add_done_callback(done)
    return out


# -- executors: submit(job) -> Future of run_unit's dict; messages() -> what workers sent ----


class InProcess:
    """Units one after another in this process (the default): the progress bar follows
    every iteration, and messages are handled as they are sent."""

    capacity = 1

    def __init__(self, task, handle, progress=None):
        self.task, self.handle, self.progress = task, handle, progress

    def submit(self, job: dict) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(run_unit(self.task, job, self.handle, self.progress))
        except Exception as exc:  # KeyboardInterrupt and SystemExit go through
            fut.set_exception(exc)
        return fut

    def messages(self) -> list:
        return []

    def shutdown(self, abort: bool = False) -> None:
        pass


def _local_init(task_id: str, blob: bytes, send_queue, threads: int) -> None:
    global _SEND
    torch.set_num_threads(threads)
    _SEND = send_queue
    _task(task_id, blob)  # the data set is loaded now, once per worker


def _local_entry(task_id: str, job: bytes) -> bytes:
    try:
        return pack(run_unit(_TASKS[task_id], unpack(job), lambda m: _SEND.put(pack(m))))
    except Exception as exc:
        raise UnitError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None


class LocalPool:
    """N spawned worker processes on this machine (``--workers N``)."""

    def __init__(self, task_spec, workers: int, threads: int):
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks
        self.capacity = workers
        self.queue = self.ctx.Queue()
        self.initargs = ("task", _pickled(task_spec), self.queue, threads)
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.capacity, mp_context=self.ctx, initializer=_local_init,
                                   initargs=self.initargs)  # fmt: skip

    def submit(self, job: dict) -> Future:
        try:
            return _unpacked(self.pool.submit(_local_entry, "task", pack(job)))
        except BrokenProcessPool:  # a worker died (killed, out of memory): a fresh pool
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            return _unpacked(self.pool.submit(_local_entry, "task", pack(job)))

    def messages(self) -> list:
        out = []
        while True:
            try:
                out.append(unpack(self.queue.get_nowait()))
            except queue_mod.Empty:
                return out

    def shutdown(self, abort: bool = False) -> None:
        """Wait for the workers to exit; `abort`: stop them now (a failure or Ctrl-C: the
        units they were training resume from their last checkpoint)."""
        if abort:  # the executor has no public terminate; its processes are documented
            for proc in list((self.pool._processes or {}).values()):
                proc.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _ray_entry(task_id: str, task_refs: list, job: bytes, send_queue) -> bytes:
    import ray

    task = _TASKS.get(task_id)
    if task is None:
        task = _task(task_id, ray.get(task_refs[0]))
    try:
        return pack(run_unit(task, unpack(job), lambda m: send_queue.put(pack(m))))
    except Exception as exc:
        raise UnitError(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}") from None


class RayExecutor:
    """Units as Ray tasks (``--executor ray``): on the cluster at `address`, or on a local Ray
    instance started here. `cpus`/`gpus`: each unit's resource request."""

    def __init__(self, task_spec, address: str | None, cpus: float, gpus: float, threads: int,
                 run_id: str):  # fmt: skip
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise ImportError(
                "--executor ray needs Ray: pip install 'lottery_ext[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)  # fmt: skip
        total = ray.cluster_resources().get("CPU", 1)
        self.capacity = max(1, int(total // max(cpus, 1e-9))) if cpus else 64
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.task_id = f"{run_id}-{os.getpid()}"
        self.task_refs = [ray.put(task_spec)]

        def entry(task_id, task_refs, job, send_queue):
            torch.set_num_threads(threads)
            return _ray_entry(task_id, task_refs, job, send_queue)

        self.remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(entry)

    def submit(self, job: dict) -> Future:
        ref = self.remote.remote(self.task_id, self.task_refs, pack(job), self.queue)
        return _unpacked(ref.future())

    def messages(self) -> list:
        out = []
        while not self.queue.empty():
            try:
                out.append(unpack(self.queue.get_nowait()))
            except Exception:  # ray.util.queue.Empty
                break
        return out

    def shutdown(self, abort: bool = False) -> None:
        try:
            self.queue.shutdown()
        finally:
            if self.started:
                self.ray.shutdown()
