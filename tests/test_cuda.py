"""The CUDA kernels (csrc/cuda/) through the public API, on CUDA tensors.

Oracles used here:
- the compiled CPU core on the same inputs: the CUDA kernels call the same functors
  (lottery/math.h, lottery/select.h) and are compiled without FMA contraction
  (``--fmad=false``, like ``-ffp-contract=off`` on the CPU), so every result is compared
  BITWISE: parameters, optimizer state, masks, histograms;
- torch.optim's single-tensor implementation on CUDA (no masks): parity to rounding;
- ``torch.kthvalue`` on the concatenated magnitudes (CPU, float64) for thresholds, and a stable
  ``torch.sort`` in flat memory order for exact-count masks;
- hand-built data with known order statistics for tensors over 2**31 elements.

Skipped unless a CUDA device is present and lottery_ext was built with CUDA
(``LOTTERY_EXT_CUDA=ON pip install .``). ``scripts/gpu_check.sh`` runs this file, and the
``quick`` tests under compute-sanitizer (memcheck, racecheck).
"""

from __future__ import annotations

import copy
import struct

import pytest
import torch
from torch import nn

import lottery_ext
from conftest import TOL
from lottery_ext import (
    MagnitudePruner,
    MaskedAdam,
    MaskedAdamW,
    MaskedSGD,
    kth_smallest_magnitude,
    ops,
    prune_smallest,
    rewind,
    snapshot,
)
from lottery_ext._reference import flat

HAS_CUDA = torch.cuda.is_available() and bool(lottery_ext.build_info().get("cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device and lottery_ext built with LOTTERY_EXT_CUDA=ON"
    ),
]

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float64", "float16", "bfloat16"]
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.bool: torch.uint8,
}
KEY_BITS = {torch.float32: 31, torch.float64: 63, torch.float16: 15, torch.bfloat16: 15}
GPU_MAX_BITS = 12  # widest histogram digit of the CUDA kernels
CHUNK = 65536  # elements per block of the tensor-list launcher (csrc/cuda/multi_tensor_apply.cuh)

