"""MaskedSGD: torch.optim.SGD with pruning masks, one fused native pass per tensor."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from .. import _ops, _reference, _validate
from ._masked import MaskedOptimizer, check_constructor, fused_device_check, local_shard

Tensor = torch.Tensor


class MaskedSGD(MaskedOptimizer, torch.optim.SGD):
    """Drop-in for ``torch.optim.SGD`` (same signature, defaults and checks) plus ``masks``.

    After every ``step()`` the pruned entries (mask False) of each masked parameter and of its
    ``momentum_buffer`` are exactly 0; surviving entries follow torch.optim.SGD with the
    pruned gradient entries ignored. Bytes moved per float32 element and step: 21 with
    momentum (read p, g, buf, mask; write p, buf), 13 without.
    """

    _state_buffers = ("momentum_buffer",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        masks: Mapping[Tensor | str, Tensor] | None = None,
    ) -> None:
        check_constructor(type(self).__name__, lr, False, differentiable)
        _validate.finite(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = False  # the fused step here takes no grad scaler
        self._init_masks(masks)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            hyper = dict(lr=group["lr"], momentum=momentum, dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                         maximize=group["maximize"])  # fmt: skip
            _ops.sgd_step.check_hyper(hyper)  # before any state is created
            fused = group.get("fused")
            restart, state = self._restart, self.state  # (.get: a refused step adds no state)
            # the common case: one op call per (device, dtype) of the tensors as they are,
            # checked once, by the op; what it refuses (or what has no momentum buffer yet:
            # torch's first step copies the gradient into a new one) takes the careful path
            calls: dict[tuple, _SGDLists] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if fused and getattr(self, "_need_device_dtype_check_for_fused", 1):
                    fused_device_check(p)  # as torch: once, on the first parameter stepped
                    self._need_device_dtype_check_for_fused = False
                c = self._call_of(calls, p, _SGDLists)
                try:
                    buf = state.get(p, _NO_STATE)["momentum_buffer"] if momentum else None
                except (KeyError, TypeError, IndexError):  # no buffer yet, or hand-made state
                    c.ok = False
                    continue
                c.params.append(p)  # (appends inline: this loop runs per parameter and step)
                c.grads.append(p.grad)
                c.momentum_buffers.append(buf)
                c.masks.append(self._masks.get(p))
                c.first.append(p in restart)
            for c in self._run_calls(_ops.sgd_step, calls, hyper):
                restart.difference_update(c.members)  # (the careful path clears its own)
        return loss

    def _gathered_step(self, params: list[Tensor], hyper: dict) -> None:
        """The step of `params` whose tensors the op refused as they were (or that have no
        momentum buffer yet): each parameter's inputs checked and brought into its memory
        layout (``_kernel_inputs``, which names it in errors), sliced views on the reference
        path, DTensors on their local shards, new momentum buffers allocated once every
        parameter has passed its checks."""
        momentum = hyper["momentum"]
        calls: dict[tuple | None, _SGDLists] = {}  # key None: the reference path
        new_buffers = []
        keys = ("momentum_buffer",) if momentum != 0 else ()
        for p in params:
            state = self.state.get(p, {})
            if not isinstance(state, dict):
                raise TypeError(f"optimizer state of {self._name(p)} is not a dict")
            has_buf = momentum != 0 and state.get("momentum_buffer") is not None
            g, bufs, mask, native = self._kernel_inputs(p, p.grad, state, keys if has_buf else ())
            buf = bufs[0] if has_buf else None
            key = (p.device, p.dtype) if native else None
            c = calls.get(key)
            if c is None:
                c = calls[key] = _SGDLists()
            if momentum != 0 and buf is None:
                new_buffers.append((p, len(c.momentum_buffers), c.momentum_buffers))
            # a DTensor (FSDP2) steps on its local shard
            c.add(p, local_shard(p), g, buf, mask, buf is None or p in self._restart)
        for p, i, bufs in new_buffers:
            buf = self.state[p]["momentum_buffer"] = torch.zeros_like(
                p, memory_format=torch.preserve_format
            )
            bufs[i] = local_shard(buf)
        for key, c in calls.items():
            if key is None:
                _reference.sgd_step_(**c.call(hyper))
            else:
                _ops.sgd_step.run(c.call(hyper))
            self._restart.difference_update(c.members)


_NO_STATE: dict = {}


class _SGDLists:
    """The tensor lists of one fused SGD call (``members``: the parameters themselves, whose
    restart flag the step clears; ``params`` holds their local shards)."""

    __slots__ = ("params", "grads", "momentum_buffers", "masks", "first", "members", "ok")

    def __init__(self) -> None:
        self.params, self.grads, self.momentum_buffers = [], [], []
        self.masks, self.first = [], []
        self.members: list[Tensor] = []  # every parameter of the call
        self.ok = True  # False: the careful path steps the members

    def add(self, member: Tensor, p: Tensor, g: Tensor, buf, mask, first: bool) -> None:
        self.members.append(member)
        self.params.append(p)
        self.grads.append(g)
        self.momentum_buffers.append(buf)
        self.masks.append(mask)
        self.first.append(first)

    def call(self, hyper: dict) -> dict:
        """The op's arguments by name (``lottery_ext.ops.sgd_step``)."""
        bufs = self.momentum_buffers if hyper["momentum"] != 0 else []
        return dict(params=self.params, grads=self.grads, momentum_buffers=bufs,
                    masks=self.masks, first=self.first, **hyper)  # fmt: skip
