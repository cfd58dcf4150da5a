"""Property-based tests (hypothesis): random op sequences on random parameters.

Each example builds the same world twice from a drawn seed -- parameters of random shapes
(0- and 1-element dims, odd sizes), dtypes and memory layouts (contiguous, channels_last,
channels_last_3d, permuted/transposed views, sliced non-contiguous views, disjoint views of
one storage), a masked optimizer with random options and masks -- then applies one random
sequence of operations to both: ``step`` (random gradients, NaN/inf in pruned entries),
``set_mask`` (prunes more, or None), a ``state_dict`` round trip into a fresh optimizer,
a layout change of a parameter (``p.data = p.data.contiguous(memory_format=...)``, what
``model.to(memory_format=...)`` does), ``lottery_ext.snapshot`` and ``lottery_ext.rewind``.
One world runs natively, the other inside ``_ops.reference_backend()``. After every op:

- the pruned entries (mask False) of every parameter and state buffer are exactly 0;
- the optimizer's masks are the expected ones, its buffers have the parameter's dtype,
  device and shape, and the op kept each parameter's storage and strides (only a layout
  change may change them);
- kept entries, buffers, step counters and shared storages agree between the two worlds,
  by logical index, within tests/test_optim.py's native-vs-reference tolerance ``TOL``;
- float32/float64 parameters and buffers also agree with torch.optim run on plain copies
  with masked gradients and re-masking (``Oracle``): the reference world shares
  lottery_ext's Python layer (layouts, state_dict, rewind), torch.optim does not.

Separately: aliased parameters (one tensor twice, one tensor in two groups, overlapping
views of one storage) are refused with a ValueError that says so, while disjoint views of
one storage are accepted and follow the reference.

Profiles: HYPOTHESIS_PROFILE=ci (default: few examples, no example database) or long
(500 examples per test; the @pytest.mark.slow variants then run long sequences on bigger
tensors). Every example seeds torch from its drawn ``seed``, so a printed falsifying example
reproduces.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, note, settings  # the [test] extra has it
from hypothesis import strategies as st

import lottery_ext
from conftest import DEVICES, TOL
from lottery_ext import MaskedAdam, MaskedAdamW, MaskedSGD, _ops

# -------------------------------------------------------------------------------------------
# profiles

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # conftest's autouse _seed; examples reseed
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
# ci: no example database (nothing written into the checkout) and no "explain" phase (it
# reruns a failing example many times; the shrunk example is printed either way).
_CI_PHASES = [p for p in Phase if p is not Phase.explain]
settings.register_profile("ci", max_examples=30, database=None, phases=_CI_PHASES, **_COMMON)
settings.register_profile("long", max_examples=500, **_COMMON)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "ci")
PROFILE = settings.get_profile(PROFILE_NAME)
# The slow variants: a smoke run in the default profile, the full count when asked.
SLOW = settings(PROFILE, max_examples=4 if PROFILE_NAME == "ci" else PROFILE.max_examples)

# -------------------------------------------------------------------------------------------
# what an example is made of

OPTIMIZERS = {"sgd": MaskedSGD, "adam": MaskedAdam, "adamw": MaskedAdamW}
BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MEMORY_FORMATS = {
    "contiguous": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
}
# 1.0: all True, 0.0: all False, else the fraction kept (drawn per entry)
DENSITIES = [1.0, 0.0, 0.5, 0.1, 0.3, 0.7, 0.9]
# A refusal of aliased parameters must say what is wrong (torch's own message for one tensor
# in two groups says "more than one parameter group").
ALIAS_MESSAGE = r"(?i)alias|overlap|shar(e|es|ed|ing)|same|duplicat|more than one|twice|repeat"


class Source(NamedTuple):
    """How one or two parameters are made.

    kind: contiguous | channels_last | channels_last_3d (4-D / 5-D, that memory format) |
    permuted (a dense view whose memory order is `extra` = dims permutation) | sliced (a view
    of a bigger tensor, `extra` = (dim, step, offset): non-contiguous, or offset-only) |
    split (two parameters: the two halves of one storage along `extra[0]`, interleaved
    (even/odd) when `extra[1]`, of a channels_last base when `extra[2]`)."""

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    extra: tuple = ()


class OptConfig(NamedTuple):
    kind: str
    kwargs: dict
    group_lr: float  # lr of the second param group
    named: bool  # built from (name, param) pairs, masks keyed by name


class Step(NamedTuple):
    no_grad: tuple[int, ...]  # parameters whose .grad is None for this step
    poison: bool  # NaN / +inf / -inf in the pruned gradient entries


class SetMask(NamedTuple):
    index: int
    density: float | None  # None: remove the mask; else keep old & (rand < density)
    layout: str  # contiguous | param (the parameter's strides) | reversed (dims reversed)


class RoundTrip(NamedTuple):
    """state_dict through torch.save / torch.load into a fresh optimizer on the same params."""


class ChangeLayout(NamedTuple):
    """p.data (and p.grad) to the other memory format: a contiguous 4-D (5-D) parameter to
    channels_last (channels_last_3d), any other to contiguous."""

    index: int


class TakeSnapshot(NamedTuple):
    """lottery_ext.snapshot(model): later rewinds go back here."""


class Rewind(NamedTuple):
    """lottery_ext.rewind(model, snap, None, optimizer)."""


class Case(NamedTuple):
    seed: int
    device: str
    sources: tuple[Source, ...]
    opt: OptConfig
    groups: tuple[int, ...]  # param group (0 or 1) of each parameter
    masks: tuple[float | None, ...]  # construction-time mask density per parameter
    ops: tuple


def _n_params(sources) -> int:
    return sum(2 if s.kind == "split" else 1 for s in sources)


# -------------------------------------------------------------------------------------------
# strategies

SIZES = [1, 2, 3, 5, 7, 0, 2, 3, 4, 6]  # sampled uniformly: 0 one time in 10
BIG_SIZES = [1, 2, 3, 5, 0, 7, 17, 33, 130, 4, 6]
# mostly sizes > 1, where memory formats differ
LAYOUT_SIZES = [2, 3, 5, 2, 3, 1, 0, 7]


@st.composite
def shapes(draw, min_rank, max_rank, sizes=SIZES):
    rank = draw(st.integers(min_rank, max_rank))
    pool = sizes if rank <= 2 else [s for s in sizes if s <= 5]  # 3-D to 5-D: small
    return tuple(draw(st.lists(st.sampled_from(pool), min_size=rank, max_size=rank)))


@st.composite
def sources(draw, kinds, sizes=SIZES):
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(DTYPES))
    if kind == "contiguous":
        return Source(kind, draw(shapes(0, 5, sizes)), dtype)
    if kind == "channels_last":
        return Source(kind, draw(shapes(4, 4, sizes)), dtype)
    if kind == "channels_last_3d":
        return Source(kind, draw(shapes(5, 5, sizes)), dtype)
    if kind == "permuted":
        shape = draw(shapes(2, 4, sizes))
        perm = tuple(draw(st.permutations(range(len(shape)))))
        return Source(kind, shape, dtype, perm)
    if kind == "sliced":
        shape = draw(shapes(1, 3, sizes))
        dim = draw(st.integers(0, len(shape) - 1))
        return Source(kind, shape, dtype, (dim, draw(st.sampled_from([2, 1, 3])), 1))
    assert kind == "split"
    channels_last = draw(st.booleans())
    shape = draw(shapes(4, 4, sizes)) if channels_last else draw(shapes(1, 3, sizes))
    dim = draw(st.integers(0, len(shape) - 1))
    return Source(kind, shape, dtype, (dim, draw(st.booleans()), channels_last))


@st.composite
def opt_configs(draw):
    kind = draw(st.sampled_from(list(OPTIMIZERS)))
    wd = draw(st.sampled_from([0.0, 1e-2]))
    maximize = draw(st.booleans())
    if kind == "sgd":
        momentum = draw(st.sampled_from([0.0, 0.9]))
        dampening = draw(st.sampled_from([0.0, 0.1]))
        nesterov = momentum != 0 and dampening == 0 and draw(st.booleans())
        kwargs = dict(
            lr=0.05,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=wd,
            maximize=maximize,
        )
    else:
        amsgrad = draw(st.booleans())
        kwargs = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=wd, amsgrad=amsgrad)
        kwargs["maximize"] = maximize
        if kind == "adam":
            kwargs["decoupled_weight_decay"] = draw(st.booleans())
    return OptConfig(kind, kwargs, draw(st.sampled_from([0.02, 0.005])), draw(st.booleans()))


def op_strategy(n: int, layout_changes: int, snapshots: bool = True):
    """Lists of one or two ops (a layout change is followed by a step: training goes on);
    `layout_changes`: how many of the choices are a layout change (0: none)."""
    index = st.integers(0, n - 1)
    step = st.builds(
        Step,
        st.lists(index, max_size=n, unique=True).map(lambda s: tuple(sorted(s))),
        st.booleans(),
    )
    set_mask = st.builds(
        SetMask,
        index,
        st.one_of(st.sampled_from(DENSITIES), st.none()),
        st.sampled_from(["contiguous", "param", "reversed"]),
    )
    options = [step, set_mask, st.just(RoundTrip()), step]  # steps: half the ops or so
    if snapshots:
        options += [st.just(TakeSnapshot()), st.just(Rewind()), step]
    options = [o.map(lambda op: [op]) for o in options]
    layout = st.builds(ChangeLayout, index)
    options += [st.tuples(layout, step).map(list)] * layout_changes
    return st.one_of(*options)


@st.composite
def cases(
    draw,
    kinds,
    max_sources=3,
    min_ops=1,
    max_ops=10,
    layout_changes=1,
    sizes=SIZES,
    snapshots=True,
):
    seed = draw(st.integers(0, 2**32 - 1))
    device = draw(st.sampled_from(DEVICES))
    srcs = tuple(draw(st.lists(sources(kinds, sizes), min_size=1, max_size=max_sources)))
    n = _n_params(srcs)
    opt = draw(opt_configs())
    groups = tuple(draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)))
    densities = st.one_of(st.none(), st.sampled_from(DENSITIES))
    masks = tuple(draw(st.lists(densities, min_size=n, max_size=n)))
    ops_lists = op_strategy(n, layout_changes, snapshots)
    drawn = draw(st.lists(ops_lists, min_size=min_ops, max_size=max_ops))
    ops = [op for pair in drawn for op in pair]
    return Case(seed, device, srcs, opt, groups, masks, tuple(ops))


@st.composite
def layout_cases(draw):
    """One parameter whose memory format can change (4-D / 5-D, or a permuted view), trained,
    moved to the other memory format, then trained on (with other ops in between)."""
    kind = draw(st.sampled_from(["channels_last", "contiguous", "channels_last_3d", "permuted"]))
    if kind == "contiguous":
        src = Source(kind, draw(shapes(4, 5, LAYOUT_SIZES)), draw(st.sampled_from(DTYPES)))
    else:
        src = draw(sources([kind], LAYOUT_SIZES))
    steps = st.builds(Step, st.just(()), st.booleans())
    before = draw(st.lists(steps, min_size=1, max_size=3))
    after = [op for ops in draw(st.lists(op_strategy(1, 0), max_size=3)) for op in ops]
    return Case(
        seed=draw(st.integers(0, 2**32 - 1)),
        device=draw(st.sampled_from(DEVICES)),
        sources=(src,),
        opt=draw(opt_configs()),
        groups=(0,),
        masks=(draw(st.one_of(st.sampled_from(DENSITIES), st.none())),),
        ops=(*before, ChangeLayout(0), *after, draw(steps)),
    )


# -------------------------------------------------------------------------------------------
# building a world


def _randn(shape, gen, dtype, device):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _make(src: Source, gen, device) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The parameter tensors of one source, and the storage they view (None if their own)."""
    shape, dtype = src.shape, src.dtype
    if src.kind in ("contiguous", "channels_last", "channels_last_3d"):
        t = _randn(shape, gen, dtype, device).contiguous(memory_format=MEMORY_FORMATS[src.kind])
        return [t], None
    if src.kind == "permuted":
        perm = src.extra
        inverse = [perm.index(d) for d in range(len(perm))]
        phys = _randn([shape[d] for d in perm], gen, dtype, device)
        return [phys.permute(inverse)], None
    if src.kind == "sliced":
        dim, step, offset = src.extra
        big = list(shape)
        big[dim] = offset + step * shape[dim] + 1
        base = _randn(big, gen, dtype, device)
        index = [slice(None)] * len(shape)
        index[dim] = slice(offset, offset + step * shape[dim], step)
        return [base[tuple(index)]], base
    dim, interleaved, channels_last = src.extra
    big = list(shape)
    big[dim] = 2 * shape[dim]
    base = _randn(big, gen, dtype, device)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    if interleaved:
        halves = [base[_along(dim, slice(k, None, 2))] for k in (0, 1)]
    else:
        halves = [base.narrow(dim, 0, shape[dim]), base.narrow(dim, shape[dim], shape[dim])]
    return halves, base


