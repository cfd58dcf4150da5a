"""Resetting a pruned network: snapshots of the initial (or iteration-k) weights, the fused
rewind of survivors to them, and the random re-initialisation control."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Mapping

import torch

from .. import _ops, _reference, _validate

Tensor = torch.Tensor


class Snapshot(Mapping[str, Tensor]):
    """An immutable copy of a model's parameters and buffers, by name, taken at `iteration`.

    Tensors are private copies; modifying one in place is detected (its version counter)
    and refused at rewind time."""

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        param_names: set[str],
        iteration: int = 0,
        scheduler_state: Mapping | None = None,
    ):
        self._tensors = {k: v.detach().clone() for k, v in tensors.items()}
        self._versions = {k: v._version for k, v in self._tensors.items()}
        self.param_names = frozenset(param_names)
        self.iteration = int(iteration)
        # the LR scheduler's state and its learning rates at `iteration`, if one was given
        self.scheduler_state = copy.deepcopy(scheduler_state)

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def check_unmodified(self) -> None:
        changed = [k for k, v in self._tensors.items() if v._version != self._versions[k]]
        if changed:
            raise ValueError(f"snapshot tensors were modified in place: {changed[:5]}")

    def state_dict(self) -> dict:
        """Plain tensors and ints (loads with ``torch.load(..., weights_only=True)``)."""
        sd = {
            "tensors": dict(self._tensors),
            "param_names": sorted(self.param_names),
            "iteration": self.iteration,
        }
        if self.scheduler_state is not None:
            sd["scheduler_state"] = self.scheduler_state
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping) -> Snapshot:
        return cls(
            sd["tensors"], set(sd["param_names"]), sd["iteration"], sd.get("scheduler_state")
        )


def snapshot(
    model: torch.nn.Module, iteration: int = 0, scheduler: object | None = None
) -> Snapshot:
    """Copy the parameters and buffers of `model` (θ0 at iteration 0, or θk for late
    rewinding), and with `scheduler` the LR schedule's state at that point, which
    ``rewind(..., scheduler=scheduler)`` restores."""
    params = dict(model.named_parameters())
    tensors = {**params, **dict(model.named_buffers())}
    state = None
    if scheduler is not None:
        _check_scheduler(scheduler, None)
        state = _scheduler_state(scheduler)
    return Snapshot(tensors, set(params), iteration, state)


def _resolve_masks(model: torch.nn.Module, masks) -> dict[str, Tensor]:
    """name -> mask from a mapping keyed by names or by parameter tensors."""
    if masks is None:
        return {}
    names = {n for n, _ in model.named_parameters()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, m in masks.items():
        name = by_id.get(id(key)) if isinstance(key, Tensor) else key
        if isinstance(name, str) and name not in names and f"_orig_mod.{name}" in names:
            name = f"_orig_mod.{name}"  # a torch.compile wrapper: pruner names have no prefix
        if name is None or name not in names:
            what = key if isinstance(key, str) else f"tensor of shape {tuple(key.shape)}"
            raise ValueError(f"mask key {what} is not a parameter of the model")
        out[name] = m
    return out


def _unguarded(what: str, optimizer: object) -> None:
    """Pruned weights are zero now, but only a lottery_ext optimizer keeps them at zero: the
    next step of a plain torch optimizer revives them (momentum, Adam moments, weight
    decay). Say so where the ticket would be lost without notice."""
    got = "no optimizer" if optimizer is None else f"optimizer {type(optimizer).__name__}"
    warnings.warn(
        f"{what}() with masks and {got}: nothing keeps the pruned weights at zero after "
        "this call. Train with a lottery_ext optimizer that holds the masks: pass "
        "optimizer=MaskedSGD/MaskedAdam/MaskedAdamW(...) here, or build it afterwards with "
        "masks=... (then this warning can be ignored).",
        UserWarning,
        stacklevel=4,  # the caller of rewind/reinitialize (through torch.no_grad)
    )


@torch.no_grad()
def rewind(
    model: torch.nn.Module,
    snap: Snapshot,
    masks: Mapping | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: object | None = None,
) -> None:
    """Reset `model` to `snap`: surviving weights take their snapshot values, pruned weights
    (mask False) become 0, in one fused pass per (device, dtype); buffers (BatchNorm running
    statistics...) are copied back too.

    `masks`: name or parameter -> bool mask (e.g. ``pruner.masks``); default: the masks the
    (masked) optimizer holds. With a lottery_ext optimizer its state is reset in the same
    pass (buffers zeroed in place, step counters to 0, next step behaves as a first step)
    and it keeps the masks; any other torch optimizer has its state cleared (and a warning
    says that nothing keeps the pruned weights at zero).

    `scheduler`: an LR scheduler to restart as well (the paper's rewinding restarts the
    learning-rate schedule): it is put back to the state it had when `snap` was taken with
    ``snapshot(model, scheduler=...)``, or, for a snapshot without one, to its start
    (``restart_scheduler``). Without it the schedule goes on where it was."""
    from ..optim._masked import MaskedOptimizer

    snap.check_unmodified()
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [n for n in list(named) + list(buffers) if n not in snap]
    if missing:
        raise ValueError(f"snapshot has no entry for {missing[:5]}: was it taken of this model?")
    for name, b in buffers.items():
        s = snap[name]
        if s.shape != b.shape or s.dtype != b.dtype:
            raise ValueError(
                f"snapshot buffer {name!r} is {s.dtype} {tuple(s.shape)} but the model's is "
                f"{b.dtype} {tuple(b.shape)}: was the snapshot taken of this model?"
            )
    masked_opt = optimizer if isinstance(optimizer, MaskedOptimizer) else None
    if masks is None and masked_opt is not None:
        by_param = {id(p): n for n, p in named.items()}
        masks = {by_param[id(p)]: m for p, m in masked_opt.masks.items() if id(p) in by_param}
    masks = _resolve_masks(model, masks)
    if scheduler is not None:
        _check_scheduler(scheduler, optimizer)

    fast, slow = [], []  # slow: what the native pass cannot walk as one block
    for name, p in named.items():
        s, m = snap[name], masks.get(name)
        _validate.param(p, name, dense=False)
        _validate.like(s, p, "snapshot", name, layout=False)
        if m is not None:
            _validate.mask(m, p, name)
        states = masked_opt.state_buffers(p) if masked_opt is not None else []
        if not _validate.is_dense(p) or not all(_validate.same_layout(b, p) for b in states):
            slow.append((p.detach(), s, m, states))
        else:  # snapshot and mask copied only after a layout change
            m = None if m is None else _validate.in_layout_of(m, p)
            fast.append((p.detach(), _validate.in_layout_of(s, p), m, states))
    # one native call per device, dtype and number of state buffers per tensor
    for group in _ops.group_by_device_dtype([p for p, *_ in fast], [len(st) for *_, st in fast]):
        params, snaps, ms, states = zip(*(fast[i] for i in group))
        _ops.rewind_tensors(list(params), list(snaps), list(ms), [b for st in states for b in st])
    for p, s, m, states in slow:  # torch's ops index logically, whatever the strides
        _reference.rewind_([p], [s], [m], [states])
    for name, b in buffers.items():
        b.copy_(snap[name])

    if masked_opt is not None:  # its buffers were zeroed in the pass above
        masked_opt.restart({named[n]: m for n, m in masks.items()}, named.values(),
                           zero_buffers=False)  # fmt: skip
    elif optimizer is not None:
        optimizer.state.clear()
    if masks and masked_opt is None:
        _unguarded("rewind", optimizer)
    if scheduler is not None:
        if snap.scheduler_state is not None:
            _load_scheduler(scheduler, snap.scheduler_state)
        else:
            restart_scheduler(scheduler)


def _check_scheduler(scheduler: object, optimizer: object) -> None:
    if not hasattr(scheduler, "state_dict") or not hasattr(scheduler, "optimizer"):
        raise TypeError(
            f"scheduler: expected a torch.optim.lr_scheduler scheduler, got "
            f"{type(scheduler).__name__}"
        )
    if optimizer is not None and scheduler.optimizer is not optimizer:
        raise ValueError("scheduler: it schedules another optimizer than the one given")


def _scheduler_state(scheduler: object) -> dict:
    """A scheduler's state plus the learning rates it has set on its optimizer (torch's
    scheduler state_dict does not hold them)."""
    return {
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "lrs": [group["lr"] for group in scheduler.optimizer.param_groups],
    }


def _load_scheduler(scheduler: object, state: Mapping) -> None:
    groups = scheduler.optimizer.param_groups
    if len(state["lrs"]) != len(groups):
        raise ValueError(
            f"scheduler: the snapshot saw {len(state['lrs'])} parameter groups, the optimizer "
            f"has {len(groups)}"
        )
    scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
    for group, lr in zip(groups, state["lrs"]):
        group["lr"] = lr


def restart_scheduler(scheduler: object) -> None:
    """Put a torch LR scheduler back to its start, as its constructor left it: every group's
    learning rate to its ``initial_lr`` and the schedule to step 0. For rewinding to θ0; for
    composite schedulers (SequentialLR, ChainedScheduler), ReduceLROnPlateau, or rewinding
    to θk with the schedule at iteration k, take the snapshot with
    ``snapshot(model, iteration=k, scheduler=scheduler)`` and pass the scheduler to
    ``rewind``: it then restores the state captured there."""
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    _check_scheduler(scheduler, None)
    if (
        not isinstance(scheduler, LRScheduler)
        or isinstance(scheduler, ReduceLROnPlateau)
        or hasattr(scheduler, "_schedulers")
    ):
        raise TypeError(
            f"scheduler: a {type(scheduler).__name__} cannot be restarted in place; take the "
            "snapshot with snapshot(model, scheduler=scheduler) so that rewind() restores it"
        )
    groups = scheduler.optimizer.param_groups
    for i, group in enumerate(groups):
        if "initial_lr" not in group:
            raise ValueError(f"scheduler: optimizer.param_groups[{i}] has no 'initial_lr'")
        group["lr"] = group["initial_lr"]
    scheduler.last_epoch = -1
    scheduler._initial_step()  # torch's constructor: step 0, learning rates set


@torch.no_grad()
def reinitialize(
    model: torch.nn.Module,
    masks: Mapping | None = None,
    seed: int = 0,
    init_fn=None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """The random re-initialisation control: a fresh initialisation of `model` from its own
    scheme (each module's ``reset_parameters()``, or ``model.apply(init_fn)``), drawn with
    `seed`, then the pruned weights zeroed with the same masks.

    `optimizer`: a lottery_ext optimizer is handed the masks and its state reset, as
    ``rewind`` does (any other torch optimizer has its state cleared, with a warning that
    nothing keeps the pruned weights at zero)."""
    from ..optim._masked import MaskedOptimizer, zero_pruned

    named = dict(model.named_parameters())
    resolved = _resolve_masks(model, masks)
    for name, m in resolved.items():  # check before changing anything
        _validate.mask(m, named[name], name)
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if init_fn is not None:
            model.apply(init_fn)
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    zero_pruned((named[name].detach(), m) for name, m in resolved.items())
    if isinstance(optimizer, MaskedOptimizer):  # state reset + masks, as rewind does
        optimizer.restart({named[n]: m for n, m in resolved.items()}, named.values())
    elif optimizer is not None:
        optimizer.state.clear()
    if resolved and not isinstance(optimizer, MaskedOptimizer):
        _unguarded("reinitialize", optimizer)
