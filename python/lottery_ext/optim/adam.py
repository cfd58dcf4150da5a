"""MaskedAdam and MaskedAdamW: torch.optim.Adam/AdamW with pruning masks, fused native step."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

import torch

from .. import _ops, _reference, _validate
from ._masked import MaskedOptimizer, check_constructor, fused_device_check, local_shard

Tensor = torch.Tensor
# torch < 2.6 has no Adam(decoupled_weight_decay=...): we then keep the flag ourselves.
_TORCH_HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters


class _MaskedAdamBase(MaskedOptimizer):
    _state_buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _counted = True
    _decoupled_default = False

    def _after_load(self) -> None:
        # The native step keeps counters as float32 CPU scalars (torch may hand back float64
        # or int64, or float32 on the parameter's device).
        for p, state in self._param_states():
            step = state.get("step")
            if step is not None and not (
                isinstance(step, Tensor) and step.dtype == torch.float32 and step.is_cpu
                and step.dim() == 0
            ):  # fmt: skip
                state["step"] = _validate.step_count(step, self._name(p))

    def _init_state(self, p: Tensor, state: dict, amsgrad: bool, fused: bool) -> None:
        if not state:
            if fused:  # torch refuses fused=True on devices without its fused kernels (meta)
                fused_device_check(p)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _normalize_step(self, p: Tensor, state: dict) -> None:
        """A hand-edited step count (an int, a float64 or device tensor...) as the kernels keep
        it: the op's checks refuse anything else, and the careful path converts it here."""
        step = state.get("step")
        if not (
            isinstance(step, Tensor) and step.dtype == torch.float32 and step.is_cpu
            and step.dim() == 0
        ):  # fmt: skip
            state["step"] = _validate.step_count(step, self._name(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), amsgrad = group["betas"], group["amsgrad"]
            decoupled = group.get("decoupled_weight_decay", self._decoupled_default)
            hyper = dict(lr=group["lr"], beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                         weight_decay=group["weight_decay"], amsgrad=amsgrad,
                         maximize=group["maximize"], decoupled=decoupled)  # fmt: skip
            _ops.adam_step.check_hyper(hyper)  # before any state is created
            fused = group.get("fused") or False
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else _PAIR
            # the common case: one op call per (device, dtype) of the tensors as they are,
            # checked once, by the op; what it refuses takes the careful path
            calls: dict[tuple, _AdamLists] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not isinstance(state, dict):
                    raise TypeError(f"optimizer state of {self._name(p)} is not a dict")
                self._init_state(p, state, amsgrad, fused)
                c = self._call_of(calls, p, _AdamLists)
                try:
                    bufs = [state[k] for k in keys]
                except KeyError:  # hand-made state: the careful path names what is missing
                    c.ok = False
                    continue
                c.params.append(p)  # (appends inline: this loop runs per parameter and step)
                c.grads.append(p.grad)
                c.exp_avgs.append(bufs[0])
                c.exp_avg_sqs.append(bufs[1])
                if amsgrad:
                    c.max_exp_avg_sqs.append(bufs[2])
                c.masks.append(self._masks.get(p))
                c.steps.append(state["step"])
            self._run_calls(_ops.adam_step, calls, hyper)
        return loss

    def _gathered_step(self, params: list[Tensor], hyper: dict) -> None:
        """The step of `params` whose tensors the op refused as they were: each parameter's
        inputs checked and brought into its memory layout (``_kernel_inputs``, which names it
        in errors), sliced views on the reference path, DTensors on their local shards."""
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if hyper["amsgrad"] else _PAIR
        calls: dict[tuple | None, _AdamLists] = {}  # key None: the reference path
        for p in params:
            state = self.state[p]
            self._normalize_step(p, state)
            g, bufs, mask, native = self._kernel_inputs(p, p.grad, state, keys)
            key = (p.device, p.dtype) if native else None
            c = calls.get(key)
            if c is None:
                c = calls[key] = _AdamLists()
            c.add(local_shard(p), g, bufs, mask, state["step"])  # a DTensor: its shard
        for key, c in calls.items():
            if key is None:
                _reference.adam_step_(**c.call(hyper))
            else:
                _ops.adam_step.run(c.call(hyper))


_PAIR = ("exp_avg", "exp_avg_sq")


class _AdamLists:
    """The tensor lists of one fused Adam call."""

    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masks", "steps",
                 "members", "ok")  # fmt: skip

    def __init__(self) -> None:
        self.params, self.grads, self.masks, self.steps = [], [], [], []
        self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs = [], [], []
        self.members: list[Tensor] = []  # the parameters themselves (params: their shards)
        self.ok = True  # False: the careful path steps the members

    def add(self, p: Tensor, g: Tensor, bufs: list[Tensor], mask, step: Tensor) -> None:
        self.params.append(p)
        self.grads.append(g)
        self.exp_avgs.append(bufs[0])
        self.exp_avg_sqs.append(bufs[1])
        if len(bufs) > 2:
            self.max_exp_avg_sqs.append(bufs[2])
        self.masks.append(mask)
        self.steps.append(step)

    def call(self, hyper: dict) -> dict:
        """The op's arguments by name (``lottery_ext.ops.adam_step``)."""
        return dict(params=self.params, grads=self.grads, exp_avgs=self.exp_avgs,
                    exp_avg_sqs=self.exp_avg_sqs, max_exp_avg_sqs=self.max_exp_avg_sqs,
                    masks=self.masks, steps=self.steps, **hyper)  # fmt: skip


class MaskedAdam(_MaskedAdamBase, torch.optim.Adam):
    """Drop-in for ``torch.optim.Adam`` (same signature, defaults and checks) plus ``masks``.

    After every ``step()`` the pruned entries (mask False) of each masked parameter and of
    ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``) are exactly 0; surviving entries
    follow torch.optim.Adam with the pruned gradient entries ignored. Bytes moved per float32
    element and step: 29 (read p, g, m, v, mask; write p, m, v), +8 with amsgrad, 28 unmasked.
    ``foreach``/``fused`` are accepted for compatibility; the step is always the fused kernel.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        masks: Mapping[Tensor | str, Tensor] | None = None,
    ) -> None:
        check_constructor(type(self).__name__, lr, capturable, differentiable)
        _validate.finite(lr=lr, eps=eps, weight_decay=weight_decay)
        extra = {"decoupled_weight_decay": decoupled_weight_decay} if _TORCH_HAS_DECOUPLED else {}
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, **extra,
        )  # fmt: skip
        if not _TORCH_HAS_DECOUPLED:
            self._decoupled_default = decoupled_weight_decay
        self._step_supports_amp_scaling = False  # the fused step here takes no grad scaler
        self._init_masks(masks)


class MaskedAdamW(_MaskedAdamBase, torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` (same signature, defaults and checks) plus ``masks``.
    Decoupled weight decay (``p *= 1 - lr * weight_decay``) on surviving entries only;
    otherwise as ``MaskedAdam``."""

    _decoupled_default = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | Iterable[tuple[str, Tensor]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        masks: Mapping[Tensor | str, Tensor] | None = None,
    ) -> None:
        check_constructor(type(self).__name__, lr, capturable, differentiable)
        _validate.finite(lr=lr, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
        )  # fmt: skip
        self._step_supports_amp_scaling = False
        self._init_masks(masks)
