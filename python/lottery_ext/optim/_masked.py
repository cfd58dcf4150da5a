"""What the three masked optimizers share: mask bookkeeping, state_dict with masks,
per-step gathering of tensors into one fused native call per (device, dtype).

Masks live beside the optimizer state (not in ``self.state``: torch would cast them to the
parameter's dtype on load) and are saved under the extra ``"masks"`` key of ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .. import _ops, _validate

Tensor = torch.Tensor


class MaskedOptimizer:
    """Mixin placed before the torch.optim class it extends (``MaskedAdam(MaskedOptimizer, Adam)``).

    Subclasses set ``_state_buffers``: the state keys that hold per-element buffers, which are
    zeroed with the parameter wherever its mask is False.
    """

    _state_buffers: tuple[str, ...] = ()

    def _init_masks(self, masks: Mapping[Tensor | str, Tensor] | None) -> None:
        self._masks: dict[Tensor, Tensor] = {}
        # Parameters whose state was reset in place (lottery_ext.rewind): their next step is a
        # first step, as after a fresh construction, without re-allocating the buffers.
        self._restart: set[Tensor] = set()
        for key, mask in (masks or {}).items():
            self.set_mask(self._resolve(key), mask)

    # -- naming and lookup -----------------------------------------------------------------

    def _iter_params(self) -> Iterator[tuple[int, int, Tensor]]:
        for gi, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                yield gi, i, p

    def _name(self, param: Tensor) -> str:
        for gi, i, p in self._iter_params():
            if p is param:
                names = self.param_groups[gi].get("param_names")
                if names:
                    return f"parameter '{names[i]}'"
                return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"
        raise ValueError(
            f"the tensor of shape {tuple(param.shape)} is not a parameter of this optimizer"
        )

    def _resolve(self, key: Tensor | str) -> Tensor:
        if isinstance(key, Tensor):
            return key
        if isinstance(key, str):
            for gi, i, p in self._iter_params():
                names = self.param_groups[gi].get("param_names")
                if names and names[i] == key:
                    return p
            raise ValueError(
                f"no parameter named '{key}': masks keyed by name need the optimizer to be "
                "built from model.named_parameters()"
            )
        raise TypeError(f"masks must be keyed by parameter tensors or names, got {type(key)}")

    # -- masks -------------------------------------------------------------------------------

    def set_mask(self, param: Tensor, mask: Tensor | None) -> None:
        """Prune `param` where `mask` is False (None removes the mask).

        The pruned entries of the parameter and of every state buffer are zeroed now, in one
        pass, and stay exactly zero after every step."""
        name = self._name(param)
        if mask is None:
            self._masks.pop(param, None)
            return
        stored = self._store_mask(param, mask, name)
        tensors = [param.detach()] + self._buffers_of(param)
        _ops.apply_mask(tensors, [stored] * len(tensors))

    def _store_mask(self, param: Tensor, mask: Tensor, name: str | None = None) -> Tensor:
        """Validate and keep a copy of `mask` in the parameter's memory layout, without
        touching the parameter (for callers that zero it themselves, like rewind). Reuses the
        previous copy's memory: no allocation (and no page faults) when masks are re-set."""
        _validate.mask(mask, param, name or self._name(param))
        stored = self._masks.get(param)
        if stored is mask:
            return stored
        if (
            stored is None
            or stored.shape != param.shape
            or not _validate.same_layout(stored, param)
        ):
            stored = torch.empty_like(param, dtype=torch.bool)
        stored.copy_(mask)
        self._masks[param] = stored
        return stored

    def get_mask(self, param: Tensor) -> Tensor | None:
        """The mask set for `param` (the optimizer's own copy, updated in place by later
        ``set_mask`` calls), or None."""
        self._name(param)
        return self._masks.get(param)

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """Parameter -> mask, for every masked parameter."""
        return dict(self._masks)

    def _buffers_of(self, param: Tensor) -> list[Tensor]:
        state = self.state.get(param, {})
        return [state[k] for k in self._state_buffers if isinstance(state.get(k), Tensor)]

    # -- state_dict ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        index = {}
        for _, _, p in self._iter_params():  # torch's numbering: position across all groups
            index.setdefault(id(p), len(index))
        sd["masks"] = {index[id(p)]: m for p, m in self._masks.items()}
        if self._restart:  # rewound parameters whose next step is a first step (MaskedSGD)
            sd["restart"] = sorted(index[id(p)] for p in self._restart if id(p) in index)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masks = state_dict.pop("masks", {})
        restart = state_dict.pop("restart", [])
        super().load_state_dict(state_dict)
        self._restart.clear()
        self._after_load()
        params = []
        for _, _, p in self._iter_params():
            if all(p is not q for q in params):
                params.append(p)
        self._masks = {}
        for idx, mask in masks.items():
            p = params[int(idx)]
            self.set_mask(p, mask.to(p.device))
        self._restart = {params[int(i)] for i in restart}

    def _after_load(self) -> None:
        """Hook for subclasses to normalise loaded state."""

    # -- per-step gathering ---------------------------------------------------------------------

    def _checked(self, p: Tensor, g: Tensor, buffers: tuple[tuple[str, Tensor], ...]) -> int:
        """Dtype code of `p` after checking every tensor of its update (names `p` on error)."""
        mask = self._masks.get(p)
        if _validate.fast_ok(p, g) and all(
            b.shape == p.shape and b.dtype == p.dtype and b.is_contiguous() for _, b in buffers
        ):
            code = _validate.DTYPE_CODES.get(p.dtype)
            if code is not None and (
                mask is None or (mask.shape == p.shape and mask.device == p.device)
            ):
                return code
        return _validate.step_inputs(self._name(p), p, g, buffers, mask)


def check_constructor(cls_name: str, lr: object, capturable: bool, differentiable: bool) -> None:
    if isinstance(lr, Tensor):
        raise TypeError(f"{cls_name}: lr must be a Python float, not a Tensor")
    if capturable:
        raise ValueError(f"{cls_name}: capturable=True is not supported (CUDA graphs)")
    if differentiable:
        raise ValueError(f"{cls_name}: differentiable=True is not supported")
