"""One unit across processes: ``torch.distributed`` support for DDP and FSDP2.

Every collective here is torch.distributed's own (all_reduce, all_gather, broadcast). Every
call is collective: all ranks of the group make it. What must agree (names, shapes, counts,
and whether each rank's inputs passed their checks) is gathered first, so a call made
differently on one rank raises on all of them, saying which rank, instead of hanging.

DDP (``DistributedDataParallel``, ``ddp_wrap``). Each rank holds the whole model and trains
on its rows of every global batch: ``cfg.batch_size`` split evenly over the ranks
(``shard_rows``; ``training.Level(shard=(rank, world))`` does it), so the global batches are
a single-process run's and the all-reduced gradient is their mean. Masks must be the same on
every rank: ``broadcast_masks`` sends rank 0's, ``check_same_masks`` fails loudly, on every
rank, naming the parameter and the ranks, when they differ. The masked optimizers step on
every rank (same gradients, same masks: same weights). Only ``is_writer()`` writes files.

FSDP2 (``torch.distributed.fsdp.fully_shard``). Parameters are DTensors sharded on dim 0
(``Shard(0)`` over a 1-D mesh: rank r holds a contiguous block of rows, the ranks in mesh
order). Two pieces:

- The masked step runs on the local shards, masks sharded like their parameter (DTensors of
  the same mesh and placements; a full mask given for a DTensor parameter is cut to the
  rank's rows, without communication). The update is elementwise, so the step on the local
  shards *is* the step on the global tensor: no communication and the compiled core's fused
  kernel unchanged (it sees plain local tensors and never links libtorch). The alternative,
  registering DTensor sharding strategies for the ``torch.ops.lottery_ext`` ops, would only
  serve compiled graphs (the eager step calls the core directly) and would tie us to DTensor's
  experimental registration API. The pure-PyTorch reference run on the DTensors (DTensor
  dispatch per op) works but measured ~50x slower than the fused kernel on the local shards
  (one Adam step of LeNet-300-100, 2 CPU ranks: 29 ms vs 0.6 ms).
- Magnitude thresholds are exact over all shards: every rank builds its radix histograms
  (``ops.magnitude_histogram``) over its shard, they are all-reduced between passes, so every
  rank selects the same key; ties at the threshold are then broken in one global order
  (tensor by tensor, within a tensor by rank, within a shard by flat index), which for
  row-sharded contiguous tensors is the single-process flat order: ``sharded_prune_smallest``
  gives exactly the masks ``prune_smallest`` gives on the gathered tensors.
  ``kth_smallest_magnitude``, ``prune_smallest``, ``prune_smallest_each`` and
  ``MagnitudePruner`` call these when handed DTensors.

Limits: FSDP2 with ``Shard(0)`` on a 1-D mesh only (no HSDP, no other shard dims); what needs
plain memory (``rewind``, the raw ``ops.*``) refuses a DTensor with a clear error; save
sharded masks with ``gather_masks`` (or torch.distributed.checkpoint).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import _ops, _radix, _select, _validate
from ._validate import is_dtensor

Tensor = torch.Tensor

__all__ = [
    "rank", "world_size", "is_distributed", "is_writer", "barrier", "shard_rows", "shard_batch",
    "ddp_wrap", "unwrap", "broadcast_masks", "check_same_masks", "check_same_tensors",
    "is_dtensor", "local", "shard_like", "gather_masks", "sharded_kth_smallest_magnitude",
    "sharded_prune_smallest", "sharded_prune_smallest_each",
]  # fmt: skip


# -- ranks -------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether a default process group is up (``torchrun`` + ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank in `group` (default: the world); 0 without a process group."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    """The number of ranks in `group` (default: the world); 1 without a process group."""
    return dist.get_world_size(group) if is_distributed() else 1


def is_writer() -> bool:
    """Whether this process writes files (results, checkpoints, masks): global rank 0, or
    the only process. The others compute the same things and write nothing."""
    return rank() == 0


def barrier(group=None) -> None:
    """Wait for every rank (a no-op without a process group), e.g. before reading a file
    rank 0 has just written."""
    if is_distributed():
        dist.barrier(group)


def _need_group(what: str) -> None:
    if not is_distributed():
        raise RuntimeError(
            f"{what}: no torch.distributed process group; start the processes with torchrun "
            "and call torch.distributed.init_process_group() first"
        )


def _comm_device(group) -> torch.device:
    """Where small tensors for collectives live: the current GPU under NCCL, else the CPU."""
    backend = dist.get_backend(group)
    if "nccl" in backend and "cpu:" not in backend:  # with "cpu:gloo,cuda:nccl", CPU is fine
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_(t: Tensor, group) -> None:
    """Sum `t` over the group in place (through the backend's device when it is not t's)."""
    dev = _comm_device(group)
    if t.device == dev:
        dist.all_reduce(t, group=group)
    else:
        tmp = t.to(dev)
        dist.all_reduce(tmp, group=group)
        t.copy_(tmp)


def _all_gather_ints(values: Sequence[int], group) -> list[list[int]]:
    """Each rank's `values` (the same length everywhere), by group rank."""
    dev = _comm_device(group)
    mine = torch.tensor(list(values), dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [o.tolist() for o in out]


def _agree(group, what: str, position: Any = None, **fields: Any) -> list[dict]:
    """Every rank's `fields` (small picklable values), checked equal to group rank 0's: a
    call made differently on some rank raises on all of them, naming the field and ranks,
    instead of hanging or mixing unrelated data. `position` (not compared: what differs by
    rank) rides along. Returns every rank's fields, by group rank."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(fields, position=position), group=group)
    for key in fields:
        bad = [r for r, f in enumerate(gathered) if f[key] != gathered[0][key]]
        if bad:
            raise ValueError(
                f"{what}: the ranks disagree on {key}: rank 0 has {gathered[0][key]!r}, rank "
                f"{bad[0]} has {gathered[bad[0]][key]!r} (every rank must make the same call)"
            )
    return gathered


# -- DDP: batches, wrapping ------------------------------------------------------------------


def shard_rows(batch_size: int, shard: tuple[int, int]) -> slice:
    """Rows ``[rank * b / world, (rank + 1) * b / world)`` of a global batch of
    ``batch_size`` rows: the rank's part. Refuses a batch size the world does not divide
    (the ranks' parts would differ in size, and their mean gradient from the global one)."""
    r, world = _validate.batch_shard(batch_size, shard)
    per = batch_size // world
    return slice(r * per, (r + 1) * per)


def shard_batch(batch: Any, rows: slice, batch_size: int) -> Any:
    """`rows` of a global batch: every tensor sliced on dim 0 (which must be `batch_size`
    long), tuples, lists and dicts shard by shard; a list of `batch_size` non-tensor items
    (strings from a collate) is sliced too; anything else is left as it is."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0 or batch.shape[0] != batch_size:
            raise ValueError(
                f"shard_batch: a batch tensor of shape {tuple(batch.shape)} has no dim 0 of "
                f"the global batch size {batch_size}: cannot take this rank's rows of it"
            )
        return batch[rows]
    if isinstance(batch, Mapping):
        return type(batch)({k: shard_batch(v, rows, batch_size) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        nested = any(isinstance(b, (Tensor, Mapping, list, tuple)) for b in batch)
        if not nested and len(batch) == batch_size:
            return batch[rows]
        items = [shard_batch(b, rows, batch_size) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def ddp_wrap(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model, **kwargs)``; on a GPU, ``device_ids`` default to the
    model's device. Wrap after the weights and masks are set: DDP broadcasts rank 0's
    parameters and buffers at construction. Train through the wrapper (its backward
    all-reduces the gradients); prune, rewind and save ``unwrap(wrapped)``."""
    _need_group("ddp_wrap")
    if "device_ids" not in kwargs:
        p = next(model.parameters(), None)
        if p is not None and p.device.type == "cuda":
            kwargs["device_ids"] = [p.device.index]
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (its state_dict has no ``module.`` prefix, so a
    checkpoint reads the same with and without DDP); any other model itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- masks the same on every rank (DDP) ------------------------------------------------------


def broadcast_masks(masks: Mapping[str, Tensor], src: int = 0, group=None) -> Mapping[str, Tensor]:
    """Overwrite every rank's masks with rank `src`'s, in place, and return them. Every rank
    passes masks of the same names, shapes and dtypes (a rank that has none yet passes
    ``torch.ones_like`` ones); a mismatch raises on every rank, naming the tensor. One
    broadcast of all masks as bytes."""
    _need_group("broadcast_masks")
    names = list(masks)
    for n in names:
        _check_mask(masks[n], n, "broadcast_masks")
    sig = [(n, tuple(masks[n].shape), str(masks[n].dtype)) for n in names]
    _agree_masks(sig, group, "broadcast_masks", src)
    if not names:
        return masks
    dev = _comm_device(group)
    flat = torch.cat([masks[n].reshape(-1).view(torch.uint8).to(dev) for n in names])
    dist.broadcast(flat, group=group, group_src=src)
    start = 0
    with torch.no_grad():
        for n in names:
            m = masks[n]
            chunk = flat[start : start + m.numel()].view(torch.bool).view(m.shape)
            m.copy_(chunk)  # logical order: right for any memory layout
            start += m.numel()
    return masks


def _check_mask(m: object, name: str, what: str) -> None:
    if not isinstance(m, Tensor):
        raise TypeError(f"{what}: mask {name!r} is a {type(m).__name__}, not a tensor")
    if m.dtype != torch.bool:
        raise TypeError(f"{what}: mask {name!r} is {m.dtype}, not torch.bool")
    if is_dtensor(m):
        raise TypeError(
            f"{what}: mask {name!r} is a DTensor: its ranks hold different parts, there is "
            "nothing to make equal (sharded masks are cut from full ones with shard_like)"
        )


def _agree_masks(sig: list, group, what: str, src: int = 0, kind: str = "masks") -> list:
    """Every rank's [(name, shape, dtype)], checked equal to rank `src`'s, naming the first
    tensor that differs."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, sig, group=group)
    ref = gathered[src]
    for r, other in enumerate(gathered):
        if other == ref:
            continue
        mine, theirs = dict((n, s) for n, *s in ref), dict((n, s) for n, *s in other)
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        if missing or extra:
            raise ValueError(
                f"{what}: rank {r} has {kind} for other tensors than rank {src}: missing "
                f"{missing[:5]}, unexpected {extra[:5]}"
            )
        for n, s in mine.items():
            if theirs[n] != s:
                raise ValueError(
                    f"{what}: {n!r} is {theirs[n][1]} of shape {theirs[n][0]} on rank "
                    f"{r} but {s[1]} of shape {s[0]} on rank {src}"
                )
        raise ValueError(f"{what}: rank {r} lists the {kind} in another order than rank {src}")
    return gathered


def _digest(t: Tensor) -> int:
    """A 63-bit SHA-256 digest of a tensor's values (logical order), shape and dtype."""
    t = t.detach()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    data = t.cpu().contiguous().reshape(-1)
    if data.numel():
        h.update(memoryview(data.view(torch.uint8).numpy()))
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_same_tensors(tensors: Mapping[str, Tensor], what: str = "tensors", group=None) -> None:
    """Raise ``RuntimeError`` on every rank when any tensor differs between ranks (by a
    SHA-256 of its bytes), naming the first that differs and the ranks that disagree with
    rank 0, e.g. ``check_same_tensors(dict(model.named_parameters()), "weights")`` after
    training a DDP unit: DDP replicas must stay bitwise equal."""
    _need_group(f"check_same_{what}")
    names = list(tensors)
    for n in names:
        if not isinstance(tensors[n], Tensor) or is_dtensor(tensors[n]):
            raise TypeError(f"check_same_{what}: {n!r} must be a plain (not sharded) tensor")
    sig = [(n, tuple(tensors[n].shape), str(tensors[n].dtype)) for n in names]
    _agree_masks(sig, group, f"check_same_{what}", kind=what)
    sums = _all_gather_ints([_digest(tensors[n]) for n in names], group)
    for i, n in enumerate(names):
        ranks = [r for r, s in enumerate(sums) if s[i] != sums[0][i]]
        if ranks:
            others = [m for j, m in enumerate(names) if any(s[j] != sums[0][j] for s in sums)]
            more = f" (and {len(others) - 1} more: {others[1:6]})" if len(others) > 1 else ""
            hint = " (broadcast_masks sends rank 0's)" if what == "masks" else ""
            raise RuntimeError(
                f"{what} differ across ranks: {n!r} on rank(s) {ranks} differs from rank 0's"
                f"{more}. The ranks have diverged; a DDP unit needs the same {what} on every "
                f"rank{hint}"
            )


def check_same_masks(masks: Mapping[str, Tensor], group=None) -> None:
    """Raise ``RuntimeError`` on every rank when the masks differ between ranks, naming the
    parameter and the ranks (SHA-256 of each mask's bytes, all-gathered)."""
    for n, m in masks.items():
        _check_mask(m, n, "check_same_masks")
    check_same_tensors(masks, "masks", group)


# -- DTensors (FSDP2) ----------------------------------------------------------------------------


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (sharing its memory); any other tensor itself."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def same_spec(a: Tensor, b: Tensor) -> bool:
    """Two DTensors laid out alike: same mesh, placements and global shape."""
    return a.device_mesh == b.device_mesh and a.placements == b.placements and a.shape == b.shape


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` (the whole tensor, the same on every rank) as a DTensor sharded like the
    DTensor `like`: each rank keeps its own part, no communication."""
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(full):
        return full
    if full.shape != like.shape:
        hint = ""
        if full.shape == like.to_local().shape:
            hint = (" (it has the shape of this rank's shard: give the whole tensor, or wrap "
                    "the shard with DTensor.from_local)")  # fmt: skip
        raise ValueError(
            f"shape {tuple(full.shape)} does not match the sharded tensor's {tuple(like.shape)}"
            + hint
        )
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)  # fmt: skip


def gather_masks(masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Whole masks from sharded ones (a collective: every rank gets them all), e.g. for
    rank 0 to save; plain masks are returned as they are."""
    return {n: m.full_tensor() if is_dtensor(m) else m for n, m in masks.items()}


def _sharded_inputs(tensors, masks, group, what: str, names):
    """(local tensors, local masks, group, this rank's position in the global order,
    DTensor templates or None, labels). DTensors must be Shard(0) over one 1-D mesh; plain
    tensors are this rank's shards, in group-rank order."""
    tensors = _select.as_list(tensors)
    masks = _select.as_masks(masks, len(tensors))
    labels = _select.labels(names, len(tensors))
    _validate.same_length(tensors=tensors, masks=masks)
    kinds = {is_dtensor(t) for t in tensors}
    if len(kinds) > 1:
        raise TypeError(f"{what}: a mix of DTensors and plain tensors; give one kind")
    if kinds == {True}:
        from torch.distributed.tensor import Shard

        mesh = tensors[0].device_mesh
        for t, label in zip(tensors, labels):
            if t.device_mesh != mesh:
                raise ValueError(f"{what}: {label} lives on another device mesh than {labels[0]}")
            if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
                raise ValueError(
                    f"{what}: {label} is placed {tuple(t.placements)} on a {mesh.ndim}-D mesh; "
                    "only Shard(0) over a 1-D mesh (FSDP2's default) has the single-process "
                    "flat order"
                )
        mesh_group = mesh.get_group()
        if group is not None and (
            dist.get_process_group_ranks(group) != dist.get_process_group_ranks(mesh_group)
        ):
            raise ValueError(f"{what}: group is not the process group of the tensors' mesh")
        group, position = mesh_group, mesh.get_local_rank()
        local_masks = []
        for t, m, label in zip(tensors, masks, labels):
            if m is not None:
                if not is_dtensor(m):
                    _validate.mask(m, t, label)
                    m = shard_like(m, t)
                elif not same_spec(m, t):
                    raise ValueError(f"{what}: the mask of {label} is not sharded like it")
                m = local(m)
            local_masks.append(m)
        return [local(t) for t in tensors], local_masks, group, position, tensors, labels
    _need_group(what)
    for m, label in zip(masks, labels):
        if is_dtensor(m):
            raise TypeError(f"{what}: the mask of {label} is a DTensor but the tensor is not")
    return tensors, masks, group, dist.get_rank(group), None, labels


def _prelude(tensors, masks, group, names, what, **args):
    """Inputs checked locally, then across ranks (the same call everywhere). Returns the
    local tensors and masks, the group, this rank's place in the global order, the DTensor
    templates (or None) and the labels."""
    locs, lmasks, group, position, templates, labels = _sharded_inputs(
        tensors, masks, group, what, names
    )
    refused = None  # a bad input on one rank is raised on every rank, not left to hang them
    try:
        _validate.candidates(locs, lmasks, what, labels)
        for i, t in enumerate(locs):
            if not t.is_contiguous():  # a shard's memory order is its place in the global order
                raise ValueError(f"{what}: the local shard of {labels[i]} is not contiguous")
    except (TypeError, ValueError) as e:
        refused = e
    gathered = _agree(group, what, (position, refused and str(refused)), n=len(locs),
                      dtype=str(locs[0].dtype) if locs else None,
                      device=locs[0].device.type if locs else None, **args)  # fmt: skip
    if refused is not None:
        raise refused
    for r, f in enumerate(gathered):
        if f["position"][1] is not None:
            raise ValueError(f"rank {r} refused its inputs: {f['position'][1]}")
    positions = [f["position"][0] for f in gathered]
    if sorted(positions) != list(range(len(positions))):
        raise ValueError(f"{what}: the ranks' shard positions {positions} are not 0..world-1")
    return locs, lmasks, group, position, templates, labels, positions


def _reducer(group):
    return lambda hist: _all_reduce_(hist, group)


def _local_ties(locs, lmasks, keys: list[int]) -> list[int]:
    """Per local tensor i: its candidates whose magnitude key is exactly keys[i], counted by
    one histogram pass with every higher digit fixed (the last radix pass)."""
    dtype, device = locs[0].dtype, locs[0].device
    shift, bits = _radix.passes(dtype, device)[-1]
    assert shift == 0  # the last pass ends at bit 0: its digit and the prefix fix every bit
    pmask = _radix.max_key(dtype) & ~((1 << bits) - 1)
    hist = torch.zeros((1 << bits) + 1, dtype=torch.int64, device=device)
    out = []
    for t, m, key in zip(locs, lmasks, keys):
        if t.numel() == 0:
            out.append(0)
            continue
        hist.zero_()
        _ops.magnitude_histogram([t], [m], shift, bits, key & pmask, pmask, hist)
        out.append(int(hist[key & ((1 << bits) - 1)]))
    return out


def _global_ties(group, positions: list[int], ties: list[int]) -> list[list[int]]:
    """Every rank's local tie counts, row p holding those of the rank at position p."""
    rows = [None] * len(positions)
    for r, counts in enumerate(_all_gather_ints(ties, group)):
        rows[positions[r]] = counts
    return rows


def _wrap(outs: list[Tensor], templates) -> list[Tensor]:
    """Local mask shards as DTensors sharded like the inputs (when those were DTensors)."""
    if templates is None:
        return outs
    from torch.distributed.tensor import DTensor

    return [DTensor.from_local(o, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
            for o, t in zip(outs, templates)]  # fmt: skip


def sharded_kth_smallest_magnitude(
    tensors: Tensor | Sequence[Tensor],
    k: int,
    masks: Tensor | Sequence[Tensor | None] | None = None,
    *,
    group=None,
    names: Sequence[str] | None = None,
) -> float:
    """The exact k-th smallest |w| over all shards of all tensors: what
    ``kth_smallest_magnitude`` gives on the gathered tensors, on every rank. `tensors`:
    DTensors (Shard(0), 1-D mesh; `group` is then their mesh's) or this rank's plain shards
    over `group`. `masks` restrict the candidates, sharded alike (or whole, for DTensors)."""
    k = _select.check_k(k)
    locs, lmasks, group, _, _, labels, _ = _prelude(
        tensors, masks, group, names, "sharded_kth_smallest_magnitude", k=k
    )
    key, _ = _select.select_key(locs, lmasks, k, labels, reduce=_reducer(group))
    return _radix.key_to_float(key, locs[0].dtype)


def sharded_prune_smallest(
    tensors: Tensor | Sequence[Tensor],
    count: int,
    masks: Tensor | Sequence[Tensor | None] | None = None,
    *,
    group=None,
    names: Sequence[str] | None = None,
) -> list[Tensor]:
    """Masks removing exactly `count` of the surviving weights over all shards of all
    tensors: the smallest magnitudes, ties broken by the global order (tensor, then rank,
    then flat index), i.e. ``prune_smallest`` on the gathered tensors. Returns this rank's
    mask shards (DTensors sharded like `tensors` when those are DTensors)."""
    count = _select.check_k(count, "count")
    locs, lmasks, group, me, templates, labels, positions = _prelude(
        tensors, masks, group, names, "sharded_prune_smallest", count=count
    )
    out, todo = _select.outputs(locs, lmasks, [count] * len(locs))
    if not todo:  # count 0: every mask as it was
        return _wrap(out, templates)
    key, below = _select.select_key(locs, lmasks, count, labels, reduce=_reducer(group))
    ties = _global_ties(group, positions, _local_ties(locs, lmasks, [key] * len(locs)))
    left = count - below  # ties to prune, in the global order
    with torch.no_grad():
        for i, (t, m, o) in enumerate(zip(locs, lmasks, out)):
            before = sum(sum(row[:i]) for row in ties) + sum(row[i] for row in ties[:me])
            q = min(max(left - before, 0), ties[me][i])
            _ops.threshold_mask([t], [m], [o], key, q)
    return _wrap(out, templates)


def sharded_prune_smallest_each(
    tensors: Sequence[Tensor],
    counts: Sequence[int],
    masks: Sequence[Tensor | None] | None = None,
    *,
    group=None,
    names: Sequence[str] | None = None,
) -> list[Tensor]:
    """``sharded_prune_smallest`` for every tensor on its own (per-layer pruning: each its
    own count over its shards), all thresholds selected together (one all-reduce of the
    batched histograms per radix pass)."""
    counts = [_select.check_k(c, f"counts[{i}]") for i, c in enumerate(counts)]
    locs, lmasks, group, me, templates, labels, positions = _prelude(
        tensors, masks, group, names, "sharded_prune_smallest_each", counts=counts
    )
    if len(counts) != len(locs):
        raise ValueError(f"{len(counts)} counts for {len(locs)} tensors")
    out, todo = _select.outputs(locs, lmasks, counts)
    if todo:
        keys = _select.select_keys([locs[i] for i in todo], [lmasks[i] for i in todo],
                                     [counts[i] for i in todo], [labels[i] for i in todo],
                                     reduce=_reducer(group))  # fmt: skip
        local_ties = _local_ties([locs[i] for i in todo], [lmasks[i] for i in todo],
                                 [key for key, _ in keys])  # fmt: skip
        ties = _global_ties(group, positions, local_ties)
        with torch.no_grad():
            for j, (i, (key, below)) in enumerate(zip(todo, keys)):
                before = sum(row[j] for row in ties[:me])  # this tensor's ties on earlier ranks
                q = min(max(counts[i] - below - before, 0), ties[me][j])
                _ops.threshold_mask([locs[i]], [lmasks[i]], [out[i]], key, q)
    return _wrap(out, templates)
