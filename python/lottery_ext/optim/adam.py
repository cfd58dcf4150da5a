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
        step = state.get("step")
        if not (
            isinstance(step, Tensor) and step.dtype == torch.float32 and step.is_cpu
            and step.dim() == 0
        ):  # fmt: skip
            state["step"] = _validate.step_count(step, self._name(p))  # hand-edited state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, wd, amsgrad = group["eps"], group["weight_decay"], group["amsgrad"]
            decoupled = group.get("decoupled_weight_decay", self._decoupled_default)
            beta1, beta2 = float(beta1), float(beta2)
            _validate.finite(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd)
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else _PAIR
            # (device, dtype) -> the lists of one native call; key None: the reference path
            calls: dict[tuple | None, _AdamLists] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state[p]
                if not isinstance(state, dict):
                    raise TypeError(f"optimizer state of {self._name(p)} is not a dict")
                self._init_state(p, state, amsgrad, group.get("fused") or False)
                g, bufs, mask, native = self._kernel_inputs(p, g, state, keys)
                key = (p.device, p.dtype) if native else None
                c = calls.get(key)
                if c is None:
                    c = calls[key] = _AdamLists()
                c.params.append(local_shard(p))  # a DTensor (FSDP2) steps on its shard
                c.grads.append(g)
                c.exp_avgs.append(bufs[0])
                c.exp_avg_sqs.append(bufs[1])
                if amsgrad:
                    c.max_exp_avg_sqs.append(bufs[2])
                c.masks.append(mask)
                c.steps.append(state["step"])
            args = (lr, beta1, beta2, eps, wd, amsgrad, group["maximize"], decoupled)
            for key, c in calls.items():
                if key is None:
                    _reference.adam_step_(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs,
                                          c.max_exp_avg_sqs, c.masks, c.steps,
                                          **dict(zip(_ADAM_ARGS, args)))  # fmt: skip
                elif torch.compiler.is_compiling():
                    torch.ops.lottery_ext.adam_step_(c.params, c.grads, c.exp_avgs,
                                                     c.exp_avg_sqs, c.max_exp_avg_sqs, c.masks,
                                                     c.steps, *args)  # fmt: skip
                else:
                    _ops._launch_adam_step(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs,
                                           c.max_exp_avg_sqs, c.masks, c.steps, *args)  # fmt: skip
        return loss


_PAIR = ("exp_avg", "exp_avg_sq")
_ADAM_ARGS = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled")


class _AdamLists:
    """The tensor lists of one fused Adam call."""

    __slots__ = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masks", "steps")

    def __init__(self) -> None:
        self.params, self.grads, self.masks, self.steps = [], [], [], []
        self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs = [], [], []


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