def _along(dim: int, s: slice) -> tuple:
    return (slice(None),) * dim + (s,)


def _in_layout(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`t`'s values in a new tensor with the strides autograd would give p's gradient."""
    return torch.empty_like(p, dtype=t.dtype).copy_(t)


def _arrange_mask(m: torch.Tensor, p: torch.Tensor, layout: str) -> torch.Tensor:
    m = m.to(p.device)
    if layout == "param":
        return torch.empty_like(p, dtype=torch.bool).copy_(m)
    if layout == "reversed" and m.dim() > 1:
        dims = tuple(reversed(range(m.dim())))
        return m.permute(dims).contiguous().permute(dims)
    return m.clone()


def _state_buffers(opt, p) -> dict[str, torch.Tensor]:
    state = opt.state.get(p, {})
    return {k: state[k] for k in BUFFERS if isinstance(state.get(k), torch.Tensor)}


class World:
    """Parameters, a model holding them, a masked optimizer and a snapshot, all built from
    a Case; ops run natively, or on the reference path when `reference`."""

    def __init__(self, case: Case, reference: bool):
        self.case, self.reference = case, reference
        device = torch.device(case.device)
        gen = torch.Generator().manual_seed(case.seed)
        self.params: list[torch.nn.Parameter] = []
        self.bases: list[torch.Tensor] = []
        for src in case.sources:
            tensors, base = _make(src, gen, device)
            self.params += [torch.nn.Parameter(t) for t in tensors]
            if base is not None:
                self.bases.append(base)
        self.names = [f"p{i}" for i in range(len(self.params))]
        self.model = torch.nn.Module()
        for name, p in zip(self.names, self.params):
            self.model.register_parameter(name, p)
        masks = {}
        mgen = torch.Generator().manual_seed(case.seed + 1)
        self.expected: list[torch.Tensor | None] = []
        for i, (p, density) in enumerate(zip(self.params, case.masks)):
            if density is None:
                self.expected.append(None)
                continue
            m = (torch.rand(p.shape, generator=mgen) < density).to(device)
            self.expected.append(m)
            masks[self.names[i] if case.opt.named else p] = m.clone()
        with self.backend():
            self.opt = self.new_optimizer(masks)
            self.snap = lottery_ext.snapshot(self.model)

    def backend(self):
        return _ops.reference_backend() if self.reference else contextlib.nullcontext()

    def new_optimizer(self, masks=None):
        cfg = self.case.opt
        groups = []
        for g in (0, 1):
            members = [i for i, gi in enumerate(self.case.groups) if gi == g]
            if not members:
                continue
            if cfg.named:
                group = {"params": [(self.names[i], self.params[i]) for i in members]}
            else:
                group = {"params": [self.params[i] for i in members]}
            if g == 1:
                group["lr"] = cfg.group_lr
            groups.append(group)
        return OPTIMIZERS[cfg.kind](groups, **cfg.kwargs, masks=masks)

    def apply(self, op, data):
        """Run `op`; `data`: the random tensors it needs, drawn once for both worlds."""
        with self.backend():
            if isinstance(op, Step):
                for p, g in zip(self.params, data):
                    p.grad = None if g is None else _in_layout(g.to(p.device), p)
                self.opt.step()
            elif isinstance(op, SetMask):
                p = self.params[op.index]
                self.opt.set_mask(p, None if data is None else _arrange_mask(data, p, op.layout))
            elif isinstance(op, RoundTrip):
                buf = io.BytesIO()
                torch.save(self.opt.state_dict(), buf)
                buf.seek(0)
                loaded = torch.load(buf, map_location="cpu")
                self.opt = self.new_optimizer()
                self.opt.load_state_dict(loaded)
            elif isinstance(op, ChangeLayout):  # what nn.Module._apply does for .to(...)
                p = self.params[op.index]
                fmt = _other_format(p)
                p.data = p.data.contiguous(memory_format=fmt)
                if p.grad is not None:
                    p.grad = p.grad.contiguous(memory_format=fmt)
            elif isinstance(op, TakeSnapshot):
                self.snap = lottery_ext.snapshot(self.model)
            elif isinstance(op, Rewind):
                lottery_ext.rewind(self.model, self.snap, None, self.opt)
            else:
                raise AssertionError(op)


class Oracle:
    """torch.optim on plain copies of the parameters, with the pruned gradient entries zeroed
    and the pruned entries of parameters and state re-zeroed after every step: independent
    of lottery_ext's Python layer (test_optim.py's masked-training oracle). Layouts do not
    matter to it; 16-bit parameters run in float32 and are not compared."""

    TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

    def __init__(self, w: World):
        self.case = w.case
        self.params = []
        for p in w.params:
            t = p.detach().clone()
            if t.dtype in (torch.float16, torch.bfloat16):
                t = t.float()
            self.params.append(torch.nn.Parameter(t))
        groups = []
        for g in (0, 1):
            members = [self.params[i] for i, gi in enumerate(w.case.groups) if gi == g]
            if members:
                groups.append({"params": members, **({"lr": w.case.opt.group_lr} if g else {})})
        self.opt = self.TORCH[w.case.opt.kind](groups, **w.case.opt.kwargs)
        self.snap = [p.detach().clone() for p in self.params]
        self.remask(w.expected)

    @torch.no_grad()
    def remask(self, masks, only=None):
        for i, (p, m) in enumerate(zip(self.params, masks)):
            if m is None or (only is not None and i != only):
                continue
            keep = m.to(p.device)
            p.masked_fill_(~keep, 0)
            for b in _state_buffers(self.opt, p).values():
                b.masked_fill_(~keep, 0)

    @torch.no_grad()
    def apply(self, op, data, masks):
        if isinstance(op, Step):
            for p, g, m in zip(self.params, data, masks):
                if g is not None:
                    g = g.to(device=p.device, dtype=p.dtype)
                    p.grad = g if m is None else torch.where(m.to(p.device), g, 0)
                else:
                    p.grad = None
            self.opt.step()
            self.remask(masks)
        elif isinstance(op, SetMask):
            self.remask(masks, only=op.index)
        elif isinstance(op, TakeSnapshot):
            self.snap = [p.detach().clone() for p in self.params]
        elif isinstance(op, Rewind):
            for p, s in zip(self.params, self.snap):
                p.copy_(s)
            self.opt.state.clear()
            self.remask(masks)
        # RoundTrip, ChangeLayout: nothing changes for torch.optim

    def check(self, w: World) -> None:
        """Parameters and buffers of `w` (float32/float64 only) agree with the oracle's."""
        for i, (p, q) in enumerate(zip(w.params, self.params)):
            if p.dtype not in (torch.float32, torch.float64):
                continue
            where = f"param {i} (shape {tuple(p.shape)}, {p.dtype}) vs torch.optim"
            torch.testing.assert_close(
                p.detach(), q.detach(), **TOL[p.dtype], msg=lambda s, w=where: f"{w}: {s}"
            )
            ours, theirs = _state_buffers(w.opt, p), _state_buffers(self.opt, q)
            for k, b in ours.items():
                if k in theirs:
                    torch.testing.assert_close(
                        b, theirs[k], **TOL[p.dtype], msg=lambda s, w=f"{where}, '{k}'": f"{w}: {s}"
                    )
                else:  # rewound, not stepped since: torch.optim has no state yet
                    assert int(torch.count_nonzero(b)) == 0, f"{where}: '{k}' not reset"
            assert set(theirs) <= set(ours), f"{where}: state {set(ours)} vs {set(theirs)}"


