"""The ops: validated entry points, the launch onto the compiled core (or the reference),
and their ``torch.library`` registrations (``torch.ops.lottery_ext.*``) with fake kernels so
they compose with ``torch.compile``.

Each op exists as:
- ``<op>(...)``: public, validates (``_validate``) then launches;
- ``_launch_<op>(...)``: no checks, for callers that validated already (the optimizers);
- ``torch.ops.lottery_ext.<op>``: the custom op, whose kernel is ``<op>(...)``.

``torch.ops.lottery_ext.kth_smallest_magnitude`` is registered beside its kernel, in
``pruning/threshold.py`` (it is built on these ops, so registering it here would make this
module import its own caller).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from . import _native, _radix, _reference, _validate

Tensor = torch.Tensor
_force_reference = False


@contextlib.contextmanager
def reference_backend() -> Iterator[None]:
    """Run every op on the pure-PyTorch reference inside this block (tests, debugging)."""
    global _force_reference
    old, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = old


def uses_native(device: torch.device) -> bool:
    """Whether ops on `device` run on compiled kernels (else on ``_reference``).

    CUDA tensors need a build with CUDA kernels: with a CPU-only build they raise (rather
    than silently running the slow reference), saying how to rebuild."""
    if _native.core is None or _force_reference:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        if not _native.cuda:
            raise RuntimeError(
                "lottery_ext was built without CUDA kernels but got CUDA tensors. Rebuild with a "
                "CUDA compiler on PATH: `LOTTERY_EXT_CUDA=ON pip install --no-build-isolation "
                "--force-reinstall .` (or run on the pure-PyTorch path inside "
                "`lottery_ext.ops.reference_backend()`)"
            )
        return True
    return False


def _where(device: torch.device) -> tuple[int, int]:
    """(device index, stream) arguments of the core: (-1, 0) on the CPU; on CUDA the
    tensors' device and the caller's current stream on it."""
    if device.type == "cpu":
        return -1, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _bump(*lists: Sequence[Tensor | None]) -> None:
    """Tell autograd that the native kernels wrote these tensors, as torch's in-place ops
    do: a tensor saved for backward and changed since then raises torch's "modified by an
    inplace operation" error instead of being used stale."""
    torch.autograd.graph.increment_version([t for ts in lists for t in ts if t is not None])


def _ptrs(tensors: Sequence[Tensor | None]) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


def _numels(tensors: Sequence[Tensor]) -> list[int]:
    return [t.numel() for t in tensors]


# ---------------------------------------------------------------------------------------------
# launches (no checks)


def _launch_sgd_step(
    params, grads, momentum_buffers, masks, first, lr, momentum, dampening, weight_decay,
    nesterov, maximize,
) -> None:  # fmt: skip
    if not params:
        return
    if uses_native(params[0].device):
        _native.core.sgd_step(
            _radix.DTYPE_CODES[params[0].dtype], _ptrs(params), _ptrs(grads),
            _ptrs(momentum_buffers) if momentum != 0 else [0] * len(params), _ptrs(masks),
            _numels(params), [bool(f) for f in first], lr, momentum, dampening, weight_decay,
            nesterov, maximize, torch.get_num_threads(), *_where(params[0].device),
        )  # fmt: skip
        _bump(params, momentum_buffers if momentum != 0 else ())
    else:
        _reference.sgd_step_(
            params, grads, momentum_buffers, masks, first, lr=lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
        )  # fmt: skip


def _launch_adam_step(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, steps, lr, beta1, beta2, eps,
    weight_decay, amsgrad, maximize, decoupled,
) -> None:  # fmt: skip
    if not params:
        return
    if uses_native(params[0].device):
        _native.core.adam_step(
            _radix.DTYPE_CODES[params[0].dtype], _ptrs(params), _ptrs(grads), _ptrs(exp_avgs),
            _ptrs(exp_avg_sqs), _ptrs(max_exp_avg_sqs) if amsgrad else [], _ptrs(masks),
            _numels(params), _ptrs(steps), lr, beta1, beta2, eps, weight_decay, amsgrad,
            maximize, decoupled, torch.get_num_threads(), *_where(params[0].device),
        )  # fmt: skip
        _bump(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else (), steps)
    else:
        _reference.adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, steps, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, decoupled=decoupled,
        )  # fmt: skip


