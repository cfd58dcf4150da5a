"""Exact magnitude selection: ``kth_smallest_magnitude``, ``prune_smallest`` and the radix ops
behind them (``ops.magnitude_histogram``, ``ops.threshold_mask``, ``torch.ops.lottery_ext.*``).

Every result is compared exactly against an independent oracle: ``torch.kthvalue`` on the
concatenated magnitudes for the threshold, and a stable ``torch.sort`` of the candidate
magnitudes in flat memory order for the exact-count masks."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch

import lottery_ext
from lottery_ext import _ops, kth_smallest_magnitude, ops, prune_smallest
from lottery_ext._reference import flat

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]
INF, NAN = float("inf"), float("nan")
KEY_BITS = {torch.float32: 31, torch.float64: 63, torch.float16: 15, torch.bfloat16: 15}

needs_native = pytest.mark.skipif(
    not lottery_ext.build_info()["native"], reason="compiled core not loaded"
)


# ---------------------------------------------------------------------------------------------
# oracles


def oracle_kth(tensors, k, masks=None) -> float:
    """torch.kthvalue over the concatenated candidate magnitudes, in float64."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    masks = [None] * len(tensors) if masks is None else list(masks)
    vals = [
        (t.detach().cpu().flatten() if m is None else t.detach().cpu()[m.cpu()]).abs().double()
        for t, m in zip(tensors, masks)
    ]
    return float(torch.kthvalue(torch.cat(vals), k).values)


def oracle_prune(tensors, count, masks=None) -> list[torch.Tensor]:
    """Expected masks: candidates ranked by (|w|, flat memory index over the list) with a stable
    sort; the first `count` are pruned. Returned in each tensor's own layout."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    masks = [None] * len(tensors) if masks is None else list(masks)
    mags, alive = [], []
    for t, m in zip(tensors, masks):
        mags.append(flat(t.cpu()).abs().double())
        alive.append(
            torch.ones(t.numel(), dtype=torch.bool) if m is None else flat(m.cpu()).clone()
        )
    mags, alive = torch.cat(mags), torch.cat(alive)
    idx = torch.arange(alive.numel())[alive]
    order = torch.sort(mags[alive], stable=True).indices
    alive[idx[order[:count]]] = False
    out, offset = [], 0
    for t in tensors:
        e = torch.empty_strided(t.shape, t.stride(), dtype=torch.bool)
        flat(e).copy_(alive[offset : offset + t.numel()])
        offset += t.numel()
        out.append(e)
    return out


def n_candidates(tensors, masks=None) -> int:
    masks = [None] * len(tensors) if masks is None else masks
    return sum(t.numel() if m is None else int(m.sum()) for t, m in zip(tensors, masks))


def assert_prune_ok(tensors, count, masks=None, out=None):
    """prune_smallest(...) == oracle, removes exactly `count` survivors, revives nothing."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if out is None:
        out = prune_smallest(tensors, count, masks)
    masks_l = [None] * len(tensors) if masks is None else list(masks)
    expected = oracle_prune(tensors, count, masks_l)
    assert len(out) == len(tensors)
    removed = 0
    for i, (o, e, t, m) in enumerate(zip(out, expected, tensors, masks_l)):
        assert o.dtype == torch.bool and o.shape == t.shape and o.device == t.device, i
        o = o.cpu()
        assert torch.equal(o, e), (i, count)
        if m is not None:
            assert not (o & ~m.cpu()).any(), ("revived", i)
            removed += int(m.sum()) - int(o.sum())
        else:
            removed += t.numel() - int(o.sum())
    assert removed == count
    return out


def py_key(x: float, dtype: torch.dtype) -> int:
    """|x|'s bit pattern with the sign cleared, via struct (independent of the library)."""
    if dtype == torch.float32:
        return struct.unpack("<I", struct.pack("<f", x))[0] & 0x7FFFFFFF
    if dtype == torch.float64:
        return struct.unpack("<Q", struct.pack("<d", x))[0] & 0x7FFFFFFFFFFFFFFF
    if dtype == torch.float16:
        return struct.unpack("<H", struct.pack("<e", x))[0] & 0x7FFF
    return (struct.unpack("<I", struct.pack("<f", x))[0] >> 16) & 0x7FFF  # bfloat16


# ---------------------------------------------------------------------------------------------
# data


def special_pool(dtype) -> list[float]:
    """Extreme magnitudes of `dtype`: zeros, subnormals, smallest normal, max, inf."""
    fi = torch.finfo(dtype)
    sub = fi.smallest_normal * fi.eps  # smallest subnormal
    pool = [0.0, -0.0, sub, -sub, 3 * sub, fi.smallest_normal, fi.max, -fi.max, INF, -INF]
    pool += [1.0, -1.0, 0.5, fi.max / 2, fi.smallest_normal / 2]
    if dtype == torch.float32:
        pool += [1e-40, -1e-40, 3.4028234663852886e38]
    elif dtype == torch.float64:
        pool += [5e-324, -5e-324, 1e-310]
    elif dtype == torch.float16:
        pool += [2.0**-24, 6.1e-05, 65504.0]
    else:
        pool += [2.0**-133, 3.3895313892515355e38]
    return pool


def gen_values(shape, dtype, kind: str, g: torch.Generator) -> torch.Tensor:
    n = torch.Size(shape).numel()
    if kind == "randn":
        scale = torch.exp(torch.empty(shape).uniform_(-4, 4, generator=g))
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    if kind == "ties":  # values from {-3..3}: heavy ties, ±0 among them
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    if kind == "equal":
        sign = torch.rand(shape, generator=g) < 0.5
        return torch.where(sign, -0.75, 0.75).to(dtype)
    if kind == "close":  # differ only in the lowest mantissa bits: exercises the last pass
        eps = torch.finfo(dtype).eps
        steps = torch.randint(0, 5, shape, generator=g).to(torch.float64)
        base = (1 + steps * eps).to(dtype)
        sign = torch.rand(shape, generator=g) < 0.5
        return torch.where(sign, -base, base)
    if kind == "special":
        pool = torch.tensor(special_pool(dtype), dtype=torch.float64).to(dtype)
        pick = pool[torch.randint(0, len(pool), (n,), generator=g)].reshape(shape)
        rnd = torch.randn(shape, generator=g).to(dtype)
        return torch.where(torch.rand(shape, generator=g) < 0.7, pick, rnd)
    raise AssertionError(kind)