def _other_format(p: torch.Tensor) -> torch.memory_format:
    if p.dim() in (4, 5) and p.is_contiguous():
        return torch.channels_last if p.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _poison(g: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=g.dtype)
    pattern = bad[torch.arange(g.numel()) % 3].reshape(g.shape)
    return torch.where(keep, g, pattern)


def _op_data(op, expected, shapes_dtypes, gen):
    """The random tensors of one op (CPU, logical order), shared by both worlds; updates
    `expected` (the masks every later check expects)."""
    if isinstance(op, Step):
        grads = []
        for i, (shape, dtype) in enumerate(shapes_dtypes):
            g = _randn(shape, gen, dtype, "cpu")
            if i in op.no_grad:
                grads.append(None)
                continue
            m = expected[i]
            grads.append(_poison(g, m.cpu()) if op.poison and m is not None else g)
        return grads
    if isinstance(op, SetMask):
        if op.density is None:
            expected[op.index] = None
            return None
        shape, _ = shapes_dtypes[op.index]
        old = expected[op.index]
        new = torch.rand(shape, generator=gen) < op.density
        if old is not None:
            new &= old.cpu()
        expected[op.index] = new
        return new
    return None


# -------------------------------------------------------------------------------------------
# checks


def _check_world(w: World, label: str, before: list | None) -> None:
    """Invariants of one world: pruned entries 0, masks as expected, buffers like their
    parameter, storage and strides kept (`before`: (data_ptr, stride) per param, or None
    after a layout change)."""
    for i, p in enumerate(w.params):
        where = f"{label} world, param {i} (shape {tuple(p.shape)}, {p.dtype})"
        m = w.expected[i]
        stored = w.opt.get_mask(p)
        if m is None:
            assert stored is None, f"{where}: has a mask, expected none"
        else:
            assert stored is not None, f"{where}: mask missing"
            assert torch.equal(stored.cpu(), m.cpu()), f"{where}: mask differs (logically)"
        if before is not None:
            ptr, stride = before[i]
            assert p.data_ptr() == ptr, f"{where}: the op replaced the parameter's storage"
            assert p.stride() == stride, f"{where}: the op changed strides {stride} -> {p.stride()}"
        buffers = _state_buffers(w.opt, p)
        for k, b in buffers.items():
            assert (b.shape, b.dtype, b.device) == (p.shape, p.dtype, p.device), (
                f"{where}: state '{k}' is {tuple(b.shape)} {b.dtype} on {b.device}"
            )
        if m is not None:
            pruned = ~m.to(p.device)
            n = int(torch.count_nonzero(p.detach()[pruned]))
            assert n == 0, f"{where}: {n} pruned entries not zero"
            for k, b in buffers.items():
                n = int(torch.count_nonzero(b[pruned]))
                assert n == 0, f"{where}: {n} pruned entries of state '{k}' not zero"


