"""What a search trains: the model, the data, the optimizer, the loss, the evaluation and the
early-stopping metric. ``PresetTask`` is the paper's classification set-up of a preset;
``UserTask`` is a user's own model and data (``lottery_ext.TicketSearch``). The training
loop (``training.Level``) and the runner see only this interface."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from .data import Dataset, augment_cifar
from .models import build_model, init_fn, init_weights
from .recipe import evaluate, lr_at, make_optimizer


@torch.no_grad()
def _classify(model: nn.Module, batches) -> dict[str, float]:
    """Mean cross-entropy and accuracy over (x, y) batches, in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches:
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return (
        {"loss": loss / n, "accuracy": correct / n}
        if n
        else {"loss": math.nan, "accuracy": math.nan}
    )


class PresetTask:
    """A preset's task: in-memory tensors, cross-entropy, the preset's optimizer and its
    warmup/milestone schedule; early stopping on the validation loss."""

    early_stop_on, lower_is_better = "val_loss", True

    def __init__(self, cfg, data: Dataset) -> None:
        self.cfg, self.data = cfg, data
        self.n_train = len(data.y_train)
        self.reinit_fn = init_fn(cfg.init)

    def build_model(self) -> nn.Module:
        d, cfg = self.data, self.cfg
        return build_model(cfg.model, input_shape=d.input_shape, num_classes=d.num_classes,
                           dropout=cfg.dropout, hidden=cfg.hidden)  # fmt: skip

    def init(self, model: nn.Module) -> None:
        init_weights(model, self.cfg.init)

    def make_optimizer(self, model: nn.Module):

        return make_optimizer(self.cfg, model), None

    def set_lr(self, optimizer, it: int) -> None:

        lr = lr_at(self.cfg, it)
        for group in optimizer.param_groups:
            group["lr"] = lr

    def batch(self, idx: torch.Tensor, aug_gen: torch.Generator):
        xb, yb = self.data.x_train[idx], self.data.y_train[idx]
        if self.cfg.augment:
            xb = augment_cifar(xb, aug_gen)
        return xb, yb

    def train_step(self, model: nn.Module, batch, optimizer) -> None:
        xb, yb = batch
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()

    def evaluate(self, model: nn.Module) -> dict[str, float]:

        d = self.data
        val_loss, val_acc = evaluate(model, d.x_val, d.y_val)
        test_loss, test_acc = evaluate(model, d.x_test, d.y_test)
        return dict(val_loss=val_loss, val_accuracy=val_acc, test_loss=test_loss,
                    test_accuracy=test_acc)  # fmt: skip

    def train_accuracy(self, model: nn.Module) -> float | None:

        return evaluate(model, self.data.x_train, self.data.y_train)[1]


class _Split:
    """A user's data split: a torch Dataset, a DataLoader (its dataset and collate_fn), or an
    ``(inputs, targets)`` pair of tensors; batches by index, moved to the device."""

    def __init__(self, data: Any, name: str, device: torch.device) -> None:
        self.name, self.device = name, device
        self.collate: Callable = default_collate
        self.tensors = None
        if isinstance(data, DataLoader):
            self.collate = data.collate_fn or default_collate
            data = data.dataset
        if (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)
        ):
            if len(data[0]) != len(data[1]):
                raise ValueError(f"{name}: {len(data[0])} inputs but {len(data[1])} targets")
            self.tensors = (data[0].to(device), data[1].to(device))
            self.n = len(data[0])
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset, self.n = data, len(data)
        else:
            raise TypeError(
                f"{name}: expected a torch Dataset, a DataLoader or an (inputs, targets) pair of "
                f"tensors, got {type(data).__name__}"
            )

    def take(self, idx) -> Any:
        if self.tensors is not None:
            idx = torch.as_tensor(idx, device=self.tensors[0].device)
            return self.tensors[0][idx], self.tensors[1][idx]
        batch = self.collate([self.dataset[int(i)] for i in idx])
        return _to(batch, self.device)

    def batches(self, size: int):
        for start in range(0, self.n, size):
            yield self.take(torch.arange(start, min(start + size, self.n)))


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


_HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "score", "iou", "bleu", "map")