KINDS = ["randn", "ties", "equal", "close", "special"]


def random_shape(g: torch.Generator, allow_empty=True):
    ndim = int(torch.randint(0, 4, (1,), generator=g))
    lo = 0 if allow_empty else 1
    dims = [int(d) for d in torch.randint(lo, 8, (ndim,), generator=g)]
    if allow_empty and float(torch.rand(1, generator=g)) < 0.85:
        dims = [max(d, 1) for d in dims]  # empty tensors now and then only
    return tuple(dims)


def random_case(g, dtype, n_tensors, kind, mask_kind, transpose=False):
    """(tensors, masks): mask_kind in none / random / mixed (None or all-False for some) /
    one (exactly one candidate overall)."""
    shapes = [random_shape(g) for _ in range(n_tensors)]
    tensors = []
    for s in shapes:
        if transpose and len(s) == 2 and float(torch.rand(1, generator=g)) < 0.5:
            tensors.append(gen_values(s[::-1], dtype, kind, g).t())  # dense, not contiguous
        else:
            tensors.append(gen_values(s, dtype, kind, g))
    if mask_kind == "none":
        return tensors, None
    masks = []
    for i, t in enumerate(tensors):
        m = torch.empty_strided(t.shape, t.stride(), dtype=torch.bool)
        m.copy_(torch.rand(t.shape, generator=g) < 0.6)
        if mask_kind == "mixed" and i % 3 == 1:
            m = None
        elif mask_kind == "mixed" and i % 3 == 2:
            m.fill_(False)
        masks.append(m)
    if mask_kind == "one":
        for m in masks:
            m.fill_(False)
        nonempty = [i for i, t in enumerate(tensors) if t.numel()]
        if nonempty:
            i = nonempty[int(torch.randint(0, len(nonempty), (1,), generator=g))]
            j = int(torch.randint(0, tensors[i].numel(), (1,), generator=g))
            flat(masks[i])[j] = True
    return tensors, masks