def _check_same(native: World, ref: World) -> None:
    """Kept values, state and shared storages of the two worlds agree by logical index."""
    for i, (pn, pr) in enumerate(zip(native.params, ref.params)):
        where = f"param {i} (shape {tuple(pn.shape)}, {pn.dtype})"
        tol = dict(TOL[pn.dtype], equal_nan=True)
        torch.testing.assert_close(
            pn.detach(), pr.detach(), **tol, msg=lambda s, where=where: f"{where}: {s}"
        )
        sn, sr = native.opt.state.get(pn, {}), ref.opt.state.get(pr, {})
        assert set(sn) == set(sr), f"{where}: state keys {set(sn)} vs reference {set(sr)}"
        for k in sn:
            if k == "step":
                assert float(sn[k]) == float(sr[k]), f"{where}: step {sn[k]} vs {sr[k]}"
            elif isinstance(sn[k], torch.Tensor):
                torch.testing.assert_close(
                    sn[k], sr[k], **tol, msg=lambda s, w=f"{where}, state '{k}'": f"{w}: {s}"
                )
    for j, (bn, br) in enumerate(zip(native.bases, ref.bases)):
        torch.testing.assert_close(bn, br, **TOL[bn.dtype], equal_nan=True, msg=f"base {j}")


def _layout(w: World) -> list:
    return [(p.data_ptr(), p.stride()) for p in w.params]


