"""What the three masked optimizers share: mask bookkeeping, state_dict with masks,
per-step gathering of tensors into one fused native call per (device, dtype).

Masks live beside the optimizer state (not in ``self.state``: torch would cast them to the
parameter's dtype on load) and are saved under the extra ``"masks"`` key of ``state_dict()``.

DTensor parameters (FSDP2) step on their local shards: their masks and state buffers are
DTensors sharded alike, and every per-element op is the same on the shards as on the whole
tensor (``lottery_ext.distributed`` says why this and not a DTensor sharding strategy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from .. import _ops, _reference, _validate
from .._validate import is_dtensor

Tensor = torch.Tensor
_STRIDED = torch.strided


class MaskedOptimizer:
    """Mixin placed before the torch.optim class it extends (``MaskedAdam(MaskedOptimizer, Adam)``).

    Subclasses set ``_state_buffers``: the state keys that hold per-element buffers, which are
    zeroed with the parameter wherever its mask is False.
    """

    _state_buffers: tuple[str, ...] = ()
    _counted = False  # whether the state holds a 'step' count per parameter (Adam)

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

    def _label(self, gi: int, i: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        if names:
            return f"parameter '{names[i]}'"
        return f"param_groups[{gi}]['params'][{i}] (shape {tuple(p.shape)})"

    def _name(self, param: Tensor) -> str:
        for gi, i, p in self._iter_params():
            if p is param:
                return self._label(gi, i, p)
        raise ValueError(
            f"the tensor of shape {tuple(param.shape)} is not a parameter of this optimizer"
        )

    def _labelled(self) -> list[tuple[str, Tensor]]:
        """(name, parameter) for every parameter, in one pass (``_name`` is a search)."""
        return [(self._label(gi, i, p), p) for gi, i, p in self._iter_params()]

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

    def set_mask(self, param: Tensor, mask: Tensor | None, *, zero: bool = True) -> None:
        """Prune `param` where `mask` is False (None removes the mask).

        The pruned entries of the parameter and of every state buffer are zeroed now, in one
        pass (``zero=False``: the caller zeroed them already, as ``MagnitudePruner.apply``
        does for all its tensors at once), and stay exactly zero after every step."""
        name = self._name(param)
        if mask is None:
            self._masks.pop(param, None)
            return
        stored = self._store_mask(param, mask, name)
        if zero:
            zero_pruned((t, stored) for t in [param.detach(), *self._buffers_of(param)])

    def _store_mask(self, param: Tensor, mask: Tensor, name: str | None = None) -> Tensor:
        """Validate and keep a copy of `mask` in the parameter's memory layout, without
        touching the parameter (for callers that zero it themselves, like rewind). Reuses the
        previous copy's memory: no allocation (and no page faults) when masks are re-set."""
        _validate.mask(mask, param, name or self._name(param))
        if is_dtensor(param) and not is_dtensor(mask):  # a whole mask: keep this rank's rows
            from ..distributed import shard_like

            mask = shard_like(mask, param)
        stored = self._masks.get(param)
        if stored is mask:
            return stored
        if (
            stored is None
            or stored.shape != param.shape
            or stored.device != param.device
            or not (
                _validate.same_layout(stored, param)
                if _validate.is_dense(param)
                else _validate.is_dense(stored)
            )
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
        """torch's load, plus the masks and rewind flags, all or nothing: everything is
        checked before anything changes, and a load that fails part-way leaves the optimizer
        as it was (its masks included). Load post-hooks run with the masks restored."""
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        for hook in pre_hooks.values():  # torch's order: they may rewrite the dict
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        labelled, seen = [], set()
        for name, p in self._labelled():
            if id(p) not in seen:
                seen.add(id(p))
                labelled.append((name, p))
        names, params = [n for n, _ in labelled], [p for _, p in labelled]
        _validate.saved_optimizer(state_dict, len(params))
        _validate.saved_state(state_dict["state"], params, self._state_buffers, self._counted)
        state_dict = dict(state_dict)
        masks = _validate.saved_masks(state_dict.pop("masks", {}), params, names)
        restart = _validate.saved_restart(state_dict.pop("restart", []), len(params))
        saved = (self.state, self.param_groups, self._masks, self._restart)
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
            self._after_load()
            for p in params:  # buffers the step will write: like their parameter, apart
                self._buffers_of(p)
            _validate.no_overlap(self._written(labelled))
        except BaseException:
            self.state, self.param_groups, self._masks, self._restart = saved
            raise
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        self._masks = {}
        for p, m in masks.items():  # checked above: cannot fail
            self.set_mask(p, m)
        self._restart = {params[i] for i in restart}
        for hook in post_hooks.values():
            hook(self)

    def _after_load(self) -> None:
        """Hook for subclasses to normalise loaded state."""

    def _param_states(self) -> Iterator[tuple[Tensor, dict]]:
        """(parameter, its state) pairs; skips other keys users keep in ``self.state`` (torch's
        own tests store flags there from hooks)."""
        for p, st in self.state.items():
            if isinstance(p, Tensor) and isinstance(st, dict):
                yield p, st

    def _buffers_of(self, param: Tensor) -> list[Tensor]:
        state = self.state.get(param)
        if not isinstance(state, dict):
            return []
        out = []
        for key in self._state_buffers:
            b = state.get(key)
            if b is None:
                continue
            if not (
                isinstance(b, Tensor)
                and b.shape == param.shape
                and b.dtype == param.dtype
                and b.device == param.device
            ):  # the full check only to word the error (naming is a search)
                _validate.like(b, param, f"optimizer state '{key}'", self._name(param), False)
            out.append(b)
        return out

    def _written(self, labelled: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
        """Every tensor a step writes, by name: the aliasing check's input."""
        out = []
        for name, p in labelled:
            out.append((name, p))
            state = self.state.get(p)
            if isinstance(state, dict):
                for key in self._state_buffers:
                    if isinstance(state.get(key), Tensor):
                        out.append((f"optimizer state '{key}' of {name}", state[key]))
        return out

    def add_param_group(self, param_group: dict) -> None:
        """torch's, plus: refuse a tensor given twice or overlapping another parameter (the
        fused step would update the same memory from several threads)."""
        super().add_param_group(param_group)
        try:
            _validate.no_overlap(self._labelled())
        except ValueError:
            self.param_groups.pop()
            raise

    # -- rewinding ----------------------------------------------------------------------------

    def state_buffers(self, param: Tensor) -> list[Tensor]:
        """The per-element state buffers this optimizer holds for `param` (momentum, Adam's
        moments...: the ``_state_buffers`` keys present in its state), in that order; ``[]``
        before its first step. They are zeroed with `param` wherever its mask is False."""
        return self._buffers_of(param)

    def restart(
        self,
        masks: Mapping[Tensor, Tensor],
        params: Iterable[Tensor] | None = None,
        *,
        zero_buffers: bool = True,
    ) -> None:
        """Reset the optimizer in place after the weights were reset (what
        ``lottery_ext.rewind`` and ``reinitialize`` call): store `masks` ({parameter: bool
        mask}) as its masks, zero every step counter, zero the state buffers of `params`
        (default: every parameter of the optimizer) unless ``zero_buffers=False`` (the
        caller zeroed them already, e.g. in ``rewind``'s fused pass), and make the next step
        of each of `params` a first step. Nothing is re-allocated: the state tensors keep
        their identity (and their DTensor sharding)."""
        if params is None:
            params = [p for _, _, p in self._iter_params()]
        params = list(params)
        for p, m in masks.items():
            self._store_mask(p, m)
        buffers = (
            [local_shard(b) for p in params for b in self._buffers_of(p)] if zero_buffers else []
        )
        steps = [st["step"] for _, st in self._param_states() if "step" in st]
        if buffers or steps:
            torch._foreach_zero_(buffers + steps)
        self._restart.update(p for p in params if p in self.state)

    # -- copy and pickle ------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        # torch keeps defaults, state and param_groups; a copy must keep its masks too
        state = super().__getstate__()
        state["_masks"], state["_restart"] = self._masks, self._restart
        if "_decoupled_default" in self.__dict__:  # torch < 2.6: MaskedAdam keeps the flag
            state["_decoupled_default"] = self._decoupled_default
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict, without masks
        self.__dict__.setdefault("_masks", {})
        self.__dict__.setdefault("_restart", set())

    # -- per-step gathering ---------------------------------------------------------------------

    @staticmethod
    def _call_of(calls: dict, p: Tensor, lists: type):
        """The call of `p`'s (device, dtype) in a step's `calls` (a new `lists` for the first
        parameter of its kind), with `p` counted among its members."""
        key = (p.device, p.dtype)
        c = calls.get(key)
        if c is None:
            c = calls[key] = lists()
        c.members.append(p)
        return c

    def _run_calls(self, op, calls: dict, hyper: dict) -> list:
        """Each (device, dtype) call of a step, its tensors as they are: the op's checks once
        (the hyper-parameters were checked before any state was touched), then its kernel.
        A call the op refuses (or whose gathering failed: ``c.ok`` False) goes to the careful
        path, ``_gathered_step``, which checks and names each parameter, repairs layouts and
        routes what the kernels cannot walk to the reference. Returns the calls run as they
        were."""
        done = []
        for (device, _), c in calls.items():
            a = c.call(hyper)
            if c.ok:
                try:
                    op.validate(a)
                except (ValueError, TypeError):
                    c.ok = False
            if c.ok:
                op.run_checked(a, device)
                done.append(c)
            else:
                self._gathered_step(c.members, hyper)
        return done

    def _kernel_inputs(
        self, p: Tensor, g: Tensor, state: dict, keys: tuple[str, ...]
    ) -> tuple[Tensor, list[Tensor], Tensor | None, bool]:
        """(gradient, state buffers `keys`, mask, native) for one parameter's update.

        The kernels walk every tensor of an update as one flat array, so all must share the
        parameter's memory order. The common case (all contiguous, one device) costs a few
        attribute reads; anything else is checked in full (`_validate`), then brought into
        the parameter's order by logical index: the gradient by a copy, state buffers and
        the mask once, in place of the old ones (after ``model.to(memory_format=...)``).
        A parameter that is not one block of memory (a sliced view) steps on the reference
        path (``native`` False), which indexes logically as torch.optim does.
        A DTensor parameter (FSDP2) gets its local shards (``_shard_inputs``); the caller
        steps ``local_shard(p)``."""
        if is_dtensor(p):
            return self._shard_inputs(p, g, state, keys)
        mask = self._masks.get(p)
        try:
            bufs = [state[k] for k in keys]
        except KeyError as e:  # hand-made state
            raise ValueError(f"optimizer state of {self._name(p)} has no {e}") from None
        dev, dtype, shape = p.device, p.dtype, p.shape
        fast = (
            g.layout == _STRIDED  # before is_contiguous, which sparse tensors do not have
            and g.dtype == dtype and g.shape == shape and g.device == dev
            and p.is_contiguous() and g.is_contiguous() and dtype in _validate.DTYPE_CODES
            and (mask is None or (mask.shape == shape and mask.device == dev
                                  and mask.is_contiguous()))
        )  # fmt: skip
        if fast:
            try:  # (a hand-edited state may hold a non-tensor: the full check words it)
                for b in bufs:  # a loop, not all(<generator>): runs per parameter per step
                    if not (
                        b.dtype == dtype and b.shape == shape and b.device == dev
                        and b.is_contiguous()
                    ):  # fmt: skip
                        fast = False
                        break
            except AttributeError:
                fast = False
            if fast:
                return g, bufs, mask, True
        name = self._name(p)
        _validate.step_inputs(name, p, g, tuple(zip(keys, bufs)), mask, layout=False)
        if not _validate.is_dense(p):
            return g, bufs, mask, False
        g = _validate.in_layout_of(g, p)
        for i, (k, b) in enumerate(zip(keys, bufs)):
            if not _validate.same_layout(b, p):
                bufs[i] = state[k] = _validate.in_layout_of(b, p)
        if mask is not None and not _validate.same_layout(mask, p):
            mask = self._masks[p] = _validate.in_layout_of(mask, p)
        return g, bufs, mask, True

    def _shard_inputs(
        self, p: Tensor, g: Tensor, state: dict, keys: tuple[str, ...]
    ) -> tuple[Tensor, list[Tensor], Tensor | None, bool]:
        """``_kernel_inputs`` for a DTensor parameter: the gradient, buffers and mask must be
        DTensors sharded exactly like it (then the elementwise update of the local shards is
        the update of the whole tensor); returns their local shards."""
        mask = self._masks.get(p)
        try:
            bufs = [state[k] for k in keys]
        except KeyError as e:
            raise ValueError(f"optimizer state of {self._name(p)} has no {e}") from None
        mesh, placements, shape = p.device_mesh, p.placements, p.shape
        for what, t in (("gradient", g), ("mask", mask), *zip(keys, bufs)):
            if t is None or (
                is_dtensor(t) and (t.device_mesh is mesh or t.device_mesh == mesh)
                and t.placements == placements and t.shape == shape
            ):  # fmt: skip
                continue
            placed = tuple(t.placements) if is_dtensor(t) else "a plain tensor"
            raise ValueError(
                f"{what if what in ('gradient', 'mask') else f'state {what!r}'} of "
                f"{self._name(p)}: {placed} of shape {tuple(t.shape)}, but the parameter is a "
                f"DTensor {tuple(placements)} of shape {tuple(shape)}; both must be sharded alike"
            )
        lp, lg = p.to_local(), g.to_local()
        lbufs = [b.to_local() for b in bufs]
        lmask = None if mask is None else mask.to_local()
        every = [lg, *lbufs] + ([lmask] if lmask is not None else [])
        if lp.is_contiguous() and all(t.is_contiguous() for t in every):  # FSDP2's shards
            if (
                lp.dtype in _validate.DTYPE_CODES
                and all(t.shape == lp.shape and t.device == lp.device for t in every)
                and all(t.dtype == lp.dtype for t in (lg, *lbufs))
            ):
                return lg, lbufs, lmask, True
        name = f"{self._name(p)} (local shard)"
        _validate.step_inputs(name, lp, lg, tuple(zip(keys, lbufs)), lmask, layout=False)
        native = _validate.is_dense(lp) and all(_validate.same_layout(t, lp) for t in every)
        return lg, lbufs, lmask, native


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its memory: the in-place step updates the DTensor);
    any other tensor itself. What the step loops hand to the kernels."""
    return t.to_local() if is_dtensor(t) else t


def zero_pruned(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Zero each tensor of the (tensor, mask) pairs where its mask is False, by logical
    index: one fused native call per device and dtype for the tensors laid out like their
    mask, the reference (masked_fill_) for the rest (a layout changed since the mask was set,
    a sliced view). DTensors (sharded alike) are zeroed on their local shards."""
    fast, slow = [], []
    for t, m in pairs:
        if is_dtensor(m):
            t, m = local_shard(t), local_shard(m)
        (fast if _validate.is_dense(t) and _validate.same_layout(t, m) else slow).append((t, m))
    for group in _ops.group_by_device_dtype([t for t, _ in fast]):
        _ops.apply_mask([fast[i][0] for i in group], [fast[i][1] for i in group])
    if slow:
        with torch.no_grad():
            _reference.apply_mask_([t for t, _ in slow], [m for _, m in slow])


def fused_device_check(p: Tensor) -> None:
    """``fused=True`` behaves as in torch.optim: refused on devices that have no fused torch
    kernels (e.g. ``meta``), with torch's own error. (The step here is always fused.)"""
    from torch.optim import optimizer

    check = getattr(optimizer, "_device_dtype_check_for_fused", None)
    if check is not None:
        check(p)


def check_constructor(cls_name: str, lr: object, capturable: bool, differentiable: bool) -> None:
    if isinstance(lr, Tensor):
        raise TypeError(f"{cls_name}: lr must be a Python float, not a Tensor")
    if capturable:
        raise ValueError(f"{cls_name}: capturable=True is not supported (CUDA graphs)")
    if differentiable:
        raise ValueError(f"{cls_name}: differentiable=True is not supported")
