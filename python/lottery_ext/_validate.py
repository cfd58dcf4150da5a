"""Every input check of the package, and its error message.

Nothing reaches the compiled core without passing through here. Errors name the offending
tensor (a parameter's name when the optimizer knows it, else its role and index) and say
what was expected. ``TypeError`` for a wrong kind of thing (dtype, sparse, complex),
``ValueError`` for a wrong value (shape, device, layout, NaN hyper-parameter).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping

import torch

from ._radix import DTYPE_CODES, max_key

NameFn = Callable[[], str]


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, strides {t.stride()}"


def is_dense(t: torch.Tensor) -> bool:
    """True when the elements fill one gap-free block of memory in some dimension order
    (contiguous, channels_last, transposed...): the kernels then walk it as a flat array."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same element order in memory (strides of size-1 dimensions do not matter, nor any
    stride of a tensor without elements)."""
    return a.numel() == 0 or all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1
    )


def dtype_code(t: torch.Tensor, name: str) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        if t.is_complex():
            raise TypeError(f"{name}: complex tensors are not supported (got {t.dtype})")
        raise TypeError(
            f"{name}: dtype {t.dtype} is not supported; use float32, float64, float16 or bfloat16"
        )
    return code


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (FSDP2 / tensor-parallel shard). Cheap: none can exist before
    torch.distributed.tensor is imported, so it is not imported here; plain tensors and
    Parameters are answered first (isinstance on DTensor's metaclass costs ~0.5 us)."""
    cls = type(t)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return False
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def param(p: torch.Tensor, name: str, dense: bool = True) -> int:
    """A tensor the kernels update in place (with `dense`: walkable as one flat block).
    Returns its dtype code."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if is_dtensor(p):  # a wrapper: its data_ptr() is 0, the kernels would write through it
        raise TypeError(
            f"{name}: a DTensor (FSDP2 / tensor-parallel shard) has no memory of its own for "
            "the kernels; the masked optimizers, MagnitudePruner and the thresholds take "
            "DTensors (lottery_ext.distributed), other ops take its local shard (.to_local())"
        )
    if p.layout != torch.strided:
        raise TypeError(f"{name}: only dense (strided) tensors are supported, got {p.layout}")
    code = dtype_code(p, name)
    if dense and not is_dense(p):
        raise ValueError(
            f"{name}: the kernels need a tensor whose elements fill one block of memory "
            f"(contiguous or a permutation of it); got {_describe(p)}. "
            "Call .contiguous() on it before handing it over."
        )
    return code


def like(
    t: torch.Tensor | None, p: torch.Tensor, what: str, name: str, layout: bool = True
) -> None:
    """`t` must have exactly `p`'s dtype, device, shape (and memory layout, with `layout`)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} of {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(
            f"{what} of {name}: sparse tensors are not supported (got layout {t.layout}); "
            "masked optimizers need dense gradients"
        )
    if t.dtype != p.dtype:
        raise TypeError(
            f"{what} of {name}: dtype {t.dtype} does not match the parameter's {p.dtype}"
        )
    if t.device != p.device:
        raise ValueError(f"{what} of {name}: on {t.device} but the parameter is on {p.device}")
    if t.shape != p.shape:
        raise ValueError(
            f"{what} of {name}: shape {tuple(t.shape)} does not match the parameter's "
            f"{tuple(p.shape)}"
        )
    if layout:
        like_layout(t, p, f"{what} of {name}")


