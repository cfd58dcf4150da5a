"""Every input check of the package, and its error message.

Nothing reaches the compiled core without passing through here. Errors name the offending
tensor (a parameter's name when the optimizer knows it, else its role and index) and say
what was expected. ``TypeError`` for a wrong kind of thing (dtype, sparse, complex),
``ValueError`` for a wrong value (shape, device, layout, NaN hyper-parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# dtype -> code understood by csrc/include/lottery/macros.h (lottery::DType)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

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
    """Same element order in memory (strides of size-1 dimensions do not matter)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def dtype_code(t: torch.Tensor, name: str) -> int:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        if t.is_complex():
            raise TypeError(f"{name}: complex tensors are not supported (got {t.dtype})")
        raise TypeError(
            f"{name}: dtype {t.dtype} is not supported; use float32, float64, float16 or bfloat16"
        )
    return code


def param(p: torch.Tensor, name: str) -> int:
    """A tensor the kernels update in place. Returns its dtype code."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
    if p.layout != torch.strided:
        raise TypeError(f"{name}: only dense (strided) tensors are supported, got {p.layout}")
    code = dtype_code(p, name)
    if not is_dense(p):
        raise ValueError(
            f"{name}: the kernels need a tensor whose elements fill one block of memory "
            f"(contiguous or a permutation of it); got {_describe(p)}. "
            "Call .contiguous() on it before handing it over."
        )
    return code


def like(t: torch.Tensor | None, p: torch.Tensor, what: str, name: str) -> None:
    """`t` must have exactly `p`'s dtype, device, shape and memory layout."""
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


def finite(**hparams: float) -> None:
    """Hyper-parameters must be finite real numbers (torch.optim lets NaN momentum through)."""
    for key, value in hparams.items():
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{key} must be a Python float, not a Tensor")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{key} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")


def step_inputs(
    name: str,
    p: torch.Tensor,
    g: torch.Tensor,
    states: tuple[tuple[str, torch.Tensor], ...],
    m: torch.Tensor | None,
) -> int:
    """All tensors one parameter's fused update touches. Returns the dtype code."""
    code = param(p, name)
    like(g, p, "gradient", name)
    for what, s in states:
        like(s, p, f"optimizer state '{what}'", name)
    if m is not None:
        mask(m, p, name)
        like_layout(m, p, f"mask for {name}")
    return code


def like_layout(t: torch.Tensor, p: torch.Tensor, what: str) -> None:
    if not same_layout(t, p):
        raise ValueError(
            f"{what}: memory layout (strides {t.stride()}) differs from the tensor's "
            f"(strides {p.stride()})"
        )


def fast_ok(p: torch.Tensor, g: torch.Tensor) -> bool:
    """Cheap per-step test of the common case: gradient exactly like its contiguous param.
    When it fails, the caller runs the full `step_inputs` check for a precise message."""
    return (
        g.dtype == p.dtype
        and g.shape == p.shape
        and not g.is_sparse
        and g.device == p.device
        and p.is_contiguous()
        and g.is_contiguous()
    )


def same_length(**lists: list) -> int:
    lengths = {k: len(v) for k, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tensor lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def steps(step_tensors: list[torch.Tensor]) -> None:
    for i, s in enumerate(step_tensors):
        if not (
            isinstance(s, torch.Tensor)
            and s.dtype == torch.float32
            and s.device.type == "cpu"
            and s.numel() == 1
        ):
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
    if not (1 <= bits <= max_bits):
        raise ValueError(f"bits must be in [1, {max_bits}] on {like.device.type}, got {bits}")
    if hist.device != like.device or not hist.is_contiguous() or hist.numel() != (1 << bits) + 1:
        raise ValueError(
            f"hist: expected a contiguous tensor of {(1 << bits) + 1} entries on {like.device}"
        )
    key_bits = {torch.float32: 31, torch.float64: 63, torch.float16: 15, torch.bfloat16: 15}
    if not (0 <= shift and shift + bits <= key_bits[dtype]):
        raise ValueError(f"shift {shift} + bits {bits} exceed the {key_bits[dtype]}-bit key")
    if prefix < 0 or pmask < 0 or prefix & ~pmask:
        raise ValueError("prefix must be a non-negative subset of prefix_mask")


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