OPTS = {
    "sgd": (MaskedSGD, dict(lr=0.05)),  # no momentum buffer
    "sgd_nesterov": (MaskedSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "sgd_damp_max": (
        MaskedSGD,
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, maximize=True),
    ),
    "adam": (MaskedAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "adam_ams_max": (MaskedAdam, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, maximize=True)),
    "adamw": (MaskedAdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw_ams": (MaskedAdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
}
TORCH_OPT = {
    MaskedSGD: torch.optim.SGD,
    MaskedAdam: torch.optim.Adam,
    MaskedAdamW: torch.optim.AdamW,
}
BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# odd sizes, 0-dim, empty, and sizes around one chunk of the tensor-list launcher
SHAPES = [(7,), (33, 17), (3, 5, 7, 9), (1,), (), (0,), (4, 0, 3), (CHUNK + 1,), (2, CHUNK + 3)]


# -------------------------------------------------------------------------------------------
# helpers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0 from +0 and compares NaN payloads), on the CPU."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def assert_same_bits(a, b, what=""):
    if not same_bits(a, b):
        a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
        diff = (a64 - b64).abs().nan_to_num(float("inf"))
        raise AssertionError(
            f"{what}: CUDA and CPU results differ bitwise (max |diff| {float(diff.max())}, "
            f"{int((diff > 0).sum())} of {a.numel()} elements)"
        )


def randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def poison(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NaN / +inf / -inf in the pruned entries: they must not leak into the update."""
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=grad.dtype)
    idx = torch.arange(grad.numel()) % 3
    return torch.where(mask, grad, bad[idx].reshape(grad.shape))


def make_problem(shapes, dtype, seed, masked, steps):
    """CPU tensors: initial params, per-step grads, masks (None for some tensors)."""
    g = torch.Generator().manual_seed(seed)
    params = [randn(s, dtype, g) for s in shapes]
    masks = [
        (torch.rand(s, generator=g) < 0.6) if masked and i % 3 != 1 else None
        for i, s in enumerate(shapes)
    ]
    grads = []
    for _ in range(steps):
        gs = [randn(s, dtype, g) for s in shapes]
        grads.append([gr if m is None else poison(gr, m) for gr, m in zip(gs, masks)])
    return params, grads, masks


def run_optimizer(cls, kw, params0, grads_seq, masks, device):
    params = [p.clone().to(device).requires_grad_() for p in params0]
    mk = {p: m.to(device) for p, m in zip(params, masks) if m is not None}
    opt = cls(params, **kw, masks=mk)
    for grads in grads_seq:
        for p, gr in zip(params, grads):
            p.grad = gr.to(device)
        opt.step()
    return params, opt


def assert_optimizers_bitwise(params_a, opt_a, params_b, opt_b, what):
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_same_bits(pa, pb, f"{what} param {i}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), (what, i, set(sa), set(sb))
        for k in sa:
            if k == "step":
                assert float(sa[k]) == float(sb[k]), (what, i)
            elif k in BUFFERS and isinstance(sa[k], torch.Tensor):
                assert_same_bits(sa[k], sb[k], f"{what} param {i} state {k}")


def assert_pruned_zero(params, opt, masks):
    for p, m in zip(params, masks):
        if m is None:
            continue
        m = m.to(p.device)
        assert not p.detach()[~m].ne(0).any()
        for k in BUFFERS:
            buf = opt.state.get(p, {}).get(k)
            if isinstance(buf, torch.Tensor):
                assert not buf[~m].ne(0).any(), k


def offset_copy(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of `t` whose data starts `offset` elements into a larger buffer (misaligned for
    16-byte vector access when offset * itemsize % 16 != 0), same shape, contiguous."""
    base = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = base[offset : offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


# --- selection oracles (independent of the library) ---


def key_of(x: float, dtype) -> int:
    if dtype == torch.float32:
        return struct.unpack("<I", struct.pack("<f", x))[0] & 0x7FFFFFFF
    if dtype == torch.float64:
        return struct.unpack("<Q", struct.pack("<d", x))[0] & 0x7FFFFFFFFFFFFFFF
    if dtype == torch.float16:
        return struct.unpack("<H", struct.pack("<e", x))[0] & 0x7FFF
    return (struct.unpack("<I", struct.pack("<f", x))[0] >> 16) & 0x7FFF


def oracle_kth(tensors, k, masks=None) -> float:
    masks = [None] * len(tensors) if masks is None else masks
    vals = [
        (flat(t.cpu()) if m is None else flat(t.cpu())[flat(m.cpu())]).abs().double()
        for t, m in zip(tensors, masks)
    ]
    return float(torch.kthvalue(torch.cat(vals), k).values)


def oracle_prune(tensors, count, masks=None):
    """Candidates ranked by (|w|, flat memory index over the list), first `count` pruned."""
    masks = [None] * len(tensors) if masks is None else masks
    mags = torch.cat([flat(t.cpu()).abs().double() for t in tensors])
    alive = torch.cat(
        [
            torch.ones(t.numel(), dtype=torch.bool) if m is None else flat(m.cpu()).clone()
            for t, m in zip(tensors, masks)
        ]
    )
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


def gen_values(shape, dtype, kind, g):
    if kind == "randn":
        scale = torch.exp(torch.empty(shape).uniform_(-4, 4, generator=g))
        return (torch.randn(shape, generator=g) * scale).to(dtype)
    if kind == "ties":  # {-3..3}: heavy ties, ±0 among them
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    if kind == "close":  # differ in the lowest mantissa bits only: the last radix pass decides
        eps = torch.finfo(dtype).eps
        base = (1 + torch.randint(0, 5, shape, generator=g).double() * eps).to(dtype)
        return torch.where(torch.rand(shape, generator=g) < 0.5, -base, base)
    if kind == "special":
        fi = torch.finfo(dtype)
        sub = fi.smallest_normal * fi.eps
        pool = [0.0, -0.0, sub, -sub, 3 * sub, fi.smallest_normal, fi.max, -fi.max]
        pool += [float("inf"), -float("inf"), 1.0, -1.0, 0.5, fi.smallest_normal / 2]
        pool_t = torch.tensor(pool, dtype=torch.float64).to(dtype)
        n = torch.Size(shape).numel()
        pick = pool_t[torch.randint(0, len(pool), (n,), generator=g)].reshape(shape)
        return torch.where(torch.rand(shape, generator=g) < 0.7, pick, torch.randn(shape).to(dtype))
    raise AssertionError(kind)


def make_list(dtype, kind, mask_kind, g, n_tensors, transpose=True, big=0):
    """CPU tensors (dense, some transposed) and masks: none / random / mixed (None or all False)."""
    tensors = []
    for i in range(n_tensors):
        ndim = int(torch.randint(0, 4, (1,), generator=g))
        shape = tuple(int(d) for d in torch.randint(1, 9, (ndim,), generator=g))
        if i % 11 == 5:
            shape = (0, 3)
        if transpose and len(shape) == 2 and i % 2:
            tensors.append(gen_values(shape[::-1], dtype, kind, g).t())
        else:
            tensors.append(gen_values(shape, dtype, kind, g))
    if big:
        tensors.insert(len(tensors) // 2, gen_values((big,), dtype, kind, g))
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
    return tensors, masks


def to_dev(tensors, device):
    """Copies on `device` keeping each tensor's memory layout (transposed stays transposed)."""
    if tensors is None:
        return None
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        e = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        e.copy_(t)
        out.append(e)
    return out


def ks_for(n):
    return sorted({k for k in (1, 2, n // 3, n // 2 + 1, n - 1, n) if 1 <= k <= n})


# -------------------------------------------------------------------------------------------
# 0. the build


def test_cuda_build_and_dispatch():
    info = lottery_ext.build_info()
    assert info["cuda"] is True and info["native"] is True
    assert isinstance(info["cuda_version"], str) and info["cuda_version"]
    assert lottery_ext._native.core.cuda.device_count() == torch.cuda.device_count()
    assert lottery_ext._ops.uses_native(CUDA), "ops on CUDA tensors should run the CUDA kernels"


# -------------------------------------------------------------------------------------------
# 1. optimizers: CUDA == CPU bitwise; CUDA == torch.optim to rounding


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(OPTS))
def test_optimizer_cuda_matches_cpu_bitwise(name, dtype, masked):
    cls, kw = OPTS[name]
    params0, grads, masks = make_problem(SHAPES, dtype, seed=3, masked=masked, steps=6)
    pc, oc = run_optimizer(cls, kw, params0, grads, masks, CPU)
    pg, og = run_optimizer(cls, kw, params0, grads, masks, CUDA)
    assert all(p.device.type == "cuda" for p in pg)
    assert_optimizers_bitwise(pc, oc, pg, og, f"{name} {dtype}")
    assert_pruned_zero(pg, og, masks)
    # the run moved the parameters
    assert not torch.equal(pg[1].detach().cpu(), params0[1])


def _torch_configs():
    out = []
    for name in OPTS:
        for dtype in (torch.float32, torch.float64):
            out.append(pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("name,dtype", _torch_configs())
def test_optimizer_cuda_matches_torch_optim(name, dtype):
    cls, kw = OPTS[name]
    params0, grads, _ = make_problem(SHAPES, dtype, seed=4, masked=False, steps=20)
    ours, _ = run_optimizer(cls, kw, params0, grads, [None] * len(SHAPES), CUDA)
    ref = [p.clone().to(CUDA).requires_grad_() for p in params0]
    topt = TORCH_OPT[cls](ref, **kw, foreach=False)
    for gs in grads:
        for p, gr in zip(ref, gs):
            p.grad = gr.to(CUDA)
        topt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_many_tensors_several_launches(dtype):
    """> 100 tensors (several launches of the tensor-list kernel, tensors cut by a launch
    boundary) and one tensor of more than 320 chunks (one launch's worth of blocks)."""
    g = torch.Generator().manual_seed(5)
    sizes = [int(s) for s in torch.randint(1, 5000, (140,), generator=g)]
    sizes[7], sizes[50], sizes[99] = CHUNK - 1, 3 * CHUNK + 7, 0
    sizes.insert(70, 321 * CHUNK + 5)
    shapes = [(s,) for s in sizes]
    for name in ("adam_ams_max", "sgd_nesterov"):
        cls, kw = OPTS[name]
        params0, grads, masks = make_problem(shapes, dtype, seed=6, masked=True, steps=2)
        pc, oc = run_optimizer(cls, kw, params0, grads, masks, CPU)
        pg, og = run_optimizer(cls, kw, params0, grads, masks, CUDA)
        assert_optimizers_bitwise(pc, oc, pg, og, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quick_misaligned_tensors(dtype):
    """Storage offsets that break 16-byte alignment of one role at a time: scalar path."""
    g = torch.Generator().manual_seed(8)
    shapes = [(1000,), (CHUNK + 9,), (37,)]
    for off in range(6):
        roles = [0] * 6
        roles[off % 6] = 1 + off % 3  # 1..3 elements off: param, grad, m, v, vmax, mask
        base = [randn(s, dtype, g) for s in shapes]
        grads = [randn(s, dtype, g) for s in shapes]
        ms = [randn(s, dtype, g) for s in shapes]
        vs = [randn(s, dtype, g).abs() for s in shapes]
        xs = [v * 2 for v in vs]
        masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]

        def run(device, base=base, grads=grads, ms=ms, vs=vs, xs=xs, masks=masks, roles=roles):
            lists = [to_dev(x, device) for x in (base, grads, ms, vs, xs, masks)]
            lists = [[offset_copy(t, r) for t in lst] for lst, r in zip(lists, roles)]
            steps = [torch.tensor(3.0) for _ in shapes]
            ops.adam_step(
                *lists[:5], lists[5], steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=1e-2, amsgrad=True, maximize=False, decoupled=True,
            )  # fmt: skip
            first = [False, True, False]
            ops.sgd_step(
                lists[0], lists[1], lists[2], lists[5], first, lr=0.1, momentum=0.9,
                dampening=0.1, weight_decay=1e-3, nesterov=False, maximize=True,
            )  # fmt: skip
            ops.apply_mask(lists[3], lists[5])
            return [t for lst in lists[:5] for t in lst] + [float(s) for s in steps]

        cpu, gpu = run(CPU), run(CUDA)
        for i, (a, b) in enumerate(zip(cpu, gpu)):
            if isinstance(a, float):
                assert a == b
            else:
                assert_same_bits(a, b, f"offsets {roles} tensor {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quick_optimizer_kernels(dtype):
    """Every optimizer kernel variant on a few small tensors (the compute-sanitizer subset)."""
    shapes = [(5,), (17, 3), (0,), (CHUNK + 3,)]
    for name in OPTS:
        cls, kw = OPTS[name]
        params0, grads, masks = make_problem(shapes, dtype, seed=9, masked=True, steps=2)
        pc, oc = run_optimizer(cls, kw, params0, grads, masks, CPU)
        pg, og = run_optimizer(cls, kw, params0, grads, masks, CUDA)
        assert_optimizers_bitwise(pc, oc, pg, og, f"{name} {dtype}")


def test_set_mask_and_state_dict_on_cuda():
    params0, grads, masks = make_problem([(40, 30), (30,)], torch.float32, 10, True, 3)
    pg, og = run_optimizer(MaskedAdam, dict(lr=1e-2, amsgrad=True), params0, grads, masks, CUDA)
    new = torch.rand(40, 30, device=CUDA) < 0.3
    og.set_mask(pg[0], new)  # apply_mask on param and state
    assert_pruned_zero(pg, og, [new, None])
    sd = og.state_dict()
    pg2 = [p.detach().clone().requires_grad_() for p in pg]
    og2 = MaskedAdam(pg2, lr=1e-2, amsgrad=True)
    og2.load_state_dict(copy.deepcopy(sd))  # torch shares same-device state tensors
    for p, q in zip(pg, pg2):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    og.step()
    og2.step()
    for p, q in zip(pg, pg2):
        assert same_bits(p, q)


# -------------------------------------------------------------------------------------------
# 2. exact selection: kth_smallest_magnitude, prune_smallest, the radix ops


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", ["randn", "ties", "close", "special"])
def test_kth_and_prune_match_oracles(dtype, kind):
    g = torch.Generator().manual_seed(100 + ["randn", "ties", "close", "special"].index(kind))
    cases = [
        make_list(dtype, kind, "none", g, 1, big=0),
        make_list(dtype, kind, "random", g, 6),
        make_list(dtype, kind, "mixed", g, 130, big=70_001),  # several launches per pass
        make_list(dtype, kind, "none", g, 3, big=300_007),
    ]
    for tensors, masks in cases:
        dt, dm = to_dev(tensors, CUDA), to_dev(masks, CUDA)
        n = sum(
            t.numel() if m is None else int(m.sum())
            for t, m in zip(tensors, masks or [None] * len(tensors))
        )
        for k in ks_for(n):
            got = kth_smallest_magnitude(dt, k, dm)
            assert got == oracle_kth(tensors, k, masks), (k, n)
            assert got == kth_smallest_magnitude(tensors, k, masks)
        for count in [0, *ks_for(n)]:
            out = prune_smallest(dt, count, dm)
            exp = oracle_prune(tensors, count, masks)
            cpu = prune_smallest(tensors, count, masks)
            for i, (o, e, c) in enumerate(zip(out, exp, cpu)):
                assert o.device.type == "cuda" and o.dtype == torch.bool and o.shape == e.shape
                assert torch.equal(o.cpu(), e), (i, count)
                assert torch.equal(o.cpu(), c), (i, count)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quick_prune_ties_across_tiles_and_tensors(dtype):
    """All-equal magnitudes: the count falls inside one tile, on tile edges, across tensors."""
    sizes = [40_000, 1, 0, 16_384, 50_001]
    tensors = [torch.full((s,), -0.75 if i % 2 else 0.75, dtype=dtype) for i, s in enumerate(sizes)]
    tensors[0][123] = 0.5  # one strictly smaller magnitude
    dt = to_dev(tensors, CUDA)
    n = sum(sizes)
    for count in (1, 2, 16_383, 16_384, 16_385, 3 * 16_384 + 1, 40_000, 40_001, 56_385, n - 1, n):
        out = prune_smallest(dt, count)
        exp = oracle_prune(tensors, count)
        for i, (o, e) in enumerate(zip(out, exp)):
            assert torch.equal(o.cpu(), e), (count, i)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quick_histogram_op_matches_cpu(dtype):
    g = torch.Generator().manual_seed(200)
    kb = KEY_BITS[dtype]
    for trial in range(12):
        kind = ["randn", "ties", "special", "close"][trial % 4]
        tensors, masks = make_list(
            dtype,
            kind,
            ["none", "random", "mixed"][trial % 3],
            g,
            [3, 90, 7][trial % 3],
            big=[0, 20_000, 100_003][trial % 3],
        )
        if trial % 4 == 3:  # NaNs, some of them masked out: counted in hist[-1]
            flat(max(tensors, key=lambda t: t.numel()))[:3] = float("nan")
        masks = masks or [None] * len(tensors)
        bits = min(1 + trial % GPU_MAX_BITS, kb)
        shift = int(torch.randint(0, kb - bits + 1, (1,), generator=g))
        nonempty = [t for t in tensors if t.numel()]
        x = flat(nonempty[0])[0].item()
        pmask = ((1 << kb) - 1) & ~((1 << (shift + bits)) - 1) if trial % 2 else 0
        prefix = key_of(x, dtype) & pmask
        start = torch.randint(0, 100, ((1 << bits) + 1,), generator=g)
        hc, hg = start.clone(), start.clone().to(CUDA)
        ops.magnitude_histogram(tensors, masks, shift, bits, prefix, pmask, hc)
        ops.magnitude_histogram(
            to_dev(tensors, CUDA), to_dev(masks, CUDA), shift, bits, prefix, pmask, hg
        )
        assert torch.equal(hc, hg.cpu()), trial


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quick_threshold_mask_op_matches_cpu(dtype):
    g = torch.Generator().manual_seed(300)
    for trial in range(10):
        kind = ["ties", "randn", "special"][trial % 3]
        tensors, masks = make_list(
            dtype,
            kind,
            ["none", "mixed"][trial % 2],
            g,
            [4, 110][trial % 2],
            big=[50_000, 0][trial % 2],
        )
        masks = masks or [None] * len(tensors)
        nonempty = [t for t in tensors if t.numel()]
        t_key = key_of(flat(nonempty[-1])[0].item(), dtype)
        ties = [0, 1, 5, 1000, 10**9][trial % 5]

        def run(device, tensors=tensors, masks=masks, t_key=t_key, ties=ties):
            ts, ms = to_dev(tensors, device), to_dev(masks, device)
            outs = [torch.empty_like(t, dtype=torch.bool) for t in ts]
            ops.threshold_mask(ts, ms, outs, t_key, ties)
            olds = [
                torch.ones_like(t, dtype=torch.bool) if m is None else m for t, m in zip(ts, ms)
            ]
            ops.threshold_mask(ts, olds, olds, t_key, ties)  # in place: out is old
            return outs + olds

        for a, b in zip(run(CPU), run(CUDA)):
            assert torch.equal(a, b.cpu()), trial


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruner_on_cuda_model_matches_cpu(scope):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    with torch.no_grad():  # heavy ties
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape) / 4)
    # channels_last on both: ties are broken by flat memory index
    model = model.to(memory_format=torch.channels_last)
    gpu_model = copy.deepcopy(model).to(CUDA)
    assert gpu_model[0].weight.is_contiguous(memory_format=torch.channels_last)
    pc, pg = MagnitudePruner(model, 0.3, scope=scope), MagnitudePruner(gpu_model, 0.3, scope=scope)
    for _ in range(3):
        mc, mg = pc.prune(), pg.prune()
        assert set(mc) == set(mg)
        for name in mc:
            assert mg[name].device.type == "cuda"
            assert torch.equal(mc[name], mg[name].cpu()), name


# -------------------------------------------------------------------------------------------
# 3. rewind


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per", [0, 1, 3, 5])
def test_quick_rewind_tensors_matches_cpu(dtype, per):
    g = torch.Generator().manual_seed(400 + per)
    shapes = [(40, 50), (7,), (6, 3, 5, 5), (1,), (0, 3), (100_003,), (CHUNK + 1,)]
    params = [randn(s, dtype, g) for s in shapes]
    snaps = [randn(s, dtype, g) for s in shapes]
    snaps[0].view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-40]).to(dtype)
    masks = [
        (torch.rand(s, generator=g) < 0.6) if i % 3 != 1 else None for i, s in enumerate(shapes)
    ]
    states = [randn(s, dtype, g) for s in shapes for _ in range(per)]
    results = []
    for dev in (CPU, CUDA):
        p, s, m, st = (to_dev(x, dev) for x in (params, snaps, masks, states))
        offs = [offset_copy(t, 1) for t in p[:2]]  # misaligned params too
        ops.rewind_tensors(offs + p[2:], s, m, st)
        results.append(offs + p[2:] + st)
    for i, (a, b) in enumerate(zip(*results)):
        assert_same_bits(a, b, f"tensor {i}")


@pytest.mark.parametrize("name", ["sgd_damp_max", "adamw_ams"])
def test_rewind_model_and_optimizer_on_cuda(name):
    cls, kw = OPTS[name]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.ReLU(), nn.Linear(30, 5))
    # one set of masks for both devices (training differs in rounding between CPU and GPU)
    masks = {n: torch.rand(p.shape) < 0.6 for n, p in model.named_parameters() if p.dim() > 1}
    runs = []
    for dev in (CPU, CUDA):
        m = copy.deepcopy(model).to(dev)
        snap = snapshot(m)
        opt = cls(m.named_parameters(), **kw)
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            x, y = torch.randn(16, 20, generator=g), torch.randn(16, 5, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(m(x.to(dev)), y.to(dev)).backward()
            opt.step()
        rewind(m, snap, {n: mk.to(dev) for n, mk in masks.items()}, optimizer=opt)
        for k, p in m.named_parameters():
            for key, buf in opt.state.get(p, {}).items():
                if isinstance(buf, torch.Tensor):
                    assert torch.count_nonzero(buf) == 0, (k, key)  # buffers and step
        runs.append(m)
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert same_bits(a, b) if a.is_floating_point() else torch.equal(a, b.cpu()), k


# -------------------------------------------------------------------------------------------
# 4. streams and devices


def test_kernels_run_on_the_current_stream():
    """Work queued on a side stream before the call must be seen by the kernels: if they ran
    on another stream they would read the parameters before the (delayed) copy lands."""
    shapes = [(1000, 300), (77,)]
    params0, grads, masks = make_problem(shapes, torch.float32, 11, True, 2)
    expected, eopt = run_optimizer(MaskedAdam, dict(lr=1e-2), params0, grads, masks, CUDA)
    emasks = prune_smallest([p.detach() for p in expected], 5000)

    params = [torch.zeros(s, device=CUDA, requires_grad=True) for s in shapes]
    opt = MaskedAdam(
        params, lr=1e-2, masks={p: m.to(CUDA) for p, m in zip(params, masks) if m is not None}
    )
    src = [p.to(CUDA) for p in params0]
    gsrc = [[gr.to(CUDA) for gr in gs] for gs in grads]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of ms: the copy below lands late on `side`
        with torch.no_grad():
            for p, s in zip(params, src):
                p.copy_(s)
        for gs in gsrc:
            for p, gr in zip(params, gs):
                p.grad = gr
            opt.step()
        out = prune_smallest([p.detach() for p in params], 5000)
    side.synchronize()
    for a, b in zip(params, expected):
        assert same_bits(a, b)
    for a, b in zip(out, emasks):
        assert torch.equal(a, b)
    torch.cuda.synchronize()


def test_quick_side_stream_results_equal_default_stream():
    params0, grads, masks = make_problem(SHAPES, torch.bfloat16, 12, True, 3)
    pd, od = run_optimizer(MaskedAdamW, dict(lr=1e-2, amsgrad=True), params0, grads, masks, CUDA)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ps, os_ = run_optimizer(
            MaskedAdamW, dict(lr=1e-2, amsgrad=True), params0, grads, masks, CUDA
        )
        kd = kth_smallest_magnitude([p.detach() for p in ps], 100)
    s.synchronize()
    assert_optimizers_bitwise(pd, od, ps, os_, "side stream")
    assert kd == kth_smallest_magnitude([p.detach() for p in pd], 100)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    params0, grads, masks = make_problem([(300, 7), (5,)], torch.float32, 13, True, 3)
    pc, oc = run_optimizer(MaskedSGD, OPTS["sgd_nesterov"][1], params0, grads, masks, CPU)
    pg, og = run_optimizer(MaskedSGD, OPTS["sgd_nesterov"][1], params0, grads, masks, dev)
    assert torch.cuda.current_device() == 0, "the call must restore the current device"
    assert all(p.device == dev for p in pg)
    assert_optimizers_bitwise(pc, oc, pg, og, "cuda:1")
    out = prune_smallest([p.detach() for p in pg], 100)
    exp = oracle_prune([p.detach().cpu() for p in pg], 100)
    assert all(o.device == dev and torch.equal(o.cpu(), e) for o, e in zip(out, exp))
    snap = [p.detach().clone() for p in pg]
    ops.rewind_tensors([p.detach() for p in pg], snap, out, [])
    assert torch.cuda.current_device() == 0


# -------------------------------------------------------------------------------------------
# 5. tensors over 2**31 elements


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
def test_tensor_over_2_31_elements():
    if _free_bytes() < 40 * 2**30:
        pytest.skip("needs 40 GB of free GPU memory")
    n = 2**31 + 4099  # odd tail, elements past the 32-bit boundary
    dtype = torch.float16
    # known order statistics: 1.0 everywhere except three positions
    x = torch.ones(n, dtype=dtype, device=CUDA)
    x[3] = 2.0
    x[2**31 + 5] = -0.5
    x[n - 1] = 0.25
    assert kth_smallest_magnitude(x, 1) == 0.25
    assert kth_smallest_magnitude(x, 2) == 0.5
    assert kth_smallest_magnitude(x, 3) == 1.0
    assert kth_smallest_magnitude(x, n) == 2.0
    out = prune_smallest(x, 2)[0]
    assert int(out.logical_not().sum()) == 2
    assert not out[2**31 + 5] and not out[n - 1] and out[3]
    # ties pruned in flat order up to past the 2**31 boundary: 0.25 and 0.5 first, then the
    # first count - 2 ones; positions 3 and 2**31 + 5 hold no one, so the last pruned one is
    # at index (count - 2) - 1 + 2
    count = 2**31 + 10
    out = prune_smallest(x, count)[0]
    last = count - 2 + 1
    assert int(out.logical_not().sum()) == count
    assert not out[last] and out[last + 1] and not out[2**31 + 5]
    assert out[3]  # 2.0 is the largest: kept
    del out

    # the element-wise kernels: compare slices with the same update of the slice on the CPU
    m = torch.ones(n, dtype=torch.bool, device=CUDA)
    m[2**31 - 7 : 2**31 + 7 : 2] = False
    grad = torch.full((n,), 0.5, dtype=dtype, device=CUDA)
    grad[-3:] = -1.0
    slices = [slice(0, 64), slice(2**31 - 64, 2**31 + 64), slice(n - 64, n)]
    before = [(x[s].cpu(), grad[s].cpu(), m[s].cpu()) for s in slices]
    xp = x.clone().requires_grad_()
    xp.grad = grad
    opt = MaskedAdam([xp], lr=1e-2, masks={xp: m})
    opt.step()
    for s, (xs, gs, ms) in zip(slices, before):
        p = xs.clone().requires_grad_()
        p.grad = gs
        o = MaskedAdam([p], lr=1e-2, masks={p: ms})
        o.step()
        assert_same_bits(xp.detach()[s], p.detach(), f"adam slice {s}")
        assert_same_bits(opt.state[xp]["exp_avg_sq"][s], o.state[p]["exp_avg_sq"], "exp_avg_sq")
    snap = x.clone()
    ops.rewind_tensors([xp.detach()], [snap], [m], [opt.state[xp]["exp_avg"]])
    for s in slices:
        assert_same_bits(xp.detach()[s], torch.where(m[s], snap[s], 0).to(dtype), f"rewind {s}")
        assert int(torch.count_nonzero(opt.state[xp]["exp_avg"][s])) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quick_per_layer_thresholds_batched_match_cpu(dtype):
    """prune_smallest_each: every tensor its own count, all thresholds selected with one
    batched histogram launch per radix pass; equal to the CPU result bit for bit."""
    g = torch.Generator().manual_seed(5)
    shapes = [(300, 78), (1,), (0,), (4097,), (16, 3, 3, 3)]
    tensors = [torch.randint(-5, 6, s, generator=g).to(dtype) for s in shapes]  # heavy ties
    masks = [None, None, None, torch.rand(4097, generator=g) < 0.7, None]
    counts = [2340, 0, 0, 1000, 86]
    cpu = lottery_ext.prune_smallest_each(tensors, counts, masks)
    gpu = lottery_ext.prune_smallest_each(
        to_dev(tensors, CUDA), counts, [None if m is None else m.to(CUDA) for m in masks]
    )
    for c, o in zip(cpu, gpu):
        assert torch.equal(c, o.cpu())