def mask(m: object, p: torch.Tensor, name: str) -> None:
    """A pruning mask for parameter `p`: bool, same shape and device."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"mask for {name}: expected a bool torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(
            f"mask for {name}: dtype must be torch.bool, got {m.dtype} "
            "(use `mask.bool()` or `weight.abs() > threshold`)"
        )
    if m.layout != torch.strided:
        raise TypeError(f"mask for {name}: must be a dense tensor, got layout {m.layout}")
    if m.shape != p.shape:
        raise ValueError(
            f"mask for {name}: shape {tuple(m.shape)} does not match the parameter's "
            f"{tuple(p.shape)}"
        )
    if m.device != p.device:
        raise ValueError(f"mask for {name}: on {m.device} but the parameter is on {p.device}")
    if is_dtensor(m) or is_dtensor(p):  # sharded (FSDP2): a DTensor mask must match exactly
        if is_dtensor(m) and not is_dtensor(p):
            raise TypeError(f"mask for {name}: a DTensor, but the parameter is a plain tensor")
        if is_dtensor(m) and (m.device_mesh != p.device_mesh or m.placements != p.placements):
            raise ValueError(
                f"mask for {name}: sharded {tuple(m.placements)} but the parameter is sharded "
                f"{tuple(p.placements)} (or on another mesh); shard it like the parameter"
            )


def batch_shard(batch_size: object, shard: object) -> tuple[int, int]:
    """A rank's part of every global batch: ``shard = (rank, world)`` with 0 <= rank < world
    and a batch size the world divides. Returns (rank, world)."""
    if not (isinstance(shard, (tuple, list)) and len(shard) == 2):
        raise TypeError(f"shard must be a (rank, world_size) pair, got {shard!r}")
    rank = integer(shard[0], "shard rank", 0, 2**31)
    world = integer(shard[1], "shard world_size", 1, 2**31)
    if rank >= world:
        raise ValueError(f"shard rank {rank} is out of range for world_size {world}")
    integer(batch_size, "batch_size", 1, 2**62)
    if batch_size % world:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the world size {world}: every rank "
            f"trains on batch_size / {world} rows of each global batch; choose a multiple of "
            f"{world} (e.g. {batch_size - batch_size % world or world})"
        )
    return rank, world


def finite(**hparams: float) -> None:
    """Hyper-parameters must be finite real numbers (torch.optim lets NaN momentum through).
    Bools count as 0/1 as in torch.optim (``weight_decay=False`` is accepted there)."""
    for key, value in hparams.items():
        if type(value) is float and value - value == 0.0:  # the common case, per step: finite
            continue
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a Python float, not a Tensor")
        if not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")


def integer(value: object, name: str, low: int, high: int) -> int:
    """An int argument that crosses into the compiled core: low <= value <= high."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def has_data(t: torch.Tensor, name: str) -> None:
    """Ops that read values need real storage (a meta tensor has shapes only)."""
    if t.device.type == "meta":
        raise ValueError(
            f"{name}: meta tensors hold no values, so no magnitude can be ranked; "
            "materialise the model first (e.g. model.to_empty(device='cpu') and initialise it)"
        )


def step_count(value: object, name: str) -> torch.Tensor:
    """An Adam step counter as the kernels keep it: a one-element float32 CPU tensor.
    Hand-made or foreign state may hold an int, a float, or a tensor of another dtype or
    device (torch keeps int64 or float32 on the parameter's device): convert, never misread."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.device.type == "meta":
            raise ValueError(
                f"optimizer state 'step' of {name}: expected a one-element real tensor, got "
                f"shape {tuple(value.shape)}, dtype {value.dtype} on {value.device}"
            )
        if value.dtype == torch.float32 and value.device.type == "cpu" and value.dim() == 0:
            number = None
        else:
            number = value.item()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        raise TypeError(
            f"optimizer state 'step' of {name}: expected a number or a one-element tensor, got "
            f"{type(value).__name__}"
        )
    if number is None:
        number = float(value)
    if not (math.isfinite(number) and number >= 0 and float(number) == int(number)):
        raise ValueError(
            f"optimizer state 'step' of {name}: must be a whole number >= 0, got {number}"
        )
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        if value.device.type == "cpu" and value.dim() == 0:
            return value
    return torch.tensor(float(number), dtype=torch.float32)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte of its storage that the non-empty tensor `t` touches."""
    size = t.element_size()
    start = t.storage_offset() * size
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 1)
    return start, start + last * size + size - 1