def _run_case(case: Case) -> tuple[World, World]:
    torch.manual_seed(case.seed)
    worlds = []
    for label, reference in (("native", False), ("reference", True)):
        try:
            worlds.append(World(case, reference))
        except Exception as e:
            note(f"building the {label} world raised {type(e).__name__}: {e}")
            raise
    native, ref = worlds
    oracle = Oracle(native)
    _check_world(native, "native", None)
    _check_world(ref, "reference", None)
    _check_same(native, ref)
    oracle.check(native)
    gen = torch.Generator().manual_seed(case.seed + 2)
    shapes_dtypes = [(tuple(p.shape), p.dtype) for p in native.params]
    for k, op in enumerate(case.ops):
        data = _op_data(op, native.expected, shapes_dtypes, gen)
        ref.expected = list(native.expected)
        for label, w in (("native", native), ("reference", ref)):
            before = None if isinstance(op, ChangeLayout) else _layout(w)
            try:
                w.apply(op, data)
            except Exception as e:
                note(f"op {k} {op} raised {type(e).__name__} in the {label} world: {e}")
                raise
            note_prefix = f"after op {k} {op}: "
            try:
                _check_world(w, label, before)
            except AssertionError:
                note(note_prefix + f"{label} world broke an invariant")
                raise
        try:
            _check_same(native, ref)
        except AssertionError:
            note(f"after op {k} {op}: native and reference differ")
            raise
        oracle.apply(op, data, native.expected)
        try:
            oracle.check(native)
        except AssertionError:
            note(f"after op {k} {op}: the native world and the torch.optim oracle differ")
            raise
    return native, ref


