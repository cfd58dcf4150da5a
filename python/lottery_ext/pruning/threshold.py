"""Exact magnitude thresholds and exact-count masks over one tensor or a list of tensors,
without concatenating or copying them.

The k-th smallest |w| is found by radix selection on the bit patterns of |w| (sign cleared:
ordered like |w| for every non-NaN value, ±0 and ±inf included): one histogram pass per
digit, most significant first, each counting only the elements whose higher digits match
those already selected. The digit widths are per device (``_radix.passes``): 16 bits on the
CPU (2 passes for float32, 4 for float64, 1 for 16-bit), at most 11 on CUDA (3, 6 and 2).
The selection itself is ``lottery_ext._select``, shared with ``lottery_ext.distributed``.
The histogram pass is its own op (``lottery_ext.ops.magnitude_histogram``) so that a sharded
model can all-reduce the histograms between passes and get the exact global threshold: given
DTensors, the functions here hand over to ``lottery_ext.distributed``, which does that.

``torch.ops.lottery_ext.kth_smallest_magnitude`` is registered here, beside its kernel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _ops, _validate
from .._radix import key_to_float
from .._select import as_list as _as_list
from .._select import as_masks as _as_masks
from .._select import check_k as _check_k
from .._select import labels as _names
from .._select import outputs, select_key, select_keys
from ..distributed import (
    sharded_kth_smallest_magnitude,
    sharded_prune_smallest,
    sharded_prune_smallest_each,
)

Tensor = torch.Tensor


def count_candidates(tensors: list[Tensor], masks: list[Tensor | None]) -> int:
    return sum(t.numel() if m is None else int(m.sum()) for t, m in zip(tensors, masks))


def _sharded(tensors: list[Tensor]) -> bool:
    """DTensors (FSDP2 shards): the exact global answer comes from ``lottery_ext.distributed``
    (a collective call: every rank of their mesh makes it)."""
    return any(_validate.is_dtensor(t) for t in tensors)


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
        return sharded_prune_smallest_each(tensors, counts, masks, names=names)
    masks = _as_masks(masks, len(tensors))
    labels = _names(names, len(tensors))
    _validate.candidates(tensors, masks, "prune_smallest_each", labels)
    counts = [_check_k(c, f"counts[{i}]") for i, c in enumerate(counts)]
    if len(counts) != len(tensors):
        raise ValueError(f"{len(counts)} counts for {len(tensors)} tensors")
    out, todo = outputs(tensors, masks, counts)
    if todo:
        keys = select_keys([tensors[i] for i in todo], [masks[i] for i in todo],
                           [counts[i] for i in todo], [labels[i] for i in todo])  # fmt: skip
        with torch.no_grad():
            for i, (key, below) in zip(todo, keys):
                _ops.threshold_mask([tensors[i]], [masks[i]], [out[i]], key, counts[i] - below)
    return out


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
        return sharded_kth_smallest_magnitude(tensors, k, masks, names=names)
    masks = _as_masks(masks, len(tensors))
    labels = _names(names, len(tensors))
    _validate.candidates(tensors, masks, "kth_smallest_magnitude", labels)
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
        return sharded_prune_smallest(tensors, count, masks, names=names)
    masks = _as_masks(masks, len(tensors))
    labels = _names(names, len(tensors))
    _validate.candidates(tensors, masks, "prune_smallest", labels)
    count = _check_k(count, "count")
    out, todo = outputs(tensors, masks, [count] * len(tensors))
    if not todo:  # count 0: every mask as it was
        return out
    key, below = select_key(tensors, masks, count, labels)  # checks 1 <= count <= candidates
    with torch.no_grad():
        _ops.threshold_mask(tensors, masks, out, key, count - below)
    return out


# torch.ops.lottery_ext.kth_smallest_magnitude (the other ops are registered in _ops.py)


@torch.library.custom_op("lottery_ext::kth_smallest_magnitude", mutates_args=())
def _kth_smallest_magnitude_op(tensors: list[Tensor], k: int, masks: list[Tensor | None]) -> Tensor:
    value = kth_smallest_magnitude(tensors, k, masks)
    return torch.tensor(value, dtype=tensors[0].dtype, device=tensors[0].device)


@_kth_smallest_magnitude_op.register_fake
def _(tensors, k, masks) -> Tensor:
    return tensors[0].new_empty(())


def _kth_setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output)  # a threshold carries no gradient


_kth_smallest_magnitude_op.register_autograd(
    lambda ctx, grad: (None, None, None), setup_context=_kth_setup_context
)


__all__ = [
    "kth_smallest_magnitude",
    "prune_smallest",
    "prune_smallest_each",
    "count_candidates",
    "key_to_float",
]