def no_overlap(tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Tensors that one fused call writes must not share memory: several threads (or GPU
    blocks) would update the same element in an undefined order. Non-overlapping views of one
    storage (e.g. alternate columns) are allowed."""
    seen: dict[int, str] = {}
    spans = []
    for name, t in tensors:
        if id(t) in seen:
            raise ValueError(
                f"{name} appears twice ({seen[id(t)]}): each tensor may be given to the "
                "optimizer once (remove the duplicate)"
            )
        seen[id(t)] = name
        if t.numel() == 0 or t.device.type == "meta":
            continue
        try:
            key = (t.device, t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without storage (functional)
            continue
        spans.append((key, *_extent(t), name, t))
    spans.sort(key=lambda s: (str(s[0][0]), s[0][1], s[1]))
    for (ka, _, ea, na, ta), (kb, sb, _, nb, tb) in zip(spans, spans[1:]):
        if ka == kb and sb <= ea and _overlaps(ta, tb):
            raise ValueError(
                f"{na} and {nb} share memory (overlapping views of one storage): updating "
                "both in one step would race; give the optimizer tensors that do not overlap"
            )


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact test for two views of one storage whose byte ranges intersect."""
    if is_dense(a) and is_dense(b) and a.element_size() == b.element_size():
        return True
    touched = []
    for t in (a, b):  # the set of bytes each one covers
        size = t.element_size()
        idx = torch.zeros((), dtype=torch.int64)
        for n, st in zip(t.shape, t.stride()):
            idx = idx.unsqueeze(-1) + torch.arange(n) * st * size
        starts = idx.flatten() + t.storage_offset() * size
        touched.append((starts.unsqueeze(1) + torch.arange(size)).flatten().unique())
    return bool(torch.isin(touched[0], touched[1]).any())


def step_inputs(
    name: str,
    p: torch.Tensor,
    g: torch.Tensor,
    states: tuple[tuple[str, torch.Tensor], ...],
    m: torch.Tensor | None,
    layout: bool = True,
) -> int:
    """All tensors one parameter's fused update touches. Returns the dtype code.
    ``layout=False``: any strides (the optimizers bring them into one order themselves)."""
    code = param(p, name, dense=layout)
    like(g, p, "gradient", name, layout)
    for what, s in states:
        like(s, p, f"optimizer state '{what}'", name, layout)
    if m is not None:
        mask(m, p, name)
        if layout:
            like_layout(m, p, f"mask for {name}")
    return code


def like_layout(t: torch.Tensor, p: torch.Tensor, what: str) -> None:
    if not same_layout(t, p):
        raise ValueError(
            f"{what}: memory layout (strides {t.stride()}) differs from the tensor's "
            f"(strides {p.stride()})"
        )


def same_length(**lists: list) -> int:
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tensor lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def steps(step_tensors: list[torch.Tensor]) -> None:
    for i, s in enumerate(step_tensors):
        if not (
            isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.is_cpu
            and s.numel() == 1
        ):  # fmt: skip
            raise TypeError(f"steps[{i}]: expected a one-element float32 CPU tensor")


def histogram(
    hist: object, bits: int, like: torch.Tensor, shift: int, prefix: int, pmask: int
) -> None:
    """Scratch for one radix pass over tensors like `like`: int64, contiguous, on their
    device, 2**bits + 1 entries (the last counts NaNs)."""
    dtype = like.dtype
    if not isinstance(hist, torch.Tensor) or hist.dtype != torch.int64:
        raise TypeError("hist: expected an int64 torch.Tensor")
    max_bits = 16
    if like.device.type == "cuda":
        from . import _native

        max_bits = _native.cuda_max_histogram_bits or 16
    integer(bits, f"bits (on {like.device.type})", 1, max_bits)
    if hist.device != like.device or not hist.is_contiguous() or hist.numel() != (1 << bits) + 1:
        raise ValueError(
            f"hist: expected a contiguous tensor of {(1 << bits) + 1} entries on {like.device}"
        )
    key_bits = max_key(dtype).bit_length()
    integer(shift, "shift", 0, key_bits - bits)
    integer(prefix, "prefix", 0, max_key(dtype))
    integer(pmask, "prefix_mask", 0, max_key(dtype))
    if prefix & ~pmask:
        raise ValueError("prefix must be a subset of prefix_mask (bits outside it are set)")


def one_device_dtype(t: torch.Tensor, first: torch.Tensor, what: str, name: str, first_name: str):
    """Every tensor of one native call shares the first one's device and dtype."""
    if t.device != first.device or t.dtype != first.dtype:
        raise ValueError(
            f"{what}: {name} is {t.dtype} on {t.device} but {first_name} is {first.dtype} on "
            f"{first.device}; one call takes one device and dtype"
        )


def in_layout_of(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`m` itself if it has `p`'s memory layout, else a copy in that layout (once per mask:
    the kernels walk the mask and the tensor in the same memory order)."""
    return m if same_layout(m, p) else torch.empty_like(p, dtype=m.dtype).copy_(m)


# -- saved optimizer state (load_state_dict): named errors before anything changes ----------


def saved_optimizer(sd: object, n_params: int) -> None:
    """The structure torch's load_state_dict indexes into, checked so that a malformed dict
    raises an error naming the key instead of an IndexError/KeyError from inside torch."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"state_dict: expected a dict, got {type(sd).__name__}")
    for key in ("state", "param_groups"):
        if key not in sd:
            raise ValueError(f"state_dict has no '{key}' entry: is it an optimizer state_dict?")
    if not isinstance(sd["state"], Mapping):
        raise TypeError(f"state_dict['state']: expected a dict, got {type(sd['state']).__name__}")
    groups = sd["param_groups"]
    if not isinstance(groups, (list, tuple)):
        raise TypeError(f"state_dict['param_groups']: expected a list, got {type(groups).__name__}")
    for i, g in enumerate(groups):
        if not isinstance(g, Mapping) or not isinstance(g.get("params"), (list, tuple)):
            raise ValueError(
                f"state_dict['param_groups'][{i}]: expected a dict with a 'params' list"
            )
    for key, value in sd["state"].items():
        if isinstance(key, int) and not isinstance(key, bool):
            if not 0 <= key < n_params:
                raise ValueError(
                    f"state_dict['state'][{key}]: no such parameter (the optimizer has {n_params})"
                )
            if not isinstance(value, Mapping):
                raise TypeError(
                    f"state_dict['state'][{key}]: expected a dict of state, got "
                    f"{type(value).__name__}"
                )


def _index(key: object, n: int, where: str) -> int:
    if isinstance(key, str) and key.lstrip("-").isdigit():  # JSON round trips make keys strings
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"{where}: parameter index must be an int, got {key!r}")
    if not 0 <= key < n:
        raise ValueError(f"{where}: parameter index {key} is out of range [0, {n})")
    return key