# -------------------------------------------------------------------------------------------
# 1. random op sequences: native == reference, pruned entries exactly 0

DENSE = ("contiguous", "channels_last", "channels_last_3d", "permuted")
ALL_KINDS = DENSE + ("sliced", "split")


@PROFILE
@given(case=cases(DENSE, layout_changes=0))
def test_dense_params_ops_match_reference(case):
    """Dense parameters in fixed layouts: step / set_mask / state_dict / snapshot / rewind."""
    _run_case(case)


@PROFILE
@given(case=cases(DENSE, sizes=LAYOUT_SIZES, layout_changes=3))
def test_layout_changes_match_reference(case):
    """As above, plus ``p.data = p.data.contiguous(memory_format=...)`` between ops."""
    _run_case(case)


@PROFILE
@given(case=layout_cases())
def test_layout_change_mid_training_matches_reference(case):
    """Train, change the parameter's memory format (``model.to(memory_format=...)``), train
    on: masks and state must follow the parameter's logical indices."""
    _run_case(case)


@PROFILE
@given(case=cases(("sliced", "split"), layout_changes=0))
def test_strided_view_params_match_reference(case):
    """Sliced non-contiguous views and disjoint views of one storage as parameters."""
    _run_case(case)


@PROFILE
@given(case=cases(ALL_KINDS, layout_changes=1))
def test_any_params_any_ops_match_reference(case):
    """Every kind of parameter and every op together."""
    _run_case(case)


