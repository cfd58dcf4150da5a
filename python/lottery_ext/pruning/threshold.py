"""Exact magnitude thresholds and exact-count masks over one tensor or a list of tensors,
without concatenating or copying them.

The k-th smallest |w| is found by radix selection on the bit patterns of |w| (sign cleared:
ordered like |w| for every non-NaN value, ±0 and ±inf included): one histogram pass per
16-bit digit, most significant first (2 passes for float32, 4 for float64, 1 for 16-bit),
each counting only the elements whose higher digits match those already selected. The
histogram pass is its own op (``lottery_ext.ops.magnitude_histogram``) so that a sharded
model can all-reduce the histograms between passes and get the exact global threshold: given
DTensors, the functions here hand over to ``lottery_ext.distributed``, which does that.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

from .. import _ops
from ..distributed import is_dtensor

Tensor = torch.Tensor

# (shift, bits) of each radix pass, most significant digit first. The CPU takes 16-bit digits
# (per-thread histograms of 64K bins, L2-resident); the GPU keeps its histograms in shared
# memory, so digits of at most 11 bits.
PASSES = {
    torch.float32: ((15, 16), (0, 15)),
    torch.float64: ((47, 16), (31, 16), (15, 16), (0, 15)),
    torch.float16: ((0, 15),),
    torch.bfloat16: ((0, 15),),
}
GPU_PASSES = {
    torch.float32: ((20, 11), (10, 10), (0, 10)),
    torch.float64: ((52, 11), (41, 11), (30, 11), (20, 10), (10, 10), (0, 10)),
    torch.float16: ((4, 11), (0, 4)),
    torch.bfloat16: ((4, 11), (0, 4)),
}


def passes(dtype: torch.dtype, device: torch.device) -> tuple[tuple[int, int], ...]:
    return GPU_PASSES[dtype] if device.type == "cuda" else PASSES[dtype]


def key_to_float(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose bit pattern (sign cleared) is `key`."""
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", key))[0]
    if dtype == torch.float64:
        return struct.unpack("<d", struct.pack("<Q", key))[0]
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<H", key))[0]
    return struct.unpack("<f", struct.pack("<I", key << 16))[0]  # bfloat16