def saved_masks(
    masks: object, params: list[torch.Tensor], names: list[str]
) -> dict[torch.Tensor, torch.Tensor]:
    """state_dict['masks'] (parameter index -> bool mask) checked against the optimizer's
    parameters; returns parameter -> mask on the parameter's device."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"state_dict['masks']: expected a dict, got {type(masks).__name__}")
    out = {}
    for key, m in masks.items():
        i = _index(key, len(params), f"state_dict['masks'][{key!r}]")
        p = params[i]
        if isinstance(m, torch.Tensor) and m.device != p.device:
            m = m.to(p.device)
        mask(m, p, f"{names[i]} (state_dict['masks'][{key!r}])")
        out[p] = m
    return out


def saved_restart(restart: object, n: int) -> list[int]:
    if not isinstance(restart, (list, tuple, set)):
        raise TypeError(f"state_dict['restart']: expected a list, got {type(restart).__name__}")
    return [_index(i, n, "state_dict['restart']") for i in restart]


def saved_state(
    state: Mapping, params: list[torch.Tensor], buffer_keys: tuple[str, ...], counted: bool
) -> None:
    """Per-parameter entries of state_dict['state']: the buffers a step reads are tensors of
    the parameter's shape (torch casts dtype and device on load), a step count (`counted`)
    is a whole number >= 0."""
    for i, entry in state.items():
        if isinstance(i, bool) or not isinstance(i, int):
            continue  # not a parameter's state (flags users keep there): loaded as it is
        where = f"state_dict['state'][{i}]"
        for key in buffer_keys:
            if key not in entry:
                continue
            b = entry[key]
            if not isinstance(b, torch.Tensor):
                raise TypeError(f"{where}['{key}']: expected a tensor, got {type(b).__name__}")
            if b.shape != params[i].shape:
                raise ValueError(
                    f"optimizer state '{key}' of {where}: shape {tuple(b.shape)} does not match "
                    f"the parameter's {tuple(params[i].shape)}"
                )
        if counted and "step" in entry:
            step_count(entry["step"], where)


# -- the ops' checks (lottery_ext._ops): one function per op, given the call's arguments by
# name. Each first tries the common case in a few attribute reads per tensor (plain
# contiguous tensors of one kernel dtype and device); anything else gets every check below,
# which names the offending tensor.

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(tensors: list, alike: tuple[list, ...], masks: list | None, optional: bool) -> bool:
    """The common case of one native call: every tensor plain (no subclass, no DTensor),
    contiguous, of one kernel dtype and device; ``alike[j][i]`` exactly like ``tensors[i]``;
    ``masks[i]`` a contiguous bool tensor of its shape (or None when `optional`)."""
    try:
        first = tensors[0]
        dtype, device = first.dtype, first.device
        if dtype not in DTYPE_CODES:
            return False
        for i, t in enumerate(tensors):
            if not (
                type(t) in _PLAIN and t.dtype == dtype and t.device == device
                and t.is_contiguous()
            ):  # fmt: skip
                return False
            shape = t.shape
            for lst in alike:
                u = lst[i]
                if not (
                    type(u) in _PLAIN and u.dtype == dtype and u.shape == shape
                    and u.device == device and u.is_contiguous()
                ):  # fmt: skip
                    return False
            if masks is not None:
                m = masks[i]
                if m is None:
                    if not optional:
                        return False
                elif not (
                    type(m) in _PLAIN and m.dtype == torch.bool and m.shape == shape
                    and m.device == device and m.is_contiguous()
                ):  # fmt: skip
                    return False
        return True
    except (RuntimeError, AttributeError, IndexError):  # sparse, not a tensor...: the full checks
        return False


def _group(kind: str, params, grads, states: dict, masks) -> None:
    """One call's tensors: per-tensor checks plus one device and one dtype for the call."""
    for i, p in enumerate(params):
        step_inputs(
            f"params[{i}]", p, grads[i], tuple((k, s[i]) for k, s in states.items()), masks[i]
        )
        one_device_dtype(p, params[0], kind, f"params[{i}]", "params[0]")