@pytest.mark.slow
@SLOW
@given(case=cases(ALL_KINDS, max_sources=6, min_ops=12, max_ops=30, sizes=BIG_SIZES))
def test_long_sequences_match_reference(case):
    """Long op sequences on more, bigger parameters (several native threads per tensor)."""
    _run_case(case)


@pytest.mark.slow
@SLOW
@given(case=cases(DENSE, max_sources=6, min_ops=12, max_ops=30, sizes=BIG_SIZES, layout_changes=0))
def test_long_sequences_dense_params_match_reference(case):
    """The long variant of test_dense_params_ops_match_reference."""
    _run_case(case)


# -------------------------------------------------------------------------------------------
# 2. aliasing: overlapping parameters refused, disjoint views accepted


class AliasCase(NamedTuple):
    seed: int
    device: str
    pattern: str
    via: str  # one_group | two_groups | add_param_group
    opt: OptConfig
    dtype: torch.dtype
    rows: int
    cols: int
    shift: int


def _aliased(case: AliasCase) -> list[torch.nn.Parameter]:
    """Two parameters sharing memory (the same tensor twice for 'same_tensor')."""
    gen = torch.Generator().manual_seed(case.seed)
    r, c, k = case.rows, case.cols, case.shift
    if case.pattern == "same_tensor":
        p = torch.nn.Parameter(_randn((r, c), gen, case.dtype, case.device))
        return [p, p]
    if case.pattern == "overlapping_rows":  # rows [0, r) and [k, k + r), 0 < k < r
        base = _randn((r + k, c), gen, case.dtype, case.device)
        views = [base[:r], base[k : k + r]]
    elif case.pattern == "whole_and_part":
        base = _randn((r, c), gen, case.dtype, case.device)
        views = [base, base[k:]]
    elif case.pattern == "transposed":
        base = _randn((r, c), gen, case.dtype, case.device)
        views = [base, base.t()]
    elif case.pattern == "flattened":
        base = _randn((r, c), gen, case.dtype, case.device)
        views = [base, base.view(-1)]
    elif case.pattern == "strided_columns":  # columns ::2 and ::3 (column 0 in both)
        base = _randn((r, 3 * c), gen, case.dtype, case.device)
        views = [base[:, ::2], base[:, ::3]]
    else:
        raise AssertionError(case.pattern)
    return [torch.nn.Parameter(v) for v in views]


