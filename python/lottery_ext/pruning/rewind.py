"""Resetting a pruned network: snapshots of the initial (or iteration-k) weights, the fused
rewind of survivors to them, and the random re-initialisation control."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .. import _ops, _validate

Tensor = torch.Tensor


class Snapshot(Mapping[str, Tensor]):
    """An immutable copy of a model's parameters and buffers, by name, taken at `iteration`.

    Tensors are private copies; modifying one in place is detected (its version counter)
    and refused at rewind time."""

    def __init__(self, tensors: Mapping[str, Tensor], param_names: set[str], iteration: int = 0):
        self._tensors = {k: v.detach().clone() for k, v in tensors.items()}
        self._versions = {k: v._version for k, v in self._tensors.items()}
        self.param_names = frozenset(param_names)
        self.iteration = int(iteration)

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
        return {
            "tensors": dict(self._tensors),
            "param_names": sorted(self.param_names),
            "iteration": self.iteration,
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping) -> Snapshot:
        return cls(sd["tensors"], set(sd["param_names"]), sd["iteration"])


def snapshot(model: torch.nn.Module, iteration: int = 0) -> Snapshot:
    """Copy the parameters and buffers of `model` (θ0 at iteration 0, or θk for late
    rewinding)."""
    params = dict(model.named_parameters())
    tensors = {**params, **dict(model.named_buffers())}
    return Snapshot(tensors, set(params), iteration)


def _resolve_masks(model: torch.nn.Module, masks) -> dict[str, Tensor]:
    """name -> mask from a mapping keyed by names or by parameter tensors."""
    if masks is None:
        return {}
    names = {n for n, _ in model.named_parameters()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for key, m in masks.items():
        name = by_id.get(id(key)) if isinstance(key, Tensor) else key
        if name is None or name not in names:
            what = key if isinstance(key, str) else f"tensor of shape {tuple(key.shape)}"
            raise ValueError(f"mask key {what} is not a parameter of the model")
        out[name] = m
    return out


@torch.no_grad()
def rewind(
    model: torch.nn.Module,
    snap: Snapshot,
    masks: Mapping | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Reset `model` to `snap`: surviving weights take their snapshot values, pruned weights
    (mask False) become 0, in one fused pass per (device, dtype); buffers (BatchNorm running
    statistics...) are copied back too.

    `masks`: name or parameter -> bool mask (e.g. ``pruner.masks``); default: the masks the
    (masked) optimizer holds. With a lottery_ext optimizer its state is reset in the same
    pass (buffers zeroed in place, step counters to 0, next step behaves as a first step)
    and it keeps the masks; any other torch optimizer has its state cleared."""
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

    calls: dict[tuple, tuple[list, ...]] = {}
    for name, p in named.items():
        s, m = snap[name], masks.get(name)
        _validate.param(p, name)
        _validate.like(s, p, "snapshot", name)
        if m is not None:
            _validate.mask(m, p, name)
            m = _validate.in_layout_of(m, p)
        states = masked_opt._buffers_of(p) if masked_opt is not None else []
        for st in states:
            _validate.like(st, p, "optimizer state", name)
        lists = calls.setdefault((p.device, p.dtype), ([], [], [], []))
        lists[0].append(p)
        lists[1].append(s)
        lists[2].append(m)
        lists[3].append(states)
    for params, snaps, ms, states in calls.values():
        width = max(len(st) for st in states)
        padded = [st + [None] * (width - len(st)) for st in states]
        _ops._launch_rewind([p.detach() for p in params], snaps, ms, padded)
    for name, b in buffers.items():
        b.copy_(snap[name])

    if masked_opt is not None:
        for name, m in masks.items():
            masked_opt._store_mask(named[name], m)
        steps = [st["step"] for st in masked_opt.state.values() if "step" in st]
        if steps:
            torch._foreach_zero_(steps)
        masked_opt._restart.update(p for p in named.values() if p in masked_opt.state)
    elif optimizer is not None:
        optimizer.state.clear()


@torch.no_grad()
def reinitialize(
    model: torch.nn.Module, masks: Mapping | None = None, seed: int = 0, init_fn=None
) -> None:
    """The random re-initialisation control: a fresh initialisation of `model` from its own
    scheme (each module's ``reset_parameters()``, or ``model.apply(init_fn)``), drawn with
    `seed`, then the pruned weights zeroed with the same masks."""
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
    groups: dict[tuple, tuple[list, list]] = {}
    for name, m in resolved.items():
        p = named[name].detach()
        g = groups.setdefault((p.device, p.dtype), ([], []))
        g[0].append(p)
        g[1].append(_validate.in_layout_of(m, p))
    for tensors, ms in groups.values():
        _ops.apply_mask(tensors, ms)