def _launch_apply_mask(tensors, masks) -> None:
    if not tensors:
        return
    if uses_native(tensors[0].device):
        _native.core.apply_mask(
            _radix.DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(masks),
            _numels(tensors), torch.get_num_threads(), *_where(tensors[0].device),
        )  # fmt: skip
        _bump(tensors)
    else:
        _reference.apply_mask_(tensors, masks)


def _launch_magnitude_histogram(tensors, masks, shift, bits, prefix, prefix_mask, hist) -> None:
    if uses_native(tensors[0].device):
        _native.core.magnitude_histogram(
            _radix.DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(masks),
            _numels(tensors), shift, bits, prefix, prefix_mask, hist.data_ptr(),
            torch.get_num_threads(), *_where(tensors[0].device),
        )  # fmt: skip
        _bump([hist])
    else:
        _reference.magnitude_histogram_(tensors, masks, shift, bits, prefix, prefix_mask, hist)


def _launch_magnitude_histogram_batched(tensors, masks, shift, bits, prefixes, prefix_mask, hist):
    """Row i of `hist` (n x (2**bits + 1)) gets tensor i's histogram for its own prefix."""
    if uses_native(tensors[0].device):
        _native.core.magnitude_histogram_batched(
            _radix.DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(masks),
            _numels(tensors), shift, bits, list(prefixes), prefix_mask, hist.data_ptr(),
            torch.get_num_threads(), *_where(tensors[0].device),
        )  # fmt: skip
        _bump([hist])
    else:
        for i, (t, m, prefix) in enumerate(zip(tensors, masks, prefixes)):
            _reference.magnitude_histogram_([t], [m], shift, bits, prefix, prefix_mask, hist[i])


def _launch_threshold_mask(tensors, old_masks, out_masks, t_key, ties_to_prune) -> None:
    device = tensors[0].device
    if uses_native(device):
        numels = _numels(tensors)
        scratch, nbytes = None, 0
        if device.type == "cuda" and ties_to_prune:  # tie ranks: device scratch owned by torch
            nbytes = _native.core.threshold_mask_scratch_bytes(numels)
            scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _native.core.threshold_mask(
            _radix.DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(old_masks),
            _ptrs(out_masks), numels, t_key, ties_to_prune,
            0 if scratch is None else scratch.data_ptr(), nbytes, torch.get_num_threads(),
            *_where(device),
        )  # fmt: skip
        _bump(out_masks)
    else:
        _reference.threshold_mask_(tensors, old_masks, out_masks, t_key, ties_to_prune)


def _launch_rewind(params, snapshots, masks, states) -> None:
    """states: per tensor, the same number of buffers (lists may hold None for absent ones)."""
    if not params:
        return
    if uses_native(params[0].device):
        per = len(states[0]) if states else 0
        _native.core.rewind(
            _radix.DTYPE_CODES[params[0].dtype], _ptrs(params), _ptrs(snapshots),
            _ptrs(masks), [x for st in states for x in _ptrs(st)], per, _numels(params),
            torch.get_num_threads(), *_where(params[0].device),
        )  # fmt: skip
        _bump(params, [x for st in states for x in st])
    else:
        present = [[b for b in st if b is not None] for st in states]
        _reference.rewind_(params, snapshots, masks, present)


# ---------------------------------------------------------------------------------------------
# validated entry points


