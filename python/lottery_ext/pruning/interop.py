"""Interoperation with ``torch.nn.utils.prune``: hand masks over to torch's pruning
reparametrisation, and take them back as plain parameters and bool masks.

torch's pruning keeps a pruned tensor ``<name>`` of a module as a parameter ``<name>_orig``
(the values, pruned ones included), a buffer ``<name>_mask`` (0/1 in the parameter's dtype)
and a forward pre-hook that recomputes ``<name> = <name>_mask * <name>_orig`` before every
forward. Several pruning calls on one tensor stack in a ``PruningContainer`` whose mask is
the product of them all. lottery_ext keeps plain parameters and bool masks beside them (in
the pruner, in the masked optimizers); these two functions convert between the two.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .. import _validate

Tensor = torch.Tensor

__all__ = ["from_torch_prune", "to_torch_prune"]


def _unwrap(module: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) stands for. The class
    exists only once torch._dynamo is imported, so no wrapper can exist before that."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    while wrapper is not None and isinstance(module, wrapper):
        module = module._orig_mod
    return module


def _modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) as ``named_modules()`` gives them (each module once, first path), with
    every ``torch.compile`` wrapper looked through: its ``_orig_mod.`` level is left out of
    the path, so names match the uncompiled model's."""
    seen: set[int] = set()
    stack = [("", model)]
    while stack:
        path, module = stack.pop()
        module = _unwrap(module)
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        children = [(n, c) for n, c in module._modules.items() if c is not None]
        for name, child in reversed(children):  # a stack: push in reverse to visit in order
            stack.append((f"{path}.{name}" if path else name, child))


def _pruning_hook(module: nn.Module, name: str) -> torch_prune.BasePruningMethod | None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == name:
            return hook
    return None