@st.composite
def alias_cases(draw):
    rows = draw(st.integers(2, 9))
    return AliasCase(
        seed=draw(st.integers(0, 2**32 - 1)),
        device=draw(st.sampled_from(DEVICES)),
        pattern=draw(
            st.sampled_from(
                [
                    "same_tensor",
                    "overlapping_rows",
                    "whole_and_part",
                    "transposed",
                    "flattened",
                    "strided_columns",
                ]
            )
        ),
        via=draw(st.sampled_from(["one_group", "two_groups", "add_param_group"])),
        opt=draw(opt_configs()),
        dtype=draw(st.sampled_from(DTYPES)),
        rows=rows,
        cols=draw(st.integers(1, 7)),
        shift=draw(st.integers(1, rows - 1)),
    )


@PROFILE
@given(case=alias_cases())
def test_aliased_params_are_refused(case):
    """One tensor twice in a group, one tensor in two groups, two parameters overlapping in
    memory: a ValueError naming the aliasing at construction, add_param_group or step."""
    torch.manual_seed(case.seed)
    a, b = _aliased(case)
    cls, kwargs = OPTIMIZERS[case.opt.kind], case.opt.kwargs
    with pytest.raises(ValueError, match=ALIAS_MESSAGE), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns (only) about duplicates in one group
        if case.via == "one_group":
            opt = cls([a, b], **kwargs)
        elif case.via == "two_groups":
            opt = cls([{"params": [a]}, {"params": [b], "lr": case.opt.group_lr}], **kwargs)
        else:
            opt = cls([a], **kwargs)
            opt.add_param_group({"params": [b], "lr": case.opt.group_lr})
        for p in (a, b):
            p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, dtype=torch.float64))
        opt.step()


@PROFILE
@given(case=cases(("split",), layout_changes=0))
def test_disjoint_views_of_one_storage_match_reference(case):
    """Two halves (blocks or even/odd interleaved, along any dim, of a contiguous or
    channels_last tensor) as two parameters: accepted, updated in place in the shared
    storage, same result as the reference path."""
    native, _ = _run_case(case)
    # the parameters still view their base: the base holds the optimizer's updates
    for i, src in enumerate(case.sources):
        base = native.bases[i]
        p0, p1 = native.params[2 * i], native.params[2 * i + 1]
        dim, interleaved, _ = src.extra
        n = src.shape[dim]
        if interleaved:
            parts = [base[_along(dim, slice(k, None, 2))] for k in (0, 1)]
        else:
            parts = [base.narrow(dim, 0, n), base.narrow(dim, n, n)]
        assert torch.equal(parts[0], p0.detach()) and torch.equal(parts[1], p1.detach())