def _as_list(tensors: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def _as_masks(masks, n: int) -> list[Tensor | None]:
    if masks is None:
        return [None] * n
    return [masks] if isinstance(masks, Tensor) else list(masks)


def count_candidates(tensors: list[Tensor], masks: list[Tensor | None]) -> int:
    return sum(t.numel() if m is None else int(m.sum()) for t, m in zip(tensors, masks))


def _sharded(tensors: list[Tensor]) -> bool:
    """DTensors (FSDP2 shards): the exact global answer comes from ``lottery_ext.distributed``
    (a collective call: every rank of their mesh makes it)."""
    return any(is_dtensor(t) for t in tensors)


def _names(names: Sequence[str] | None, n: int) -> list[str]:
    if names is None:
        return [f"tensors[{i}]" for i in range(n)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"names: {len(names)} names for {n} tensors")
    return names


def select_key(
    tensors: list[Tensor],
    masks: list[Tensor | None],
    k: int,
    names: list[str] | None = None,
    reduce=None,
) -> tuple[int, int]:
    """(key of the k-th smallest candidate magnitude, number of candidates below that key).
    Inputs must be validated (``_ops._check_candidates``). ``reduce(hist)``, when given,
    sums each pass's histogram over the shards in place (``lottery_ext.distributed``)."""
    dtype, device = tensors[0].dtype, tensors[0].device
    prefix = prefix_mask = below = 0
    for i, (shift, bits) in enumerate(passes(dtype, device)):
        hist = torch.zeros((1 << bits) + 1, dtype=torch.int64, device=device)
        _ops._launch_magnitude_histogram(tensors, masks, shift, bits, prefix, prefix_mask, hist)
        if reduce is not None:
            reduce(hist)
        counts = hist[:-1]
        if i == 0:
            nans = int(hist[-1])
            if nans:
                where = [n for n, t in zip(_names(names, len(tensors)), tensors)
                         if bool(torch.isnan(t.detach()).any())]  # fmt: skip
                where = where or ["a shard on another rank"]  # sharded: reduced counts
                raise ValueError(
                    f"{', '.join(where)}: {nans} NaN value(s) among the candidate weights; no "
                    "magnitude threshold exists (did training diverge?)"
                )
            total = int(counts.sum())
            if not 1 <= k <= total:
                raise ValueError(f"k={k} is out of range: there are {total} candidate weights")
        cum = counts.cumsum(0)
        digit = int(torch.searchsorted(cum, torch.tensor(k - below, device=device)))
        below += int(cum[digit - 1]) if digit else 0
        prefix |= digit << shift
        prefix_mask |= ((1 << bits) - 1) << shift
    return prefix, below


def select_keys(
    tensors: list[Tensor],
    masks: list[Tensor | None],
    ks: list[int],
    names: list[str],
    reduce=None,
) -> list[tuple[int, int]]:
    """Per tensor i, on its own: (key of its ks[i]-th smallest candidate magnitude, number of
    its candidates below that key). One batched histogram per radix pass for all tensors (one
    GPU launch each). Inputs must be validated (``_ops._check_candidates``). ``reduce`` as
    in ``select_key``."""
    n = len(tensors)
    dtype, device = tensors[0].dtype, tensors[0].device
    prefixes, below, prefix_mask = [0] * n, [0] * n, 0
    for i, (shift, bits) in enumerate(passes(dtype, device)):
        hist = torch.zeros(n, (1 << bits) + 1, dtype=torch.int64, device=device)
        _ops._launch_magnitude_histogram_batched(
            tensors, masks, shift, bits, prefixes, prefix_mask, hist
        )
        if reduce is not None:
            reduce(hist)
        counts = hist[:, :-1]
        if i == 0:
            nans, totals = hist[:, -1].tolist(), counts.sum(1).tolist()
            for j, (nan, total, k) in enumerate(zip(nans, totals, ks)):
                if nan:
                    raise ValueError(
                        f"{names[j]}: {nan} NaN value(s) among the candidate weights; no "
                        "magnitude threshold exists (did training diverge?)"
                    )
                if not 1 <= k <= total:
                    raise ValueError(f"{names[j]}: count {k} is out of range: {total} candidates")
        cum = counts.cumsum(1)
        target = torch.tensor([k - b for k, b in zip(ks, below)], device=device).unsqueeze(1)
        digits = torch.searchsorted(cum, target).squeeze(1)
        prev = cum.gather(1, (digits - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        prev = torch.where(digits > 0, prev, 0)
        for j, (d, p) in enumerate(zip(digits.tolist(), prev.tolist())):
            below[j] += p
            prefixes[j] |= d << shift
        prefix_mask |= ((1 << bits) - 1) << shift
    return list(zip(prefixes, below))


def prune_smallest_each(
    tensors: Sequence[Tensor],
    counts: Sequence[int],
    masks: Sequence[Tensor | None] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> list[Tensor]:
    """``prune_smallest`` applied to every tensor on its own (each its own count: per-layer
    pruning), with the thresholds of all tensors selected together (batched histograms).
    ``names`` label the tensors in error messages (default ``tensors[i]``)."""
    tensors = _as_list(tensors)
    if _sharded(tensors):
        from ..distributed import sharded_prune_smallest_each

        return sharded_prune_smallest_each(tensors, counts, masks, names=names)
    masks = _as_masks(masks, len(tensors))
    labels = _names(names, len(tensors))
    _ops._check_candidates(tensors, masks, "prune_smallest_each", labels)
    counts = [_check_k(c, f"counts[{i}]") for i, c in enumerate(counts)]
    if len(counts) != len(tensors):
        raise ValueError(f"{len(counts)} counts for {len(tensors)} tensors")
    out = [torch.empty_like(t, dtype=torch.bool) for t in tensors]
    todo = [i for i, c in enumerate(counts) if c > 0]
    for i in set(range(len(tensors))) - set(todo):
        out[i].copy_(True if masks[i] is None else masks[i])
    if todo:
        keys = select_keys([tensors[i] for i in todo], [masks[i] for i in todo],
                           [counts[i] for i in todo], [labels[i] for i in todo])  # fmt: skip
        with torch.no_grad():
            for i, (key, below) in zip(todo, keys):
                _ops._launch_threshold_mask([tensors[i]], [masks[i]], [out[i]], key,
                                            counts[i] - below)  # fmt: skip
    return out


def _check_k(k: object, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    return k


def kth_smallest_magnitude(
    tensors: Tensor | Sequence[Tensor],
    k: int,
    masks: Tensor | Sequence[Tensor | None] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> float:
    """The exact k-th smallest |w| (1-indexed) over one tensor or a list of tensors, as
    ``torch.kthvalue(torch.cat([t.flatten().abs() for t in tensors]), k)`` would give, without
    concatenating or copying them. ``masks`` (bool, like each tensor) restricts the candidates
    to surviving entries. NaN anywhere among the candidates raises ``ValueError`` naming the
    tensor (``names``, default ``tensors[i]``)."""
    tensors = _as_list(tensors)
    if _sharded(tensors):
        from ..distributed import sharded_kth_smallest_magnitude

        return sharded_kth_smallest_magnitude(tensors, k, masks, names=names)
    masks = _as_masks(masks, len(tensors))
    labels = _names(names, len(tensors))
    _ops._check_candidates(tensors, masks, "kth_smallest_magnitude", labels)
    k = _check_k(k)
    key, _ = select_key(tensors, masks, k, labels)
    return key_to_float(key, tensors[0].dtype)


def prune_smallest(
    tensors: Tensor | Sequence[Tensor],
    count: int,
    masks: Tensor | Sequence[Tensor | None] | None = None,
    *,
    names: Sequence[str] | None = None,
) -> list[Tensor]:
    """New masks that remove exactly `count` of the surviving weights: the smallest
    magnitudes, ties at the threshold broken by flat (memory) index over the list, lowest
    first. Already-pruned weights stay pruned. Returns one bool tensor per input tensor."""
    tensors = _as_list(tensors)
    if _sharded(tensors):
        from ..distributed import sharded_prune_smallest

        return sharded_prune_smallest(tensors, count, masks, names=names)
    masks = _as_masks(masks, len(tensors))
    labels = _names(names, len(tensors))
    _ops._check_candidates(tensors, masks, "prune_smallest", labels)
    count = _check_k(count, "count")
    out = [torch.empty_like(t, dtype=torch.bool) for t in tensors]
    if count == 0:
        for o, m in zip(out, masks):
            o.copy_(True if m is None else m)
        return out
    key, below = select_key(tensors, masks, count, labels)  # checks 1 <= count <= candidates
    with torch.no_grad():
        _ops._launch_threshold_mask(tensors, masks, out, key, count - below)
    return out


__all__ = [
    "kth_smallest_magnitude",
    "prune_smallest",
    "prune_smallest_each",
    "count_candidates",
    "key_to_float",
]