class UserTask:
    """A user's own model and data, with optional hooks (see ``lottery_ext.TicketSearch``)."""

    def __init__(
        self,
        model: Callable[[], nn.Module],
        train: Any,
        val: Any,
        test: Any,
        optimizer: Callable,
        *,
        device: torch.device,
        loss_fn: Callable | None = None,
        evaluate: Callable | None = None,
        early_stop_on: str = "val_loss",
        lower_is_better: bool | None = None,
        scheduler: Callable | None = None,
        train_step: Callable | None = None,
        eval_batch_size: int = 1000,
        init_fn: Callable | None = None,
    ) -> None:
        for key, fn in dict(model=model, optimizer=optimizer, loss_fn=loss_fn, evaluate=evaluate,
                            scheduler=scheduler, train_step=train_step).items():  # fmt: skip
            if fn is not None and not callable(fn):
                raise TypeError(f"{key}: expected a callable, got {type(fn).__name__}")
        self.model_fn, self.optimizer_fn, self.scheduler_fn = model, optimizer, scheduler
        self.device = device
        self.train = _Split(train, "train", device)
        self.val = None if val is None else _Split(val, "val", device)
        self.test = None if test is None else _Split(test, "test", device)
        self.n_train = self.train.n
        self.loss_fn, self.evaluate_fn, self.step_fn = loss_fn, evaluate, train_step
        self.eval_batch_size = int(eval_batch_size)
        self.early_stop_on = early_stop_on
        if lower_is_better is None:  # losses and errors fall; accuracy-like scores rise
            lower_is_better = not any(w in early_stop_on.lower() for w in _HIGHER_IS_BETTER)
        self.lower_is_better = bool(lower_is_better)
        self.reinit_fn = init_fn
        self.lr_schedule: Callable[[int], float] | None = None

    def build_model(self) -> nn.Module:
        model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: the factory returned {type(model).__name__}, not an nn.Module")
        return model.to(self.device)

    def init(self, model: nn.Module) -> None:
        """θ0 is what the factory drew (under the trial's seed): nothing more to do."""

    def make_optimizer(self, model: nn.Module):
        from ..optim._masked import MaskedOptimizer

        opt = self.optimizer_fn(model.parameters())
        if not isinstance(opt, MaskedOptimizer):
            raise TypeError(
                f"optimizer: the factory returned a {type(opt).__name__}; a ticket search needs a "
                "lottery_ext masked optimizer (MaskedSGD, MaskedAdam or MaskedAdamW), which keeps "
                "the pruned weights at zero"
            )
        sched = self.scheduler_fn(opt) if self.scheduler_fn is not None else None
        return opt, sched

    def set_lr(self, optimizer, it: int) -> None:
        """The learning rate is the optimizer's, the scheduler's (stepped by the loop), or
        ``lr_schedule(it)`` when set (``find --model``: the preset's schedule)."""
        if self.lr_schedule is not None:
            lr = self.lr_schedule(it)
            for group in optimizer.param_groups:
                group["lr"] = lr

    def batch(self, idx: torch.Tensor, aug_gen: torch.Generator):
        return self.train.take(idx)

    def train_step(self, model: nn.Module, batch, optimizer) -> None:
        if self.step_fn is not None:
            self.step_fn(model, batch, optimizer)
            return
        optimizer.zero_grad(set_to_none=True)
        if self.loss_fn is not None:
            loss = self.loss_fn(model, batch)
        else:
            x, y = batch
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        out = {}
        for split in (self.val, self.test):
            if split is None:
                continue
            if self.evaluate_fn is not None:
                was_training = model.training
                model.eval()
                with torch.no_grad():
                    metrics = self.evaluate_fn(model, split.name)
                model.train(was_training)
                if not isinstance(metrics, dict):
                    raise TypeError(f"evaluate: expected a dict of metrics, got {metrics!r}")
            else:
                metrics = _classify(model, split.batches(self.eval_batch_size))
            out.update({f"{split.name}_{k}": float(v) for k, v in metrics.items()})
        if self.early_stop_on not in out:
            raise ValueError(
                f"early_stop_on={self.early_stop_on!r} is not among the metrics "
                f"{sorted(out)} (evaluate returns them per split, prefixed val_/test_)"
            )
        return out

    def train_accuracy(self, model: nn.Module) -> float | None:
        if self.evaluate_fn is not None or self.loss_fn is not None or self.step_fn is not None:
            return None
        return _classify(model, self.train.batches(self.eval_batch_size))["accuracy"]


def fast_forward(scheduler, steps: int) -> None:
    """A fresh scheduler moved to iteration `steps` (late rewinding restarts the schedule at
    k, as the paper does)."""
    if scheduler is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(steps):
            scheduler.step()