def sgd_step(a: dict) -> None:
    params, grads, masks, first = a["params"], a["grads"], a["masks"], a["first"]
    states = {"momentum_buffer": a["momentum_buffers"]} if a["momentum"] != 0 else {}
    n = len(params)
    if len(grads) != n or len(masks) != n or len(first) != n or (
        states and len(a["momentum_buffers"]) != n
    ):  # fmt: skip
        bufs = {"momentum_buffers": a["momentum_buffers"]} if states else {}
        same_length(params=params, grads=grads, masks=masks, first=first, **bufs)
    if params and _plain(params, (grads, *states.values()), masks, True):
        return
    _group("sgd_step", params, grads, states, masks)


def adam_step(a: dict) -> None:
    params, grads, masks, step_list = a["params"], a["grads"], a["masks"], a["steps"]
    states = {"exp_avg": a["exp_avgs"], "exp_avg_sq": a["exp_avg_sqs"]}
    if a["amsgrad"]:
        states["max_exp_avg_sq"] = a["max_exp_avg_sqs"]
    n, ms, vs = len(params), a["exp_avgs"], a["exp_avg_sqs"]
    if (
        len(grads) != n or len(masks) != n or len(step_list) != n or len(ms) != n
        or len(vs) != n or (a["amsgrad"] and len(a["max_exp_avg_sqs"]) != n)
    ):  # fmt: skip
        names = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
        same_length(params=params, grads=grads, **dict(zip(names, states.values())),
                    masks=masks, steps=step_list)  # fmt: skip
    steps(step_list)
    if params and _plain(params, (grads, *states.values()), masks, True):
        return
    _group("adam_step", params, grads, states, masks)


