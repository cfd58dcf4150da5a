"""Radix selection of magnitude keys over a list of tensors (plain tensors or one rank's
shards), on the histogram launch of ``_ops``: the engine under ``pruning.threshold`` and
``distributed``, kept below both so neither imports the other to reach it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ops
from ._radix import passes

Tensor = torch.Tensor


def as_list(tensors: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """One tensor or a sequence of them, as a list."""
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def as_masks(masks, n: int) -> list[Tensor | None]:
    """None (no masks), one mask or a sequence of them, as a list of `n` entries."""
    if masks is None:
        return [None] * n
    return [masks] if isinstance(masks, Tensor) else list(masks)


def labels(names: Sequence[str] | None, n: int) -> list[str]:
    """The names that label `n` tensors in errors (default ``tensors[i]``)."""
    if names is None:
        return [f"tensors[{i}]" for i in range(n)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"names: {len(names)} names for {n} tensors")
    return names


def outputs(
    tensors: list[Tensor], masks: list[Tensor | None], counts: list[int]
) -> tuple[list[Tensor], list[int]]:
    """The new masks of tensors losing ``counts[i]`` weights each, and the indices with
    anything to prune: a tensor losing none keeps its mask (all True without one). A negative
    count is left to the selection, which refuses it as out of range."""
    out = [torch.empty_like(t, dtype=torch.bool) for t in tensors]
    todo = [i for i, c in enumerate(counts) if c != 0]
    for i in set(range(len(tensors))) - set(todo):
        out[i].copy_(True if masks[i] is None else masks[i])
    return out, todo


def check_k(k: object, name: str = "k") -> int:
    """`k` as an int (a bool or a non-int raises ``TypeError``)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    return k


def select_key(
    tensors: list[Tensor],
    masks: list[Tensor | None],
    k: int,
    names: list[str] | None = None,
    reduce=None,
) -> tuple[int, int]:
    """(key of the k-th smallest candidate magnitude, number of candidates below that key).
    Inputs must be validated (``_validate.candidates``). ``reduce(hist)``, when given,
    sums each pass's histogram over the shards in place (``lottery_ext.distributed``)."""
    dtype, device = tensors[0].dtype, tensors[0].device
    prefix = prefix_mask = below = 0
    for i, (shift, bits) in enumerate(passes(dtype, device)):
        hist = torch.zeros((1 << bits) + 1, dtype=torch.int64, device=device)
        _ops.magnitude_histogram(tensors, masks, shift, bits, prefix, prefix_mask, hist)
        if reduce is not None:
            reduce(hist)
        counts = hist[:-1]
        if i == 0:
            nans = int(hist[-1])
            if nans:
                where = [n for n, t in zip(labels(names, len(tensors)), tensors)
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
    GPU launch each). Inputs must be validated (``_validate.candidates``). ``reduce`` as
    in ``select_key``."""
    n = len(tensors)
    dtype, device = tensors[0].dtype, tensors[0].device
    prefixes, below, prefix_mask = [0] * n, [0] * n, 0
    for i, (shift, bits) in enumerate(passes(dtype, device)):
        hist = torch.zeros(n, (1 << bits) + 1, dtype=torch.int64, device=device)
        _ops.magnitude_histogram_batched(tensors, masks, shift, bits, prefixes, prefix_mask, hist)
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