def _check_group(kind: str, params: Sequence[Tensor], grads, states, masks) -> None:
    """One call's tensors: per-tensor checks plus one device and one dtype for the call."""
    for i, p in enumerate(params):
        _validate.step_inputs(
            f"params[{i}]", p, grads[i], tuple((k, s[i]) for k, s in states.items()), masks[i]
        )
        _validate.one_device_dtype(p, params[0], kind, f"params[{i}]", "params[0]")


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    first: Sequence[bool],
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """Fused masked SGD update of a list of tensors, in place (see ``MaskedSGD``)."""
    _validate.finite(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    if momentum != 0:
        _validate.same_length(
            params=params, grads=grads, momentum_buffers=momentum_buffers, masks=masks, first=first
        )
        states = {"momentum_buffer": momentum_buffers}
    else:
        _validate.same_length(params=params, grads=grads, masks=masks, first=first)
        states = {}
    _check_group("sgd_step", params, grads, states, masks)
    with torch.no_grad():
        _launch_sgd_step(
            params, grads, momentum_buffers, masks, first, lr, momentum, dampening,
            weight_decay, nesterov, maximize,
        )  # fmt: skip


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    steps: Sequence[Tensor],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled: bool = False,
) -> None:
    """Fused masked Adam/AdamW update of a list of tensors, in place (see ``MaskedAdam``).
    ``steps`` are one-element float32 CPU tensors, incremented by the op."""
    _validate.finite(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    lists = dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    states = {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
        states["max_exp_avg_sq"] = max_exp_avg_sqs
    _validate.same_length(**lists, masks=masks, steps=steps)
    _validate.steps(list(steps))
    _check_group("adam_step", params, grads, states, masks)
    with torch.no_grad():
        _launch_adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, steps, lr, beta1,
            beta2, eps, weight_decay, amsgrad, maximize, decoupled,
        )  # fmt: skip


def apply_mask(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Zero, in place, the entries of each tensor where its mask is False."""
    _validate.same_length(tensors=tensors, masks=masks)
    for i, (t, m) in enumerate(zip(tensors, masks)):
        name = f"tensors[{i}]"
        _validate.param(t, name)
        _validate.mask(m, t, name)
        _validate.like_layout(m, t, f"mask for {name}")
        _validate.one_device_dtype(t, tensors[0], "apply_mask", name, "tensors[0]")
    with torch.no_grad():
        _launch_apply_mask(tensors, masks)


def _check_candidates(
    tensors: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    what: str,
    names: Sequence[str] | None = None,
):
    """Tensors whose magnitudes are ranked: one dtype and device, dense, with values; masks
    bool and alike. `names` label the tensors in errors (default ``tensors[i]``)."""
    if not tensors:
        raise ValueError(f"{what}: expected at least one tensor, got an empty list")
    _validate.same_length(tensors=tensors, masks=masks)
    for i, (t, m) in enumerate(zip(tensors, masks)):
        name = names[i] if names is not None else f"tensors[{i}]"
        _validate.param(t, name)
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
            _validate.mask(m, t, name)
            _validate.like_layout(m, t, f"mask for {name}")
    _validate.has_data(tensors[0], names[0] if names is not None else "tensors[0]")


def magnitude_histogram(
    tensors: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    shift: int,
    bits: int,
    prefix: int,
    prefix_mask: int,
    hist: Tensor,
) -> None:
    """One radix pass: ``hist[d] += #candidates with (key & prefix_mask) == prefix and digit
    (key >> shift) & (2**bits - 1) == d``; ``hist[-1] +=`` #NaN candidates. ``key`` is |x|'s
    bit pattern with the sign cleared. ``hist``: int64, 2**bits + 1 entries, on the
    tensors' device.
    Kept separate so sharded callers can all-reduce ``hist`` between passes."""
    _check_candidates(tensors, masks, "magnitude_histogram")
    _validate.histogram(hist, bits, tensors[0], shift, prefix, prefix_mask)
    _launch_magnitude_histogram(tensors, masks, shift, bits, prefix, prefix_mask, hist)


def threshold_mask(
    tensors: Sequence[Tensor],
    old_masks: Sequence[Tensor | None],
    out_masks: Sequence[Tensor],
    t_key: int,
    ties_to_prune: int,
) -> None:
    """``out = candidate & (key > t_key or (key == t_key and not among the first
    ties_to_prune ties in flat memory order over the list))``; ``out`` may be ``old``."""
    _check_candidates(tensors, old_masks, "threshold_mask")
    _validate.same_length(tensors=tensors, out_masks=out_masks)
    for i, (t, m) in enumerate(zip(tensors, out_masks)):
        _validate.mask(m, t, f"out_masks[{i}]")
        _validate.like_layout(m, t, f"out_masks[{i}]")
    _validate.integer(t_key, "t_key", 0, _radix.max_key(tensors[0].dtype))
    _validate.integer(ties_to_prune, "ties_to_prune", 0, 2**63 - 1)
    with torch.no_grad():
        _launch_threshold_mask(tensors, old_masks, out_masks, t_key, ties_to_prune)


def rewind_tensors(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    states: Sequence[Tensor] = (),
) -> None:
    """``params[i] = snapshots[i]`` where ``masks[i]`` (everywhere if None) else 0, and
    every tensor of ``states`` (optimizer buffers, ``len(params) * S`` of them, tensor-major:
    the S buffers of params[0] first) zeroed, in one pass per tensor."""
    n = _validate.same_length(params=params, snapshots=snapshots, masks=masks)
    if n and len(states) % n:
        raise ValueError(f"states: {len(states)} tensors is not a multiple of {n} params")
    per = len(states) // n if n else 0
    for i, p in enumerate(params):
        name = f"params[{i}]"
        _validate.param(p, name)
        _validate.like(snapshots[i], p, "snapshot", name)
        if masks[i] is not None:
            _validate.mask(masks[i], p, name)
            _validate.like_layout(masks[i], p, f"mask for {name}")
        for s in states[i * per : (i + 1) * per]:
            _validate.like(s, p, "optimizer state", name)
        _validate.one_device_dtype(p, params[0], "rewind", name, "params[0]")
    with torch.no_grad():
        _launch_rewind(
            list(params), list(snapshots), list(masks),
            [list(states[i * per : (i + 1) * per]) for i in range(n)],
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# torch.library registrations: torch.ops.lottery_ext.*


@torch.library.custom_op("lottery_ext::sgd_step_", mutates_args=("params", "momentum_buffers"))
def _sgd_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    masks: list[Tensor | None],
    first: list[bool],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    sgd_step(
        params, grads, momentum_buffers, masks, first, lr, momentum, dampening, weight_decay,
        nesterov, maximize,
    )  # fmt: skip


@_sgd_step_op.register_fake
def _(params, grads, momentum_buffers, masks, first, lr, momentum, dampening, weight_decay,
      nesterov, maximize) -> None:  # fmt: skip
    return None


@torch.library.custom_op(
    "lottery_ext::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
)
def _adam_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    masks: list[Tensor | None],
    steps: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> None:
    adam_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, steps, lr, beta1, beta2,
        eps, weight_decay, amsgrad, maximize, decoupled,
    )  # fmt: skip


@_adam_step_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masks, steps, lr, beta1, beta2,
      eps, weight_decay, amsgrad, maximize, decoupled) -> None:  # fmt: skip
    return None


@torch.library.custom_op("lottery_ext::apply_mask_", mutates_args=("tensors",))
def _apply_mask_op(tensors: list[Tensor], masks: list[Tensor]) -> None:
    apply_mask(tensors, masks)


@_apply_mask_op.register_fake
def _(tensors, masks) -> None:
    return None


@torch.library.custom_op("lottery_ext::magnitude_histogram_", mutates_args=("hist",))
def _magnitude_histogram_op(
    tensors: list[Tensor],
    masks: list[Tensor | None],
    shift: int,
    bits: int,
    prefix: int,
    prefix_mask: int,
    hist: Tensor,
) -> None:
    magnitude_histogram(tensors, masks, shift, bits, prefix, prefix_mask, hist)


@_magnitude_histogram_op.register_fake
def _(tensors, masks, shift, bits, prefix, prefix_mask, hist) -> None:
    return None


@torch.library.custom_op("lottery_ext::threshold_mask_", mutates_args=("out_masks",))
def _threshold_mask_op(
    tensors: list[Tensor],
    old_masks: list[Tensor | None],
    out_masks: list[Tensor],
    t_key: int,
    ties_to_prune: int,
) -> None:
    threshold_mask(tensors, old_masks, out_masks, t_key, ties_to_prune)


@_threshold_mask_op.register_fake
def _(tensors, old_masks, out_masks, t_key, ties_to_prune) -> None:
    return None


@torch.library.custom_op("lottery_ext::rewind_", mutates_args=("params", "states"))
def _rewind_op(
    params: list[Tensor], snapshots: list[Tensor], masks: list[Tensor | None], states: list[Tensor]
) -> None:
    rewind_tensors(params, snapshots, masks, states)


@_rewind_op.register_fake
def _(params, snapshots, masks, states) -> None:
    return None