def _is_pruned(module: nn.Module, name: str) -> bool:
    """`name` of `module` carries torch's pruning reparametrisation, complete."""
    return (
        _pruning_hook(module, name) is not None
        and f"{name}_orig" in module._parameters
        and f"{name}_mask" in module._buffers
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_torch_prune(model: nn.Module, masks: Mapping[str | Tensor, Tensor]) -> None:
    """Prune `model` with ``torch.nn.utils.prune``: for every mask, the parameter gets torch's
    reparametrisation (``custom_from_mask``): a ``<name>_orig`` parameter, a ``<name>_mask``
    buffer and a forward pre-hook, so ``model(x)`` computes with the weights zeroed where the
    mask is False.

    `masks`: parameter name (``"fc1.weight"``, as ``named_parameters()`` gives it, or as
    ``from_torch_prune`` returns it: without a ``torch.compile`` wrapper's ``_orig_mod.``
    prefix) or parameter tensor -> bool mask of the parameter's shape, on its device (e.g.
    ``MagnitudePruner.masks``). Everything is checked before anything changes: an unknown
    name, a tensor that is not a parameter of the model, a parameter given twice, a mask of
    another shape, dtype or device, a parameter shared by several modules (tied weights:
    torch's pruning rewires one module's attribute, the others would keep the dense weights)
    raise a ValueError or TypeError naming the parameter, and the model is left as it was.

    The parameter object itself becomes ``<name>_orig``, its values untouched (pruned ones
    included, as torch keeps them): the same object, so an optimizer built on it still holds
    it, but ``named_parameters()`` now calls it ``"<name>_orig"`` (an optimizer built from
    named parameters during this time knows it by that name).

    A parameter that already carries torch's pruning (any method, any number of times) keeps
    it and is pruned further, as torch does for a second ``custom_from_mask``: the new mask is
    multiplied into the existing one (kept = kept before AND mask), both stay in its
    ``PruningContainer``. Such a parameter is named ``"fc1.weight"`` or ``"fc1.weight_orig"``,
    or given as its ``weight_orig`` parameter.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks: expected a dict, got {type(masks).__name__}")
    # (path, module, attribute) of every parameter, by the parameter's id: all its owners
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    by_name: dict[str, int] = {}  # every name a key may use -> the parameter's id
    by_pruned: dict[int, int] = {}  # id of the tensor torch computed (module.weight) -> same
    params: dict[int, Tensor] = {}
    for path, module in _modules(model):
        for pname, p in module._parameters.items():
            if p is None:
                continue
            attr = pname
            if pname.endswith("_orig") and _is_pruned(module, pname[: -len("_orig")]):
                attr = pname[: -len("_orig")]
                by_name.setdefault(_join(path, attr), id(p))  # the name after pruning
                current = getattr(module, attr, None)  # the pruned tensor torch computed
                if isinstance(current, Tensor):
                    by_pruned.setdefault(id(current), id(p))
            by_name.setdefault(_join(path, pname), id(p))
            owners.setdefault(id(p), []).append((path, module, attr))
            params[id(p)] = p
    for raw, p in model.named_parameters(remove_duplicate=False):  # incl. _orig_mod. names
        by_name.setdefault(raw, id(p))

    resolved: dict[int, tuple[str, Tensor]] = {}  # parameter id -> (its name, the mask)
    for key, m in masks.items():
        if isinstance(key, str):
            pid = by_name.get(key)
            what = f"'{key}'"
        elif isinstance(key, Tensor):
            pid = id(key) if id(key) in params else by_pruned.get(id(key))
            what = f"the tensor of shape {tuple(key.shape)}"
        else:
            raise TypeError(
                f"masks must be keyed by parameter names or tensors, got {type(key).__name__}"
            )
        if pid is None:
            raise ValueError(f"mask key {what} is not a parameter of the model")
        path, module, attr = owners[pid][0]
        name = _join(path, attr)
        if len(owners[pid]) > 1:
            others = ", ".join(_join(p_, a_) for p_, _, a_ in owners[pid][1:])
            raise ValueError(
                f"{name} is shared with {others} (tied weights): torch's pruning "
                "reparametrises one module's attribute, the other modules would keep "
                "computing with the dense weights"
            )
        if isinstance(module, parametrize.ParametrizationList):
            raise ValueError(
                f"{name} is the original of a torch.nn.utils.parametrize parametrization: "
                "torch's pruning does not apply to it"
            )
        if pid in resolved:
            raise ValueError(f"{name} has two masks in masks (by name and by tensor?)")
        p = params[pid]
        _validate.mask(m, p, name)
        if not _is_pruned(module, attr):
            for suffix in ("_orig", "_mask"):  # torch would fail half-way on these
                if hasattr(module, attr + suffix):
                    raise ValueError(
                        f"{name}: its module already has an attribute '{attr}{suffix}', which "
                        "torch's pruning needs for its reparametrisation"
                    )
        resolved[pid] = (name, m)

    for pid, (_name, m) in resolved.items():  # checked above: nothing left to refuse
        _path, module, attr = owners[pid][0]
        torch_prune.custom_from_mask(module, attr, m)


def from_torch_prune(model: nn.Module) -> dict[str, Tensor]:
    """Take torch's pruning off `model` and return its masks: name -> bool mask.

    Every parameter carrying ``torch.nn.utils.prune``'s reparametrisation (a ``<name>_orig``
    parameter, a ``<name>_mask`` buffer, the forward pre-hook; one pruning method or a
    ``PruningContainer`` of several) has its effective mask read (``<name>_mask != 0``, the
    product of all the stacked methods), its pruned entries set to exactly +0 in
    ``<name>_orig`` (torch's ``orig * mask`` would leave -0.0, and NaN where an entry was
    inf or NaN), and ``torch.nn.utils.prune.remove(module, name)`` called: ``<name>`` is a
    plain parameter again, surviving values bit for bit as they were in ``<name>_orig``.

    Returns ``{"fc1.weight": mask, ...}`` in model order: the names of
    ``model.named_parameters()`` after the removal (without a ``torch.compile`` wrapper's
    ``_orig_mod.`` prefix), masks of the parameter's shape, memory layout and device, ready
    for ``MaskedAdam(model.named_parameters(), masks=...)`` (or ``rewind``, or the pruner's
    ``load_state_dict``). A model without torch's pruning gives ``{}`` and is not changed.

    Everything is checked before anything changes: a pruning hook whose ``_orig`` parameter
    or ``_mask`` buffer is missing or of another shape, or a mask holding values other than
    0 and 1 (not a pruning mask), raises ValueError and the model is left as it was.

    Optimizers and other references: ``prune.remove`` keeps the parameter object (the one
    that was ``<name>_orig``, itself the parameter from before the pruning) but swaps its
    storage (``param.data = orig * mask``), so a tensor taken from it earlier (``.detach()``,
    ``.data``, a view) would be stale; here its original storage is put back after the
    removal, so the parameter, its memory layout and such views stay valid. What does go
    stale: the parameter's *name*. An optimizer built from ``named_parameters()`` while the
    model was pruned knows it as ``"fc1.weight_orig"`` (masks keyed ``"fc1.weight"`` will
    not resolve in it): build optimizers after this call, or key masks by tensor. torch's
    ``<name>_mask`` buffers leave ``state_dict()``, which then loads into the unpruned model.
    """
    found = []  # (name, module, attr, bool mask) in model order
    for path, module in _modules(model):
        for hook in list(module._forward_pre_hooks.values()):
            if not isinstance(hook, torch_prune.BasePruningMethod):
                continue
            attr = hook._tensor_name
            name = _join(path, attr)
            orig = module._parameters.get(f"{attr}_orig")
            buf = module._buffers.get(f"{attr}_mask")
            if orig is None or buf is None:
                raise ValueError(
                    f"{name}: carries a torch pruning hook but no '{attr}_orig' parameter or "
                    f"'{attr}_mask' buffer: the reparametrisation is incomplete"
                )
            if buf.shape != orig.shape:
                raise ValueError(
                    f"{name}: torch pruning mask of shape {tuple(buf.shape)} does not match "
                    f"the parameter's {tuple(orig.shape)}"
                )
            buf = buf.detach()
            mask = buf.clone() if buf.dtype == torch.bool else buf != 0
            if buf.dtype != torch.bool and buf.device.type != "meta":
                if ((buf != 0) & (buf != 1)).any():
                    raise ValueError(
                        f"{name}: its torch pruning mask holds values other than 0 and 1; "
                        "it is not a pruning mask"
                    )
            mask = _validate.in_layout_of(mask.to(orig.device), orig)
            found.append((name, module, attr, mask))

    out = {}
    for name, module, attr, mask in found:  # checked above
        orig = module._parameters[f"{attr}_orig"]
        with torch.no_grad():
            orig.masked_fill_(~mask, 0)
        storage = orig.data
        torch_prune.remove(module, attr)
        p = module._parameters[attr]
        if p.shape == storage.shape and p.dtype == storage.dtype:
            with torch.no_grad():
                p.data = storage  # undo remove's storage swap (same values: masked above)
        out[name] = mask
    return out
