"""``TicketSearch``: the paper's whole protocol (IMP with rewinding, the controls, early
stopping, trials, resumable run directory, result files) on a user's own model and data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .ticket import Ticket, export_ticket


class TicketSearch:
    """Find lottery tickets of your own model on your own data.

    Args:
        model: a callable building the dense network (θ0 is drawn under each trial's seed).
        train, val, test: torch Datasets, DataLoaders (their dataset and collate_fn are used;
            batches are drawn by the search, seeded and resumable), or ``(inputs, targets)``
            tensor pairs. `val` decides early stopping; `test` is reported.
        optimizer: ``params -> optimizer``, a lottery_ext masked optimizer
            (e.g. ``lambda p: lx.MaskedAdam(p, lr=1e-3)``); a plain torch one is refused.
        iterations, batch_size, eval_every: per training.
        rounds, rate, trials, controls: the search (``controls`` from "reinit",
            "random_prune").
        output_rate, layer_rates, scope, prune_biases, include, exclude, output_layer: the
            ``MagnitudePruner`` recipe; rewind_iteration: late rewinding to θk.
        out: the run directory (resumed when it holds the same configuration).
        loss_fn: ``(model, batch) -> loss`` (default cross-entropy on ``(x, y)`` batches).
        evaluate: ``(model, split) -> dict`` of metrics, split "val" or "test"; they are
            reported as ``val_<name>`` / ``test_<name>`` (default: loss and accuracy).
        early_stop_on: the metric that picks the early-stopping iteration ("val_loss");
            lower_is_better: its direction (default True, False for names holding "acc", "auc",
            "f1", "precision", "recall", "score", "iou", "bleu" or "map").
        scheduler: ``optimizer -> torch LR scheduler``, stepped once per iteration and restarted
            with every rewind (at k for late rewinding).
        train_step: ``(model, batch, optimizer) -> None`` replacing the whole step (AMP,
            clipping, several losses); the optimizer keeps the masks whatever it does.
        reinit: ``module -> None`` applied by ``model.apply`` for the reinit control (default:
            each module's ``reset_parameters``).
        seed, device, checkpoint_every, threads, progress: as for ``lottery-ext find``.
        workers, executor, ray_address, unit_cpus, unit_gpus, retries: units in parallel, as
            ``find --workers/--executor ...`` (workers unpickle the model factory, data and
            hooks: define them at module level for local workers; Ray pickles closures too).
    """

    def __init__(
        self,
        model: Callable[[], nn.Module],
        train: Any,
        val: Any = None,
        test: Any = None,
        *,
        optimizer: Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer],
        iterations: int,
        out: str | os.PathLike,
        batch_size: int = 64,
        eval_every: int = 100,
        rounds: int = 6,
        rate: float = 0.2,
        trials: int = 1,
        controls: Sequence[str] = ("reinit", "random_prune"),
        output_rate: float | None = None,
        layer_rates: Mapping[str, float] | None = None,
        scope: str = "layer",
        prune_biases: bool = False,
        include: Iterable | None = None,
        exclude: Iterable | None = None,
        output_layer: str | None = None,
        rewind_iteration: int = 0,
        loss_fn: Callable | None = None,
        evaluate: Callable | None = None,
        early_stop_on: str = "val_loss",
        lower_is_better: bool | None = None,
        scheduler: Callable | None = None,
        train_step: Callable | None = None,
        reinit: Callable | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
        checkpoint_every: int = 1000,
        threads: int | None = None,
        progress: bool = True,
        workers: int = 1,
        executor: str = "local",
        ray_address: str | None = None,
        unit_cpus: float = 1.0,
        unit_gpus: float = 0.0,
        retries: int | None = None,
    ) -> None:
        from .experiments.presets import RunConfig
        from .experiments.task import UserTask
        from .pruning.pruner import _plan

        if not callable(model):
            raise TypeError(f"model: expected a callable that builds the network, got {model!r}")
        if val is None:
            raise ValueError("val: early stopping needs a validation split (a slice of train)")
        if isinstance(controls, str):
            controls = [c for c in controls.split(",") if c]
        recipe = dict(rate=rate, output_rate=output_rate, layer_rates=layer_rates, scope=scope,
                      prune_biases=prune_biases, output_layer=output_layer)  # fmt: skip
        if include is not None:
            recipe["include"] = _plain(include, "include")
        if exclude is not None:
            recipe["exclude"] = _plain(exclude, "exclude")
        self.device = torch.device(device)
        self.cfg = RunConfig(
            preset="custom", dataset="custom", model=_label(model), init="factory",
            optimizer="custom", lr=0.0, batch_size=batch_size, iterations=iterations,
            rounds=rounds, trials=trials, rate=rate, output_rate=output_rate, scope=scope,
            eval_every=eval_every, controls=list(controls), rewind_iteration=rewind_iteration,
            seed=seed, device=str(self.device), threads=threads,
            checkpoint_every=checkpoint_every, pruner_options=recipe,
        )  # fmt: skip
        self.cfg.check()
        self.model_fn = model
        self.task = UserTask(model, train, val, test, optimizer, device=self.device,
                             loss_fn=loss_fn, evaluate=evaluate, early_stop_on=early_stop_on,
                             lower_is_better=lower_is_better, scheduler=scheduler,
                             train_step=train_step, init_fn=reinit)  # fmt: skip
        if batch_size > self.task.n_train:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.task.n_train} examples")
        probe = _probe(model)
        _plan(probe, **recipe)  # the recipe fits the model: fail now, not in an hour
        self.task.make_optimizer(probe.to(self.device))  # a masked optimizer (clear error)
        self.out = Path(out)
        self.progress = progress
        self.scale = dict(workers=workers, executor=executor, ray_address=ray_address,
                          unit_cpus=unit_cpus, unit_gpus=unit_gpus, retries=retries)  # fmt: skip

    def run(self, adopt: bool = False) -> Path:
        """Run (or resume) the search; returns the run directory. `adopt`: the run directory
        lost its config.json; take its results as this search's (their configuration hash
        is checked, so results of another configuration are still refused)."""
        from .experiments.runner import Experiment

        return Experiment(self.cfg, self.out, progress=self.progress, task=self.task,
                          log=print if self.progress else (lambda _: None),
                          adopt=adopt, **self.scale).run()  # fmt: skip

    def results(self) -> list[dict]:
        """The rows of results.jsonl: one per (trial, control, level)."""
        from .experiments.rundir import read_jsonl

        return read_jsonl(self.out / "results.jsonl")

    def ticket(self, trial: int = 0, level: int | None = None) -> Ticket:
        """The ticket of `trial` at `level` (default: the last level done): its masks, its
        rewind point, the recipe and its figures; ``ticket.build()`` makes a fresh model."""
        if level is None:
            done = [r["level"] for r in self.results()
                    if r["trial"] == trial and r["control"] == "ticket"]  # fmt: skip
            if not done:
                raise ValueError(f"trial {trial} has no finished level yet: run() first")
            level = max(done)
        ticket = export_ticket(self.out, trial, level)
        ticket.factory = self.model_fn
        return ticket


def _label(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def _plain(items: Iterable, option: str) -> list:
    """include/exclude as stored in config.json: names and type keys; classes by name."""
    if isinstance(items, (str, type)):
        items = [items]
    out = []
    for item in items:
        if isinstance(item, type):
            raise TypeError(
                f"{option}: give layer types by key (linear, conv, attention, rnn, embedding, "
                f"norm) or parameter-name globs in a TicketSearch, not the class {item.__name__}"
            )
        out.append(item)
    return out


def _probe(model_fn: Callable[[], nn.Module]) -> nn.Module:
    """One model built outside the search's seeds to check the recipe against it."""
    with torch.random.fork_rng(devices=[]):
        return model_fn()