def apply_mask(a: dict) -> None:
    tensors, masks = a["tensors"], a["masks"]
    same_length(tensors=tensors, masks=masks)
    if tensors and _plain(tensors, (), masks, False):
        return
    for i, (t, m) in enumerate(zip(tensors, masks)):
        name = f"tensors[{i}]"
        param(t, name)
        mask(m, t, name)
        like_layout(m, t, f"mask for {name}")
        one_device_dtype(t, tensors[0], "apply_mask", name, "tensors[0]")


def candidates(
    tensors: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    what: str,
    names: list[str] | None = None,
) -> None:
    """Tensors whose magnitudes are ranked: one dtype and device, dense, with values; masks
    bool and alike. `names` label the tensors in errors (default ``tensors[i]``)."""
    if not tensors:
        raise ValueError(f"{what}: expected at least one tensor, got an empty list")
    same_length(tensors=tensors, masks=masks)
    if _plain(tensors, (), masks, True) and tensors[0].device.type != "meta":
        return
    for i, (t, m) in enumerate(zip(tensors, masks)):
        name = names[i] if names is not None else f"tensors[{i}]"
        param(t, name)
        if t.device != tensors[0].device:
            raise ValueError(
                f"{what}: {name} is on {t.device} but tensors[0] is on {tensors[0].device}"
            )
        if t.dtype != tensors[0].dtype:
            raise TypeError(
                f"{what}: {name} is {t.dtype} but tensors[0] is {tensors[0].dtype}; "
                "rank magnitudes of one dtype per call"
            )
        if m is not None:
            mask(m, t, name)
            like_layout(m, t, f"mask for {name}")
    has_data(tensors[0], names[0] if names is not None else "tensors[0]")


def magnitude_histogram(a: dict) -> None:
    tensors = a["tensors"]
    candidates(tensors, a["masks"], "magnitude_histogram")
    histogram(a["hist"], a["bits"], tensors[0], a["shift"], a["prefix"], a["prefix_mask"])


def magnitude_histogram_batched(a: dict) -> None:
    tensors, prefixes, hist = a["tensors"], a["prefixes"], a["hist"]
    candidates(tensors, a["masks"], "magnitude_histogram_batched")
    same_length(tensors=tensors, prefixes=prefixes)
    n, bits = len(tensors), a["bits"]
    if not (isinstance(hist, torch.Tensor) and hist.dim() == 2 and hist.shape[0] == n):
        raise ValueError(f"hist: expected {n} rows (one per tensor) of {(1 << bits) + 1} int64")
    for i, prefix in enumerate(prefixes):
        histogram(hist[i], bits, tensors[0], a["shift"], prefix, a["prefix_mask"])
    if not hist.is_contiguous():
        raise ValueError("hist: must be contiguous (rows of 2**bits + 1 entries)")


def threshold_mask(a: dict) -> None:
    tensors, out = a["tensors"], a["out_masks"]
    candidates(tensors, a["old_masks"], "threshold_mask")
    same_length(tensors=tensors, out_masks=out)
    if not _plain(tensors, (), out, False):
        for i, (t, m) in enumerate(zip(tensors, out)):
            mask(m, t, f"out_masks[{i}]")
            like_layout(m, t, f"out_masks[{i}]")
    integer(a["t_key"], "t_key", 0, max_key(tensors[0].dtype))
    integer(a["ties_to_prune"], "ties_to_prune", 0, 2**63 - 1)


def rewind(a: dict) -> None:
    params, snapshots, masks, states = a["params"], a["snapshots"], a["masks"], a["states"]
    n = same_length(params=params, snapshots=snapshots, masks=masks)
    if n and len(states) % n:
        raise ValueError(f"states: {len(states)} tensors is not a multiple of {n} params")
    per = len(states) // n if n else 0
    by_param = tuple(states[k::per] for k in range(per)) if per else ()
    if n and _plain(params, (snapshots, *by_param), masks, True):
        return
    for i, p in enumerate(params):
        name = f"params[{i}]"
        param(p, name)
        like(snapshots[i], p, "snapshot", name)
        if masks[i] is not None:
            mask(masks[i], p, name)
            like_layout(masks[i], p, f"mask for {name}")
        for s in states[i * per : (i + 1) * per]:
            like(s, p, "optimizer state", name)
        one_device_dtype(p, params[0], "rewind", name, "params[0]")