def ks_for(n: int, g: torch.Generator) -> list[int]:
    if n < 1:
        return []
    ks = {1, 2, n // 3, n - 1, n} | {int(k) for k in torch.randint(1, n + 1, (3,), generator=g)}
    return sorted(k for k in ks if 1 <= k <= n)


# total > 2 * 32768 (csrc/cpu/parallel.h kMinPerThread): several parts, part edges falling
# inside tensors, tiny and empty tensors in between.
MANY = [(1000,), (0,), (17, 3), (5000,), (1,), (40000,), (63,), (64, 65), (30011,), (2, 0)] + [
    (97 * (i + 1),) for i in range(30)
]
assert sum(torch.Size(s).numel() for s in MANY) > 2 * 32768


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread unless a test asks for more: the inputs here are small (the kernels
    use one part below 2 * 32768 elements anyway) and torch's OpenMP regions on a loaded
    2-core machine cost more than they save. Tests of the threaded split set their counts."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# 1. kth_smallest_magnitude == torch.kthvalue


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_kth_matches_kthvalue(dtype, kind):
    g = torch.Generator().manual_seed(1234 + KINDS.index(kind))
    cases = [
        [gen_values((1,), dtype, kind, g)],
        [gen_values((), dtype, kind, g)],  # 0-dim
        [gen_values((7,), dtype, kind, g)],
        [gen_values((3, 5, 2), dtype, kind, g)],
        [gen_values((0,), dtype, kind, g), gen_values((13,), dtype, kind, g)],
        [gen_values((64, 65), dtype, kind, g)],
    ]
    for n in (1, 2, 5, 20):
        cases.append([gen_values(random_shape(g), dtype, kind, g) for _ in range(n)])
    checked = 0
    for tensors in cases:
        n = sum(t.numel() for t in tensors)
        for k in ks_for(n, g):
            got = kth_smallest_magnitude(tensors, k)
            assert isinstance(got, float)
            exp = oracle_kth(tensors, k)
            assert got == exp, (k, n, got, exp)
            checked += 1
        if len(tensors) == 1 and n:
            assert kth_smallest_magnitude(tensors[0], n) == oracle_kth(tensors, n)
    assert checked > 30


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_kth_extreme_values(dtype):
    fi = torch.finfo(dtype)
    sub = fi.smallest_normal * fi.eps
    pool = special_pool(dtype)
    t = torch.tensor(pool, dtype=torch.float64).to(dtype)
    # the extreme values really are there (no flush to zero / overflow on construction)
    assert float(t[2]) == sub and sub > 0 and float(t[6]) == fi.max and float(t[8]) == INF
    perm = torch.randperm(t.numel())
    for tensors in ([t], [t[perm]], [t[:5], t[5:9], t[9:]]):
        for k in range(1, t.numel() + 1):
            assert kth_smallest_magnitude(tensors, k) == oracle_kth(tensors, k), k
    # explicit: ±0 are both 0, the smallest subnormal comes right after, inf is the largest
    assert kth_smallest_magnitude(t, 1) == 0.0 and kth_smallest_magnitude(t, 2) == 0.0
    assert kth_smallest_magnitude(t, 3) == sub
    assert kth_smallest_magnitude(t, t.numel()) == INF
    z = torch.tensor([-0.0, 0.0, -0.0], dtype=dtype)
    assert [kth_smallest_magnitude(z, k) for k in (1, 2, 3)] == [0.0, 0.0, 0.0]
    top = torch.tensor([-fi.max, fi.max, -INF, fi.max / 2], dtype=dtype)
    assert [kth_smallest_magnitude(top, k) for k in (1, 2, 3, 4)] == [
        float(torch.tensor(fi.max / 2, dtype=dtype)),
        fi.max,
        fi.max,
        INF,
    ]


def test_kth_denormal_literals():
    cases = [
        (torch.float32, [1e-40, -2e-40, 1e-45, 0.0, 3.0]),
        (torch.float64, [5e-324, -1e-320, 2.2e-308, 0.0, 3.0]),
        (torch.float16, [2.0**-24, -(2.0**-23), 2.0**-14, 0.0, 3.0]),
        (torch.bfloat16, [2.0**-133, -(2.0**-130), 2.0**-126, 0.0, 3.0]),
    ]
    for dtype, vals in cases:
        t = torch.tensor(vals, dtype=torch.float64).to(dtype)
        assert (t[:3] != 0).all(), dtype
        exp = sorted(abs(float(v)) for v in t)
        assert [kth_smallest_magnitude(t, k) for k in range(1, 6)] == exp, dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask_kind", ["random", "mixed", "one"])
def test_kth_with_masks(dtype, mask_kind):
    g = torch.Generator().manual_seed(99 + ["random", "mixed", "one"].index(mask_kind))
    checked = 0
    for trial in range(12):
        kind = KINDS[trial % len(KINDS)]
        tensors, masks = random_case(g, dtype, 1 + trial % 7, kind, mask_kind, transpose=True)
        n = n_candidates(tensors, masks)
        if mask_kind == "one":
            assert n == (1 if any(t.numel() for t in tensors) else 0)
        for k in ks_for(n, g):
            assert kth_smallest_magnitude(tensors, k, masks) == oracle_kth(tensors, k, masks)
            checked += 1
        if n < sum(t.numel() for t in tensors):
            with pytest.raises(ValueError, match="out of range"):
                kth_smallest_magnitude(tensors, n + 1, masks)
    assert checked >= 12


def test_kth_masks_select_candidates():
    t = torch.tensor([5.0, -1.0, 3.0, 0.5, -2.0])
    m = torch.tensor([True, False, True, False, True])
    assert [kth_smallest_magnitude(t, k, m) for k in (1, 2, 3)] == [2.0, 3.0, 5.0]
    assert kth_smallest_magnitude([t, t], 1, [m, None]) == 0.5
    # a whole tensor masked out, and a single candidate left
    a, b = torch.tensor([0.1, 0.2]), torch.tensor([7.0, -9.0, 8.0])
    assert kth_smallest_magnitude([a, b], 1, [torch.zeros(2, dtype=torch.bool), None]) == 7.0
    one = torch.tensor([False, True, False])
    assert kth_smallest_magnitude([a, b], 1, [torch.zeros(2, dtype=torch.bool), one]) == 9.0
    # NaN outside the candidates does not matter
    x = torch.tensor([NAN, 4.0, -NAN, 2.0])
    assert kth_smallest_magnitude(x, 2, torch.tensor([False, True, False, True])) == 4.0


def test_kth_list_of_views_and_duplicates():
    base = torch.randn(50)
    views = [base[3:10], base[10:11], base.view(5, 10)[1:3], base]
    assert views[0].storage_offset() == 3
    n = sum(v.numel() for v in views)
    for k in (1, 7, n // 2, n):
        assert kth_smallest_magnitude(views, k) == oracle_kth(views, k)
    # odd strides on size-1 dimensions are still dense
    odd = torch.randn(4, 6).t().unsqueeze(1)
    assert not odd.is_contiguous()
    for k in range(1, odd.numel() + 1, 5):
        assert kth_smallest_magnitude([odd], k) == oracle_kth([odd], k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_kth_large_multithreaded(dtype):
    g = torch.Generator().manual_seed(7)
    tensors = [gen_values(s, dtype, ["randn", "ties"][i % 2], g) for i, s in enumerate(MANY)]
    masks = [None if i % 4 == 0 else torch.rand(s, generator=g) < 0.8 for i, s in enumerate(MANY)]
    n, nm = sum(t.numel() for t in tensors), n_candidates(tensors, masks)
    ks = [1, 2, n // 3, n // 2 + 1, n - 1, n]
    kms = [1, nm // 3, nm // 2, nm]
    results = {}
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        assert lottery_ext.build_info()["threads"] == threads
        results[threads] = [kth_smallest_magnitude(tensors, k) for k in ks] + [
            kth_smallest_magnitude(tensors, k, masks) for k in kms
        ]
    exp = [oracle_kth(tensors, k) for k in ks] + [oracle_kth(tensors, k, masks) for k in kms]
    for threads, got in results.items():
        assert got == exp, threads


# ---------------------------------------------------------------------------------------------
# 3. prune_smallest == stable-argsort oracle


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_prune_matches_oracle(dtype, kind):
    g = torch.Generator().manual_seed(4321 + KINDS.index(kind))
    for trial, mask_kind in enumerate(["none", "random", "mixed", "one", "random", "none"]):
        tensors, masks = random_case(g, dtype, 1 + 3 * trial, kind, mask_kind, transpose=True)
        n = n_candidates(tensors, masks)
        for count in sorted({0, 1, n // 2, n - 1, n} | set(ks_for(n, g))):
            if 0 <= count <= n:
                assert_prune_ok(tensors, count, masks)


def test_prune_all_and_none():
    t = torch.tensor([[3.0, -1.0], [0.0, 2.0]])
    m = torch.tensor([[True, False], [True, True]])
    assert torch.equal(prune_smallest(t, 0)[0], torch.ones(2, 2, dtype=torch.bool))
    assert torch.equal(prune_smallest(t, 4)[0], torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(prune_smallest(t, 3, m)[0], torch.zeros(2, 2, dtype=torch.bool))
    # count=0 with masks: equal copies, not aliases
    out = prune_smallest([t, t], 0, [m, None])
    assert torch.equal(out[0], m) and torch.equal(out[1], torch.ones(2, 2, dtype=torch.bool))
    assert out[0] is not m and out[0].data_ptr() != m.data_ptr()
    out[0].fill_(False)
    assert m.sum() == 3
    # count > 0: masks are new tensors, the old ones are untouched
    before = m.clone()
    out = prune_smallest(t, 1, m)
    assert torch.equal(m, before) and out[0].data_ptr() != m.data_ptr()
    assert torch.equal(out[0], torch.tensor([[True, False], [False, True]]))


def test_prune_ties_broken_by_flat_index():
    # all equal: the lowest flat indices go first, across the list
    a, b = torch.ones(5), -torch.ones(3)
    out = prune_smallest([a, b], 6)
    assert torch.equal(out[0], torch.zeros(5, dtype=torch.bool))
    assert torch.equal(out[1], torch.tensor([False, True, True]))
    # ±0 tie; the mask decides what is a candidate (ties count candidates only)
    z = torch.tensor([0.0, -0.0, 5.0, -0.0, 0.0])
    assert torch.equal(prune_smallest(z, 2)[0], torch.tensor([False, False, True, True, True]))
    zm = torch.tensor([True, False, True, True, True])
    assert torch.equal(prune_smallest(z, 2, zm)[0], torch.tensor([False, False, True, False, True]))
    # ties at the threshold only: strictly smaller values always go
    v = torch.tensor([2.0, 1.0, -2.0, 2.0, 0.5, -2.0])
    assert torch.equal(
        prune_smallest(v, 3)[0], torch.tensor([False, False, True, True, False, True])
    )
    # already-pruned weights stay pruned even when they are the largest
    big = torch.tensor([100.0, 1.0, 2.0, 3.0])
    mb = torch.tensor([False, True, True, True])
    assert torch.equal(prune_smallest(big, 1, mb)[0], torch.tensor([False, False, True, True]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_prune_transposed_uses_memory_order(dtype):
    base = torch.ones(2, 3, dtype=dtype)
    t = base.t()  # shape (3, 2); t[i, j] lives at memory offset 3 * j + i
    assert not t.is_contiguous() and torch.equal(flat(t), base.flatten())
    out = prune_smallest(t, 2)[0]
    # memory offsets 0, 1 are t[0, 0] and t[1, 0]
    assert torch.equal(out, torch.tensor([[False, True], [False, True], [True, True]]))
    # random heavy ties, transposed + contiguous in one list, against the flat-order oracle
    g = torch.Generator().manual_seed(5)
    x = gen_values((7, 9), dtype, "ties", g).t()
    y = gen_values((11,), dtype, "ties", g)
    z = gen_values((4, 3, 5), dtype, "ties", g).permute(2, 0, 1)
    total = 63 + 11 + 60
    for count in range(0, total + 1, 7):
        masks = assert_prune_ok([x, y, z], count)
        # the masks it returns can be fed back (same layout): iterative pruning
        assert_prune_ok([x, y, z], min(10, total - count), masks)
    # the oracle is really order-sensitive here: logical order would give another answer
    logical = torch.cat([x.flatten(), y, z.flatten()]).abs().double()
    memory = torch.cat([flat(x), y, flat(z)]).abs().double()
    assert not torch.equal(logical, memory)
    # channels_last, with a channels_last mask that is a view at a storage offset
    cl = gen_values((2, 3, 4, 5), dtype, "ties", g).to(memory_format=torch.channels_last)
    big = torch.rand(3, 2, 3, 4, 5, generator=g) < 0.7
    m = big.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)[1]
    assert m.storage_offset() > 0 and m.stride() == cl.stride() and not cl.is_contiguous()
    n = int(m.sum())
    for count in (0, 1, n // 3, n // 2, n - 1, n):
        assert_prune_ok([y, cl], count, [None, m])
        assert kth_smallest_magnitude([cl], max(count, 1), [m]) == oracle_kth(
            [cl], max(count, 1), [m]
        )


def test_prune_iterative_matches_one_shot_oracle():
    g = torch.Generator().manual_seed(11)
    tensors = [gen_values(s, torch.float32, "ties", g) for s in [(10, 10), (37,), (5, 2, 3)]]
    masks = None
    total = sum(t.numel() for t in tensors)
    remaining = total
    for step in (13, 20, 1, 40, 0, 30):
        before = masks
        masks = prune_smallest(tensors, step, masks)
        assert_prune_ok(tensors, step, before, out=masks)
        remaining -= step
        assert sum(int(m.sum()) for m in masks) == remaining
    # with ties, successive rounds give the same masks as one round of the total
    one_shot = prune_smallest(tensors, total - remaining)
    for a, b in zip(masks, one_shot):
        assert torch.equal(a, b)


def test_prune_global_vs_per_tensor():
    a = torch.tensor([0.1, -0.2, 0.3, 0.4])
    b = torch.tensor([10.0, -20.0, 30.0, 40.0])
    glob = prune_smallest([a, b], 4)
    assert torch.equal(glob[0], torch.zeros(4, dtype=torch.bool))
    assert torch.equal(glob[1], torch.ones(4, dtype=torch.bool))
    per = [prune_smallest(t, 2)[0] for t in (a, b)]
    assert torch.equal(per[0], torch.tensor([False, False, True, True]))
    assert torch.equal(per[1], torch.tensor([False, False, True, True]))
    # a single tensor is a list of one
    g = torch.Generator().manual_seed(3)
    x = gen_values((9, 4), torch.float64, "ties", g)
    m = torch.rand(9, 4, generator=g) < 0.5
    for c in range(0, int(m.sum()) + 1, 3):
        assert torch.equal(prune_smallest(x, c, m)[0], prune_smallest([x], c, [m])[0])
        assert_prune_ok([x], c, [m])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_prune_large_multithreaded(dtype):
    # heavy ties everywhere: the ties at the threshold straddle every part boundary
    g = torch.Generator().manual_seed(8)
    shapes = MANY + [(70_000,)]
    tensors = [gen_values(s, dtype, "ties", g) for s in shapes]
    masks = [None if i % 5 == 0 else torch.rand(s, generator=g) < 0.9 for i, s in enumerate(shapes)]
    n = n_candidates(tensors, masks)
    assert sum(t.numel() for t in tensors) > 4 * 32768
    counts = [1, n // 7, n // 2 + 3, n - 1]
    results = {}
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        results[threads] = [prune_smallest(tensors, c, masks) for c in counts]
    for c, out in zip(counts, results[1]):
        assert_prune_ok(tensors, c, masks, out=out)
    for threads in (2, 3, 4):
        for c, a, b in zip(counts, results[1], results[threads]):
            for i, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y), (threads, c, i)


# ---------------------------------------------------------------------------------------------
# 2. compiled core == pure-PyTorch reference


def _both(fn):
    """fn() on the compiled core (2 threads: lists over 2 * 32768 elements are split) and on
    the reference (1 thread: it is only the oracle)."""
    torch.set_num_threads(2)
    native = fn()
    torch.set_num_threads(1)
    with _ops.reference_backend():
        assert not _ops.uses_native(torch.device("cpu"))
        ref = fn()
    assert _ops.uses_native(torch.device("cpu"))
    return native, ref


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_native_matches_reference_kth_and_prune(dtype):
    g = torch.Generator().manual_seed(21)
    kinds = [("randn", "none"), ("ties", "mixed"), ("special", "random"), ("close", "none")]
    cases = [random_case(g, dtype, 8, kind, mk, transpose=True) for kind, mk in kinds]
    cases.append(([gen_values(s, dtype, "ties", g) for s in MANY], None))
    for i, (tensors, masks) in enumerate(cases):
        n = n_candidates(tensors, masks)
        # the reference is slow on the big list (a 2**16-bin bincount per tensor and pass)
        ks = ks_for(n, g) if i < len(kinds) else [1, n // 3 + 1, n]
        nat, ref = _both(
            lambda t=tensors, m=masks, ks=ks: [kth_smallest_magnitude(t, k, m) for k in ks]
        )
        assert nat == ref
        counts = [0, *ks]
        nat, ref = _both(
            lambda t=tensors, m=masks, cs=counts: [prune_smallest(t, c, m) for c in cs]
        )
        for a, b in zip(nat, ref):
            for x, y in zip(a, b):
                assert torch.equal(x, y)


def random_key(g, dtype, tensors) -> int:
    """The key of a random element (now and then one just above it: maybe absent)."""
    nonempty = [t for t in tensors if t.numel()]
    if not nonempty:
        return py_key(1.0, dtype)
    t = nonempty[int(torch.randint(0, len(nonempty), (1,), generator=g))]
    key = py_key(float(flat(t)[int(torch.randint(0, t.numel(), (1,), generator=g))]), dtype)
    return key + int(float(torch.rand(1, generator=g)) < 0.2)


def _random_pass(g, dtype, tensors):
    """A valid (shift, bits, prefix, prefix_mask), the prefix taken from a real key."""
    kb = KEY_BITS[dtype]
    bits = int(torch.randint(1, 17, (1,), generator=g))
    bits = min(bits, kb)
    shift = int(torch.randint(0, kb - bits + 1, (1,), generator=g))
    key = random_key(g, dtype, tensors)
    choice = int(torch.randint(0, 3, (1,), generator=g))
    if choice == 0:
        pmask = 0
    elif choice == 1:  # the digits above this one, as in the radix passes
        pmask = ((1 << kb) - 1) & ~((1 << (shift + bits)) - 1)
    else:  # any subset of the key bits
        pmask = int(torch.randint(0, 1 << min(kb, 62), (1,), generator=g))
    return shift, bits, key & pmask, pmask


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_native_matches_reference_histogram(dtype):
    g = torch.Generator().manual_seed(31)
    nans_seen = 0
    for trial in range(16):
        kind = KINDS[trial % len(KINDS)]
        mk = ["none", "random", "mixed"][trial % 3]
        tensors, masks = random_case(g, dtype, 1 + trial % 6, kind, mk, transpose=True)
        if trial % 4 == 3:  # NaNs (some masked out): counted in hist[-1]
            flat(tensors[0])[:3] = NAN
        if trial == 15:
            tensors, masks = [gen_values(s, dtype, "randn", g) for s in MANY], None
        masks = [None] * len(tensors) if masks is None else masks
        shift, bits, prefix, pmask = _random_pass(g, dtype, tensors)
        start = torch.randint(0, 100, ((1 << bits) + 1,), generator=g)

        def run(start=start, tensors=tensors, masks=masks, p=(shift, bits, prefix, pmask)):
            hist = start.clone()
            ops.magnitude_histogram(tensors, masks, *p, hist)
            return hist

        nat, ref = _both(run)
        assert torch.equal(nat, ref), trial
        # accumulates into hist; counts every candidate whose key matches the prefix
        assert (nat >= start).all()
        nans_seen += int(nat[-1] - start[-1])
    assert nans_seen > 0


@needs_native
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_native_matches_reference_threshold_mask(dtype):
    g = torch.Generator().manual_seed(41)
    for trial in range(12):
        kind = ["ties", "equal", "randn", "special"][trial % 4]
        tensors, masks = random_case(g, dtype, 1 + trial, kind, ["none", "mixed"][trial % 2])
        if trial == 11:
            tensors, masks = [gen_values(s, dtype, "ties", g) for s in MANY], None
        masks = [None] * len(tensors) if masks is None else masks
        t_key = random_key(g, dtype, tensors)
        ties = int(torch.randint(0, 40, (1,), generator=g))

        def run(tensors=tensors, masks=masks, t_key=t_key, ties=ties):
            outs = [torch.empty_like(t, dtype=torch.bool) for t in tensors]
            ops.threshold_mask(tensors, masks, outs, t_key, ties)
            # in place: out is old
            olds = [torch.ones_like(t, dtype=torch.bool) if m is None else m.clone()
                    for t, m in zip(tensors, masks)]  # fmt: skip
            ops.threshold_mask(tensors, olds, olds, t_key, ties)
            return outs, olds

        (nat, nat_in), (ref, ref_in) = _both(run)
        for a, b, c, d in zip(nat, ref, nat_in, ref_in):
            assert torch.equal(a, b) and torch.equal(c, d) and torch.equal(a, c), trial


# ---------------------------------------------------------------------------------------------
# the histogram op on its own


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_histogram_matches_struct_oracle(dtype):
    g = torch.Generator().manual_seed(51)
    for trial in range(10):
        kind = KINDS[trial % len(KINDS)]
        tensors, masks = random_case(g, dtype, 1 + trial % 4, kind, ["none", "random"][trial % 2])
        masks = [None] * len(tensors) if masks is None else masks
        shift, bits, prefix, pmask = _random_pass(g, dtype, tensors)
        hist = torch.zeros((1 << bits) + 1, dtype=torch.int64)
        ops.magnitude_histogram(tensors, masks, shift, bits, prefix, pmask, hist)
        exp = [0] * ((1 << bits) + 1)
        for t, m in zip(tensors, masks):
            vals = t.flatten().tolist()
            keep = [True] * len(vals) if m is None else m.flatten().tolist()
            for x, keep_it in zip(vals, keep):
                key = py_key(x, dtype)
                if keep_it and key & pmask == prefix:
                    exp[(key >> shift) & ((1 << bits) - 1)] += 1
        assert hist.tolist() == exp, trial


def test_histogram_counts_nan_candidates():
    t = torch.tensor([NAN, 1.0, -NAN, 2.0, NAN])
    m = torch.tensor([True, True, True, True, False])
    for dtype in FLOAT_DTYPES:
        x = t.to(dtype)
        shift, bits = {torch.float32: (15, 16), torch.float64: (47, 16)}.get(dtype, (0, 15))
        hist = torch.zeros((1 << bits) + 1, dtype=torch.int64)
        ops.magnitude_histogram([x, x], [m, None], shift, bits, 0, 0, hist)
        assert int(hist[-1]) == 2 + 3, dtype
        with pytest.raises(ValueError, match="NaN"):
            kth_smallest_magnitude([x], 1, [m])
        assert (
            kth_smallest_magnitude([x], 2, [torch.tensor([False, True, False, True, False])]) == 2
        )


# ---------------------------------------------------------------------------------------------
# 4. bad inputs


def test_kth_rejects_nan():
    for dtype in FLOAT_DTYPES:
        t = torch.tensor([1.0, NAN, 2.0], dtype=dtype)
        with pytest.raises(ValueError, match="NaN"):
            kth_smallest_magnitude(t, 1)
        with pytest.raises(ValueError, match="NaN"):
            kth_smallest_magnitude([torch.ones(3, dtype=dtype), -t], 2)
        with pytest.raises(ValueError, match="NaN"):
            prune_smallest([torch.ones(3, dtype=dtype), t], 2)


def test_k_and_count_out_of_range():
    t = torch.randn(4, 5)
    for k in (0, -1, 21, 10**6):
        with pytest.raises(ValueError, match="out of range"):
            kth_smallest_magnitude(t, k)
    m = torch.rand(4, 5) < 0.5
    m[0, 0] = False
    nm = int(m.sum())
    with pytest.raises(ValueError, match="out of range"):
        kth_smallest_magnitude(t, nm + 1, m)
    with pytest.raises(ValueError):
        kth_smallest_magnitude(t, 1, torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        kth_smallest_magnitude([torch.empty(0), torch.empty(3, 0)], 1)
    for c in (21, -1):
        with pytest.raises(ValueError):
            prune_smallest(t, c)
    # per layer too: a negative count is refused, never read as "prune nothing"
    with pytest.raises(ValueError, match=r"tensors\[1\]: count -1 is out of range"):
        lottery_ext.prune_smallest_each([t, torch.randn(3)], [2, -1])
    with pytest.raises(ValueError):
        prune_smallest([t, t], nm + 21, [m, None])
    assert sum(int(x.sum()) for x in prune_smallest([t, t], nm + 20, [m, None])) == 0


def test_wrong_types():
    t = torch.randn(5)
    for k in (1.0, True, False, "1", None, torch.tensor(1)):
        with pytest.raises(TypeError):
            kth_smallest_magnitude(t, k)
        with pytest.raises(TypeError):
            prune_smallest(t, k)
    for bad in ([[1.0, 2.0]], [t, 3.0], torch.arange(5), torch.randn(3, dtype=torch.complex64)):
        with pytest.raises(TypeError):
            kth_smallest_magnitude(bad, 1)
        with pytest.raises(TypeError):
            prune_smallest(bad, 1)
    with pytest.raises(ValueError, match="empty"):
        kth_smallest_magnitude([], 1)
    with pytest.raises(ValueError, match="empty"):
        prune_smallest([], 0)


def test_mixed_devices_and_dtypes():
    cpu = torch.randn(4)
    other = torch.empty(4, device="cuda" if torch.cuda.is_available() else "meta")
    for tensors in ([cpu, other], [other, cpu]):
        with pytest.raises(ValueError, match="tensors\\[1\\]"):
            kth_smallest_magnitude(tensors, 1)
        with pytest.raises(ValueError):
            prune_smallest(tensors, 1)
    for d in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="tensors\\[2\\]"):
            kth_smallest_magnitude([cpu, cpu, cpu.to(d)], 1)
        with pytest.raises(TypeError):
            prune_smallest([cpu, cpu.to(d)], 1)
    # a mask on another device
    with pytest.raises(ValueError, match="mask for tensors\\[0\\]"):
        kth_smallest_magnitude([cpu], 1, [torch.ones(4, dtype=torch.bool, device=other.device)])


def test_non_dense_rejected():
    x = torch.randn(4, 6)
    for bad in (x[:, ::2], x[::2], x.t()[1:3, :3], torch.randn(3).expand(4, 3)):
        with pytest.raises(ValueError, match="tensors\\[1\\]"):
            kth_smallest_magnitude([x, bad], 1)
        with pytest.raises(ValueError, match="tensors\\[0\\]"):
            prune_smallest([bad], 1)


def test_bad_masks():
    t = [torch.randn(3, 4), torch.randn(5)]
    good = [None, torch.ones(5, dtype=torch.bool)]
    cases = [
        (TypeError, [None, torch.ones(5)]),  # float mask
        (TypeError, [None, torch.ones(5, dtype=torch.uint8)]),
        (TypeError, [None, [True] * 5]),
        (ValueError, [None, torch.ones(4, dtype=torch.bool)]),  # wrong shape
        (ValueError, [None, torch.ones(1, 5, dtype=torch.bool)]),
    ]
    for exc, masks in cases:
        with pytest.raises(exc, match="tensors\\[1\\]"):
            kth_smallest_magnitude(t, 1, masks)
        with pytest.raises(exc, match="tensors\\[1\\]"):
            prune_smallest(t, 1, masks)
    with pytest.raises(ValueError):  # wrong number of masks
        kth_smallest_magnitude(t, 1, good[:1])
    with pytest.raises(ValueError):
        prune_smallest(t, 1, good + [None])
    # layout: a contiguous mask for a transposed tensor
    xt = torch.randn(4, 3).t()
    with pytest.raises(ValueError, match="layout"):
        prune_smallest(xt, 1, torch.ones(3, 4, dtype=torch.bool))
    assert kth_smallest_magnitude(xt, 1, torch.ones(4, 3, dtype=torch.bool).t()) == oracle_kth(
        [xt], 1
    )


def test_histogram_op_bad_inputs():
    t = [torch.randn(10)]
    m = [None]
    ok = dict(shift=15, bits=16, prefix=0, prefix_mask=0)
    hist = torch.zeros((1 << 16) + 1, dtype=torch.int64)
    ops.magnitude_histogram(t, m, hist=hist, **ok)
    assert int(hist.sum()) == 10
    bad = [
        (ValueError, dict(hist=torch.zeros(1 << 16, dtype=torch.int64))),  # one short
        (ValueError, dict(hist=torch.zeros((1 << 16) + 2, dtype=torch.int64))),
        (TypeError, dict(hist=torch.zeros((1 << 16) + 1, dtype=torch.int32))),
        (TypeError, dict(hist=torch.zeros((1 << 16) + 1))),
        (TypeError, dict(hist=[0] * ((1 << 16) + 1))),
        (ValueError, dict(hist=torch.zeros(2 * ((1 << 16) + 1), dtype=torch.int64)[::2])),
        (ValueError, dict(hist=torch.zeros((1 << 16) + 1, dtype=torch.int64, device="meta"))),
        (ValueError, dict(bits=0, hist=torch.zeros(2, dtype=torch.int64))),
        (ValueError, dict(bits=17, hist=torch.zeros((1 << 17) + 1, dtype=torch.int64))),
        (ValueError, dict(shift=16)),  # 16 + 16 > 31 key bits of float32
        (ValueError, dict(shift=-1)),
        (ValueError, dict(prefix=1 << 20, prefix_mask=0)),  # not a subset
        (ValueError, dict(prefix=3, prefix_mask=1)),
        (ValueError, dict(prefix=-1, prefix_mask=-1)),
    ]
    for exc, kw in bad:
        args = {**ok, "hist": torch.zeros((1 << 16) + 1, dtype=torch.int64), **kw}
        before = args["hist"].clone() if isinstance(args["hist"], torch.Tensor) else None
        with pytest.raises(exc):
            ops.magnitude_histogram(t, m, **args)
        if before is not None and args["hist"].device.type == "cpu":
            assert torch.equal(args["hist"], before), kw  # nothing written
    with pytest.raises(ValueError):  # float16 keys have 15 bits
        ops.magnitude_histogram(
            [t[0].half()], m, 0, 16, 0, 0, torch.zeros((1 << 16) + 1, dtype=torch.int64)
        )
    with pytest.raises(ValueError):
        ops.magnitude_histogram([], [], 0, 15, 0, 0, torch.zeros((1 << 15) + 1, dtype=torch.int64))


def test_threshold_mask_op_bad_inputs():
    t = [torch.randn(3, 4)]
    with pytest.raises(ValueError, match="ties_to_prune"):
        ops.threshold_mask(t, [None], [torch.empty(3, 4, dtype=torch.bool)], 0, -1)
    with pytest.raises(TypeError, match="out_masks\\[0\\]"):
        ops.threshold_mask(t, [None], [torch.empty(3, 4)], 0, 0)
    with pytest.raises(ValueError, match="out_masks\\[0\\]"):
        ops.threshold_mask(t, [None], [torch.empty(4, 3, dtype=torch.bool)], 0, 0)
    with pytest.raises(ValueError):
        ops.threshold_mask(t, [None], [], 0, 0)
    with pytest.raises(ValueError, match="layout"):
        ops.threshold_mask(t, [None], [torch.empty(4, 3, dtype=torch.bool).t()], 0, 0)


# ---------------------------------------------------------------------------------------------
# 5. the custom ops


def _opcheck_inputs():
    g = torch.Generator().manual_seed(61)
    tensors = [
        torch.randn(4, 5, generator=g),
        torch.randn(7, generator=g),
        torch.randn(2, 3, 2, generator=g),
    ]
    masks = [torch.rand(4, 5, generator=g) < 0.7, None, torch.rand(2, 3, 2, generator=g) < 0.5]
    return tensors, masks


def test_opcheck_magnitude_histogram():
    tensors, masks = _opcheck_inputs()
    hist = torch.zeros((1 << 16) + 1, dtype=torch.int64)
    args = (tensors, masks, 15, 16, 0, 0, hist)
    torch.library.opcheck(torch.ops.lottery_ext.magnitude_histogram_.default, args)
    # and the op really does the pass
    h = torch.zeros((1 << 16) + 1, dtype=torch.int64)
    torch.ops.lottery_ext.magnitude_histogram_(tensors, masks, 15, 16, 0, 0, h)
    assert int(h.sum()) == n_candidates(tensors, masks)


def test_opcheck_threshold_mask():
    tensors, masks = _opcheck_inputs()
    t_key = py_key(float(tensors[1][3]), torch.float32)
    outs = [torch.empty_like(t, dtype=torch.bool) for t in tensors]
    args = (tensors, masks, outs, t_key, 1)
    torch.library.opcheck(torch.ops.lottery_ext.threshold_mask_.default, args)
    outs = [torch.empty_like(t, dtype=torch.bool) for t in tensors]
    torch.ops.lottery_ext.threshold_mask_(tensors, masks, outs, t_key, 0)
    thr = abs(float(tensors[1][3]))
    below = sum(
        int(t[m if m is not None else ...].abs().lt(thr).sum()) for t, m in zip(tensors, masks)
    )
    assert below > 0
    assert n_candidates(tensors, masks) - sum(int(o.sum()) for o in outs) == below


def test_opcheck_magnitude_histogram_batched():
    tensors, masks = _opcheck_inputs()
    prefixes = [0, 1 << 30, 0]
    hist = torch.zeros(3, (1 << 16) + 1, dtype=torch.int64)
    args = (tensors, masks, 14, 16, prefixes, 1 << 30)
    torch.library.opcheck(torch.ops.lottery_ext.magnitude_histogram_batched_.default, (*args, hist))
    # each row is that tensor's own histogram, on the compiled core and on the reference
    for ctx in (contextlib.nullcontext, _ops.reference_backend):
        got = torch.zeros(3, (1 << 16) + 1, dtype=torch.int64)
        with ctx():
            ops.magnitude_histogram_batched(*args, got)
        for i, (t, m, prefix) in enumerate(zip(tensors, masks, prefixes)):
            row = torch.zeros((1 << 16) + 1, dtype=torch.int64)
            ops.magnitude_histogram([t], [m], 14, 16, prefix, 1 << 30, row)
            assert torch.equal(got[i], row), i
        assert int(got.sum()) > 0


def test_histogram_batched_checks_its_rows():
    tensors, masks = _opcheck_inputs()
    with pytest.raises(ValueError, match="hist: expected 3 rows"):
        ops.magnitude_histogram_batched(
            tensors, masks, 0, 16, [0, 0, 0], 0, torch.zeros(2, (1 << 16) + 1, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="tensor lists differ in length"):
        ops.magnitude_histogram_batched(
            tensors, masks, 0, 16, [0, 0], 0, torch.zeros(3, (1 << 16) + 1, dtype=torch.int64)
        )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_opcheck_kth_smallest_magnitude(dtype):
    tensors, masks = _opcheck_inputs()
    tensors = [t.to(dtype) for t in tensors]
    torch.library.opcheck(torch.ops.lottery_ext.kth_smallest_magnitude.default, (tensors, 5, masks))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
def test_kth_custom_op_returns_0dim_tensor(dtype):
    g = torch.Generator().manual_seed(71)
    tensors = [gen_values(s, dtype, "ties", g) for s in [(4, 5), (7,), (0,), (3, 3)]]
    masks = [None] * len(tensors)
    n = sum(t.numel() for t in tensors)
    for k in (1, 9, n):
        out = torch.ops.lottery_ext.kth_smallest_magnitude(tensors, k, masks)
        assert isinstance(out, torch.Tensor) and out.dim() == 0
        assert out.dtype == dtype and out.device == tensors[0].device
        exp = torch.kthvalue(torch.cat([t.flatten() for t in tensors]).abs(), k).values
        assert torch.equal(out, exp) and float(out) == oracle_kth(tensors, k)
    with pytest.raises(ValueError):
        torch.ops.lottery_ext.kth_smallest_magnitude(tensors, n + 1, masks)


# ---------------------------------------------------------------------------------------------
# 6. randomized property test (no hypothesis: a fixed set of seeds)


def test_randomized_against_oracles():
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        dtype = FLOAT_DTYPES[seed % 4]
        kind = KINDS[int(torch.randint(0, len(KINDS), (1,), generator=g))]
        mask_kind = ["none", "random", "mixed", "one"][int(torch.randint(0, 4, (1,), generator=g))]
        n_tensors = int(torch.randint(1, 6, (1,), generator=g))
        tensors, masks = random_case(g, dtype, n_tensors, kind, mask_kind, transpose=True)
        n = n_candidates(tensors, masks)
        if n == 0:
            with pytest.raises(ValueError):
                kth_smallest_magnitude(tensors, 1, masks)
            assert_prune_ok(tensors, 0, masks)
            continue
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        assert kth_smallest_magnitude(tensors, k, masks) == oracle_kth(tensors, k, masks), seed
        count = int(torch.randint(0, n + 1, (1,), generator=g))
        out = assert_prune_ok(tensors, count, masks)
        # the k-th smallest survivor is the threshold: everything pruned is <= it
        if count:
            thr = kth_smallest_magnitude(tensors, count, masks)
            for t, o in zip(tensors, out):
                assert (t[o].abs().double() >= thr).all(), seed


def test_kth_op_is_non_differentiable_for_parameters():
    p = torch.nn.Parameter(torch.randn(4, 5))
    out = torch.ops.lottery_ext.kth_smallest_magnitude([p], 3, [None])
    assert not out.requires_grad
    assert out.item() == torch.kthvalue(p.detach().abs().flatten(), 3).values.item()
    torch.library.opcheck(torch.ops.lottery_ext.kth_smallest_magnitude, ([p], 3, [None]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_prune_smallest_each_matches_one_tensor_at_a_time(dtype):
    g = torch.Generator().manual_seed(3)
    shapes = [(17, 9), (1,), (0,), (40,), (6, 5, 4)]
    tensors = [torch.randint(-4, 5, s, generator=g).to(dtype) for s in shapes]  # heavy ties
    masks = [None, None, None, torch.rand(40, generator=g) < 0.6, torch.rand(6, 5, 4) < 0.5]
    counts = [50, 0, 0, 7, 30]
    expected = [prune_smallest(t, c, m)[0] for t, c, m in zip(tensors, counts, masks)]
    for backend in (contextlib.nullcontext, _ops.reference_backend):
        with backend():
            got = lottery_ext.prune_smallest_each(tensors, counts, masks)
        for e, o in zip(expected, got):
            assert torch.equal(e, o)


def test_prune_smallest_each_errors_name_the_tensor():
    a, b = torch.randn(5), torch.randn(4)
    b[2] = float("nan")
    with pytest.raises(ValueError, match=r"tensors\[1\].*NaN"):
        lottery_ext.prune_smallest_each([a, b], [1, 1])
    with pytest.raises(ValueError, match=r"tensors\[0\].*count 6 is out of range"):
        lottery_ext.prune_smallest_each([a, torch.randn(4)], [6, 1])
    with pytest.raises(ValueError, match="2 counts for 1 tensors"):
        lottery_ext.prune_smallest_each([a], [1, 1])
