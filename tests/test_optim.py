"""MaskedSGD / MaskedAdam / MaskedAdamW against torch.optim, the reference path and themselves.

Oracles used here:
- torch.optim (no masks, or all-True masks): float32/float64 parity to rounding;
- torch.optim on a copy whose gradient is zeroed where the mask is False and whose parameter
  and state are re-masked after every step: an independent oracle for masked training;
- the pure-PyTorch reference path (``_ops.reference_backend()``): same contract as the
  compiled core, including float32 math for 16-bit parameters.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools

import pytest
import torch

from conftest import TOL
from lottery_ext import MaskedAdam, MaskedAdamW, MaskedSGD, _ops, _reference

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, MaskedSGD),
    "adam": (torch.optim.Adam, MaskedAdam),
    "adamw": (torch.optim.AdamW, MaskedAdamW),
}
BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
EXACT = dict(rtol=0, atol=0)

# -------------------------------------------------------------------------------------------
# configurations


def _sgd_configs():
    out = []
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 1e-2), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch rejects these
        kw = dict(
            lr=0.05,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=wd,
            maximize=maximize,
        )
        cid = f"sgd-m{momentum}-d{dampening}-n{int(nesterov)}-wd{wd}-max{int(maximize)}"
        out.append(pytest.param("sgd", kw, id=cid))
    return out


def _adam_configs():
    out = []
    for wd, amsgrad, maximize, decoupled in itertools.product(
        (0.0, 1e-2), (False, True), (False, True), (False, True)
    ):
        kw = dict(
            lr=1e-2,
            weight_decay=wd,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled,
        )
        cid = f"adam-wd{wd}-ams{int(amsgrad)}-max{int(maximize)}-dec{int(decoupled)}"
        out.append(pytest.param("adam", kw, id=cid))
    for wd, amsgrad, maximize in itertools.product((0.0, 1e-2), (False, True), (False, True)):
        kw = dict(lr=1e-2, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)
        cid = f"adamw-wd{wd}-ams{int(amsgrad)}-max{int(maximize)}"
        out.append(pytest.param("adamw", kw, id=cid))
    return out


ALL_CONFIGS = _sgd_configs() + _adam_configs()

# One configuration per optimizer that creates every state buffer it can have (torch's
# default betas: test_adam_float32_beta2_rounding_bias guards 1 - beta being taken in double).
BETAS = (0.9, 0.999)
FULL = {
    "sgd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_damp": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, maximize=True),
    "adam": dict(lr=1e-2, betas=BETAS, weight_decay=1e-2, amsgrad=True),
    "adamw": dict(lr=1e-2, betas=BETAS, weight_decay=1e-2, amsgrad=True, maximize=True),
}
FULL_IDS = list(FULL)


def _kind(key):
    return "sgd" if key.startswith("sgd") else key


SHAPES = [(7,), (33, 17), (3, 5, 7, 9), (1,), (), (0,), (4, 0, 3)]

# -------------------------------------------------------------------------------------------
# helpers


def _new_params(shapes, dtype=torch.float32, device="cpu"):
    return [
        torch.randn(s, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
        for s in shapes
    ]


def _copy(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_() for p in params]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().clone().to(p.dtype)


def _state_tensors(opt, p):
    state = opt.state.get(p, {})
    return {k: state[k] for k in BUFFERS if isinstance(state.get(k), torch.Tensor)}


def _assert_same_state(opt_a, params_a, opt_b, params_b, tol):
    """Params and per-parameter state of two optimizers agree (state keys included)."""
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pb.detach(), pa.detach(), **tol)
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), (set(sa), set(sb))
        for k in sa:
            if k == "step":
                assert float(sb[k]) == float(sa[k])
            elif isinstance(sa[k], torch.Tensor):
                assert sb[k].stride() == sa[k].stride() or sa[k].numel() <= 1
                torch.testing.assert_close(sb[k], sa[k], **tol)
            else:
                assert sb[k] == sa[k]


def _assert_pruned_zero(opt, p, mask):
    pruned = ~mask
    assert torch.count_nonzero(p.detach()[pruned]) == 0, "pruned parameter entries not zero"
    for k, buf in _state_tensors(opt, p).items():
        assert torch.count_nonzero(buf[pruned]) == 0, f"pruned entries of {k} not zero"


def _remask(opt, params, masks):
    """Oracle helper: zero the pruned entries of a torch.optim optimizer's params and state."""
    with torch.no_grad():
        for p, m in zip(params, masks):
            p.masked_fill_(~m, 0)
            for buf in _state_tensors(opt, p).values():
                buf.masked_fill_(~m, 0)


def _poison(g, mask, k):
    """Put NaN / +inf / -inf in the pruned entries of a gradient."""
    values = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=g.dtype)
    idx = (torch.arange(g.numel()) + k) % 3
    bad = values[idx].reshape(g.shape).to(g.device)
    return torch.empty_like(g).copy_(torch.where(mask, g, bad))  # keeps g's strides


def _run_parity(name, kw, shapes, dtype, device, steps=20):
    torch_cls, masked_cls = OPTIMIZERS[name]
    ref = _new_params(shapes, dtype, device)
    ours = _copy(ref)
    start = [p.detach().clone() for p in ref]
    t_opt, m_opt = torch_cls(ref, **kw), masked_cls(ours, **kw)
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in ref]
        _set_grads(ref, grads)
        _set_grads(ours, grads)
        t_opt.step()
        m_opt.step()
    return t_opt, ref, m_opt, ours, start


# -------------------------------------------------------------------------------------------
# 1. parity with torch.optim, no masks


@pytest.mark.parametrize("real_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", ALL_CONFIGS)
def test_parity_with_torch(name, kw, real_dtype, device):
    t_opt, ref, m_opt, ours, start = _run_parity(name, kw, SHAPES, real_dtype, device)
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[real_dtype])
    # the run moved the parameters (the comparison is not between two untouched copies)
    assert (ours[1].detach() - start[1]).abs().min() > 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_parity_param_groups_with_different_lr(name, device):
    torch_cls, masked_cls = OPTIMIZERS[name]
    ref = _new_params([(7,), (33, 17), (3, 5, 7, 9), (1,)], torch.float32, device)
    ours = _copy(ref)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.1},
            {"params": [ps[2]], "lr": 1e-3, "weight_decay": 1e-2},
            {"params": [ps[3]]},
        ]

    # betas exactly representable in float32: see test_adam_float32_beta2_rounding_bias
    kw = dict(lr=0.02, momentum=0.9) if name == "sgd" else dict(lr=0.02, betas=BETAS)
    t_opt, m_opt = torch_cls(groups(ref), **kw), masked_cls(groups(ours), **kw)
    start = [p.detach().clone() for p in ours]
    for _ in range(20):
        grads = [torch.randn_like(p) for p in ref]
        _set_grads(ref, grads)
        _set_grads(ours, grads)
        t_opt.step()
        m_opt.step()
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])
    # the lr actually differs between groups: group 0 moved much further than group 1
    moved = [(p.detach() - s).abs().mean().item() for p, s in zip(ours, start)]
    assert moved[0] > 5 * moved[2]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_float32_beta2_rounding_bias(name):
    if not _ops.uses_native(torch.device("cpu")):
        pytest.skip("compiled core not loaded")
    torch_cls, masked_cls = OPTIMIZERS[name]
    kw = dict(lr=0.1, betas=(0.9, 0.9999))
    ref = _new_params([(33, 17)])
    ours, truth = _copy(ref), _copy(ref, torch.float64)
    opts = [torch_cls(ref, **kw), masked_cls(ours, **kw), torch_cls(truth, **kw)]
    for _ in range(20):
        g = torch.randn(33, 17, dtype=torch.float64)
        for opt, ps in zip(opts, (ref, ours, truth)):
            _set_grads(ps, [g])
            opt.step()
    err_torch = (ref[0].detach().double() - truth[0].detach()).abs().max().item()
    err_ours = (ours[0].detach().double() - truth[0].detach()).abs().max().item()
    # torch.optim's float32 error is ~1e-6 here: the masked optimizer may be a little worse
    assert err_ours <= 4 * err_torch + 1e-6, (err_ours, err_torch)
    torch.testing.assert_close(ours[0].detach(), ref[0].detach(), **TOL[torch.float32])


@pytest.mark.parametrize("name,kw", [c for c in ALL_CONFIGS if "max0" in c.id][::3])
def test_grad_none_is_skipped_like_torch(name, kw):
    torch_cls, masked_cls = OPTIMIZERS[name]
    ref = _new_params([(33, 17), (7,), (5,)])
    ours = _copy(ref)
    t_opt, m_opt = torch_cls(ref, **kw), masked_cls(ours, **kw)
    never = ours[2].detach().clone()
    for step in range(20):
        grads = [torch.randn_like(p) for p in ref]
        grads[2] = None  # never has a gradient
        if step % 3 == 1:
            grads[1] = None  # only sometimes
        _set_grads(ref, grads)
        _set_grads(ours, grads)
        t_opt.step()
        m_opt.step()
    assert torch.equal(ours[2].detach(), never)
    assert not m_opt.state.get(ours[2])  # no state created for a param never stepped
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])
    if name != "sgd":
        assert float(m_opt.state[ours[1]]["step"]) == float(m_opt.state[ours[0]]["step"]) - 7


@pytest.mark.parametrize("name,kw", ALL_CONFIGS[::2])
def test_all_true_masks_match_torch_and_unmasked(name, kw):
    torch_cls, masked_cls = OPTIMIZERS[name]
    shapes = [(7,), (33, 17), (3, 5, 7, 9), (1,)]
    ref = _new_params(shapes)
    ours, plain = _copy(ref), _copy(ref)
    t_opt = torch_cls(ref, **kw)
    m_opt = masked_cls(ours, **kw, masks={p: torch.ones_like(p, dtype=torch.bool) for p in ours})
    u_opt = masked_cls(plain, **kw)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in ref]
        for ps in (ref, ours, plain):
            _set_grads(ps, grads)
        t_opt.step()
        m_opt.step()
        u_opt.step()
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])
    # an all-True mask is the identity: bit-identical to the unmasked masked optimizer
    _assert_same_state(u_opt, plain, m_opt, ours, EXACT)


# -------------------------------------------------------------------------------------------
# 2. masked behaviour

MASK_SHAPES = [(33, 17), (7,), (3, 5, 7, 9), (1,)]


@pytest.mark.parametrize("density", [0.0, 0.02, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("key", FULL_IDS)
def test_masked_training(key, density, dtype, device):
    name = _kind(key)
    kw = FULL[key]
    torch_cls, masked_cls = OPTIMIZERS[name]
    start = _new_params(MASK_SHAPES, dtype, device)
    masks = [torch.rand(p.shape, device=device) < density for p in start]
    native, refp = _copy(start), _copy(start)
    opt_n = masked_cls(native, **kw, masks=dict(zip(native, masks)))
    opt_r = masked_cls(refp, **kw, masks=dict(zip(refp, masks)))
    # masks are applied at construction
    for p, m in zip(native, masks):
        _assert_pruned_zero(opt_n, p, m)
    use_oracle = dtype in (torch.float32, torch.float64)
    if use_oracle:
        orc = _copy(start)
        opt_o = torch_cls(orc, **kw)
        _remask(opt_o, orc, masks)
    tol = TOL[dtype]
    for step in range(50):
        grads = [torch.randn_like(p) for p in start]
        poisoned = [_poison(g, m, step) for g, m in zip(grads, masks)]
        _set_grads(native, poisoned)
        _set_grads(refp, poisoned)
        opt_n.step()
        with _ops.reference_backend():
            opt_r.step()
        for p, m in zip(native, masks):
            _assert_pruned_zero(opt_n, p, m)
            assert torch.isfinite(p.detach()).all()
        for p, m in zip(refp, masks):
            _assert_pruned_zero(opt_r, p, m)
        if use_oracle:
            _set_grads(orc, [torch.where(m, g, 0) for g, m in zip(grads, masks)])
            opt_o.step()
            _remask(opt_o, orc, masks)
        if step % 10 == 9 or step == 0:
            _assert_same_state(opt_r, refp, opt_n, native, tol)
            if use_oracle:
                _assert_same_state(opt_o, orc, opt_n, native, tol)
    # surviving entries did move (16-bit storage can bring a lone entry back to its start)
    for p, s, m in zip(native, start, masks):
        if m.sum() > 8:
            assert not torch.equal(p.detach()[m], s.detach()[m])


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_tracks_float32_torch(name, low):
    """16-bit params (float32 math, 16-bit storage) stay near torch.optim run in float32."""
    kw = FULL[name]
    torch_cls, masked_cls = OPTIMIZERS[name]
    start = _new_params([(33, 17), (7,)], low)
    mask = torch.rand(33, 17) < 0.5
    ours = _copy(start)
    ref32 = _copy(start, torch.float32)
    opt = masked_cls(ours, **kw, masks={ours[0]: mask})
    opt32 = torch_cls(ref32, **kw)
    _remask(opt32, ref32[:1], [mask])
    for _ in range(20):
        grads = [torch.randn(p.shape) for p in start]
        _set_grads(ours, grads)
        g32 = [torch.where(mask, grads[0], 0), grads[1]]
        _set_grads(ref32, g32)
        opt.step()
        opt32.step()
        _remask(opt32, ref32[:1], [mask])
    loose = dict(rtol=5e-2, atol=5e-2) if low == torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    for p, q in zip(ours, ref32):
        assert p.dtype == low
        torch.testing.assert_close(p.detach().float(), q.detach(), **loose)
    for k, buf in _state_tensors(opt, ours[0]).items():
        assert buf.dtype == low, k  # state kept in the param dtype


@pytest.mark.parametrize("key", FULL_IDS)
def test_set_mask_zeroes_param_and_existing_state_now(key):
    name = _kind(key)
    _, masked_cls = OPTIMIZERS[name]
    params = _new_params([(33, 17), (7,)])
    opt = masked_cls(params, **FULL[key])
    for _ in range(3):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.step()
    p = params[0]
    before_p = p.detach().clone()
    before = {k: v.clone() for k, v in _state_tensors(opt, p).items()}
    expected = {"momentum_buffer"} if name == "sgd" else set(BUFFERS[1:])
    assert set(before) == expected
    for v in before.values():
        assert torch.count_nonzero(v) == v.numel()
    mask = torch.rand(33, 17) < 0.5
    opt.set_mask(p, mask)
    _assert_pruned_zero(opt, p, mask)
    assert torch.equal(p.detach()[mask], before_p[mask])
    for k, v in _state_tensors(opt, p).items():
        assert torch.equal(v[mask], before[k][mask]), k
    # the other parameter is untouched
    assert opt.get_mask(params[1]) is None
    assert torch.count_nonzero(params[1].detach()) == 7


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_get_mask_and_remove_mask(name):
    _, masked_cls = OPTIMIZERS[name]
    params = _new_params([(33, 17), (7,)])
    mask = torch.rand(33, 17) < 0.3
    opt = masked_cls(params, lr=1e-2)
    assert opt.get_mask(params[0]) is None and opt.masks == {}
    opt.set_mask(params[0], mask)
    stored = opt.get_mask(params[0])
    assert stored.dtype == torch.bool and torch.equal(stored, mask)
    assert set(opt.masks) == {params[0]}
    # the optimizer keeps its own copy: changing the caller's tensor changes nothing
    original = mask.clone()
    mask.fill_(True)
    assert torch.equal(opt.get_mask(params[0]), original)
    _set_grads(params, [torch.randn_like(p) for p in params])
    opt.step()
    _assert_pruned_zero(opt, params[0], original)
    # remove: pruned entries are trained again
    opt.set_mask(params[0], None)
    assert opt.get_mask(params[0]) is None and opt.masks == {}
    for _ in range(2):
        _set_grads(params, [torch.randn_like(p) for p in params])
        opt.step()
    assert torch.count_nonzero(params[0].detach()[~original]) == (~original).sum()
    # removing a mask that is not there is fine; a foreign tensor is not
    opt.set_mask(params[1], None)
    with pytest.raises(ValueError):
        opt.get_mask(torch.zeros(3))
    with pytest.raises(ValueError):
        opt.set_mask(torch.zeros(3), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_set_mask_rejects_bad_masks(name):
    _, masked_cls = OPTIMIZERS[name]
    p = _new_params([(4, 5)])[0]
    opt = masked_cls([p], lr=1e-2)
    with pytest.raises(TypeError):
        opt.set_mask(p, torch.ones(4, 5))  # float, not bool
    with pytest.raises(ValueError):
        opt.set_mask(p, torch.ones(5, 4, dtype=torch.bool))
    assert opt.get_mask(p) is None


def _mlp():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    ).double()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masks_keyed_by_param_and_by_name(name):
    _, masked_cls = OPTIMIZERS[name]
    model_a = _mlp()
    model_b = copy.deepcopy(model_a)
    m0 = torch.rand(16, 8) < 0.5
    m2 = torch.rand(4) < 0.5
    opt_a = masked_cls(model_a.named_parameters(), lr=1e-2, masks={"0.weight": m0, "2.bias": m2})
    opt_b = masked_cls(
        model_b.parameters(), lr=1e-2, masks={model_b[0].weight: m0, model_b[2].bias: m2}
    )
    assert torch.equal(opt_a.get_mask(model_a[0].weight), m0)
    assert torch.equal(opt_a.get_mask(model_a[2].bias), m2)
    assert opt_a.get_mask(model_a[0].bias) is None
    for opt, model in ((opt_a, model_a), (opt_b, model_b)):
        _assert_pruned_zero(opt, model[0].weight, m0)
        _assert_pruned_zero(opt, model[2].bias, m2)
    x = torch.randn(32, 8, dtype=torch.float64)
    for _ in range(5):
        for opt, model in ((opt_a, model_a), (opt_b, model_b)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            _assert_pruned_zero(opt, model[0].weight, m0)
            _assert_pruned_zero(opt, model[2].bias, m2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="no parameter named"):
        masked_cls(_mlp().named_parameters(), masks={"nope.weight": m0})
    with pytest.raises(ValueError, match="named_parameters"):
        masked_cls(_mlp().parameters(), masks={"0.weight": m0})


# -------------------------------------------------------------------------------------------
# 3. native vs reference: mixed dtypes in one group, non-contiguous dense params


def _mixed_params():
    f32 = torch.float32
    raw = [
        torch.randn(300, 257),  # large: several threads in the native core
        torch.randn(33, 17, dtype=torch.bfloat16),
        torch.randn(65, dtype=torch.float64),
        torch.randn(7, dtype=torch.float16),
        torch.randn(5, 7).t(),  # transposed view
        torch.randn(9, 6, dtype=torch.bfloat16).t(),
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        torch.randn(2, 3, 4, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last),
        torch.randn(3, 4, 5, dtype=torch.float64).permute(2, 0, 1),
        torch.randn(1),
        torch.randn(0),
        torch.randn(129, dtype=f32),
    ]
    return [torch.nn.Parameter(t) for t in raw]


def _clone_layout(params):
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
        q.copy_(p.detach())
        out.append(torch.nn.Parameter(q))
    return out


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("key", FULL_IDS)
def test_native_matches_reference_mixed_group(key, masked):
    if not _ops.uses_native(torch.device("cpu")):
        pytest.skip("compiled core not loaded: native and reference are the same path")
    name = _kind(key)
    _, masked_cls = OPTIMIZERS[name]
    native = _mixed_params()
    assert not native[4].is_contiguous() and not native[6].is_contiguous()
    refp = _clone_layout(native)
    masks = {}
    if masked:
        masks = {i: torch.rand(p.shape) < 0.4 for i, p in enumerate(native) if i % 3 != 2}
    opt_n = masked_cls(native, **FULL[key], masks={native[i]: m for i, m in masks.items()})
    opt_r = masked_cls(refp, **FULL[key], masks={refp[i]: m for i, m in masks.items()})
    for step in range(20):
        grads = []
        for p in native:
            g = torch.empty_like(p)  # same strides as the parameter
            g.copy_(torch.randn(p.shape, dtype=torch.float64))
            grads.append(g)
        for i, m in masks.items():
            grads[i] = _poison(grads[i], m, step)
        _set_grads(native, grads)
        _set_grads(refp, grads)
        for p, g in zip(native, grads):
            assert p.grad.stride() == g.stride() == p.stride()
        opt_n.step()
        with _ops.reference_backend():
            opt_r.step()
    for i, (pn, pr) in enumerate(zip(native, refp)):
        tol = TOL[pn.dtype]
        torch.testing.assert_close(pn.detach(), pr.detach(), **tol)
        for k, buf in _state_tensors(opt_n, pn).items():
            assert buf.dtype == pn.dtype and buf.stride() == pn.stride(), k
            torch.testing.assert_close(buf, opt_r.state[pr][k], **tol)
        if i in masks:
            assert opt_n.get_mask(pn).stride() == pn.stride() or pn.numel() <= 1
            _assert_pruned_zero(opt_n, pn, masks[i])
            _assert_pruned_zero(opt_r, pr, masks[i])


@pytest.mark.parametrize("key", ["sgd", "adam"])
def test_reference_backend_really_switches_path(key, monkeypatch):
    if not _ops.uses_native(torch.device("cpu")):
        pytest.skip("compiled core not loaded")
    name = _kind(key)
    fn = "sgd_step_" if name == "sgd" else "adam_step_"
    calls = []
    real = getattr(_reference, fn)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_reference, fn, spy)
    params = _new_params([(5,)])
    opt = OPTIMIZERS[name][1](params, **FULL[key])
    _set_grads(params, [torch.randn(5)])
    opt.step()
    assert calls == []
    with _ops.reference_backend():
        opt.step()
    assert calls == [1]
    assert _ops.uses_native(torch.device("cpu"))  # restored on exit


@pytest.mark.parametrize("key", FULL_IDS)
def test_noncontiguous_params_match_torch(key):
    name = _kind(key)
    torch_cls, masked_cls = OPTIMIZERS[name]
    raw = [
        torch.randn(5, 7).t(),
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        torch.randn(3, 4, 5).permute(1, 2, 0),
    ]
    ours = [torch.nn.Parameter(t) for t in raw]
    ref = _clone_layout(ours)
    t_opt, m_opt = torch_cls(ref, **FULL[key]), masked_cls(ours, **FULL[key])
    for _ in range(20):
        grads = [torch.randn(p.shape).to(memory_format=torch.contiguous_format) for p in ours]
        grads = [torch.empty_like(p).copy_(g) for p, g in zip(ours, grads)]
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        t_opt.step()
        m_opt.step()
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_autograd_grad_with_size1_dim_stride_difference(name):
    torch_cls, masked_cls = OPTIMIZERS[name]
    p = torch.nn.Parameter(torch.randn(7, 5).t().unsqueeze(0))  # (1, 5, 7), strides (5, 1, 5)
    q = torch.nn.Parameter(_clone_layout([p])[0].detach())
    w = torch.randn(1, 7, 5).transpose(1, 2)  # strides (35, 1, 5)
    for param in (p, q):
        (param * w).sum().backward()
    assert p.grad.stride() != p.stride()  # autograd kept it: equal except on the size-1 dim
    t_opt, m_opt = torch_cls([q], lr=0.1), masked_cls([p], lr=0.1)
    t_opt.step()
    m_opt.step()
    torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


# -------------------------------------------------------------------------------------------
# 4. state_dict


def _train(opt, params, grads):
    for gs in grads:
        _set_grads(params, gs)
        opt.step()


@pytest.mark.parametrize("key", FULL_IDS)
def test_state_dict_round_trip_continues_identically(key):
    name = _kind(key)
    _, masked_cls = OPTIMIZERS[name]
    shapes = [(33, 17), (7,), (3, 5, 7, 9), (1,)]
    params_a = _new_params(shapes)
    masks = {0: torch.rand(33, 17) < 0.5, 2: torch.rand(3, 5, 7, 9) < 0.2}
    groups = [{"params": params_a[:2]}, {"params": params_a[2:], "lr": 3e-3}]
    opt_a = masked_cls(groups, **FULL[key], masks={params_a[i]: m for i, m in masks.items()})
    grads = [[torch.randn(s) for s in shapes] for _ in range(20)]
    _train(opt_a, params_a, grads[:10])

    sd = opt_a.state_dict()
    assert set(sd["masks"]) == set(masks)
    for i, m in masks.items():
        assert torch.equal(sd["masks"][i], m)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)

    params_b = _copy(params_a)
    groups_b = [{"params": params_b[:2]}, {"params": params_b[2:], "lr": 0.5}]
    opt_b = masked_cls(groups_b, **dict(FULL[key], lr=0.5))  # no masks, other lr
    opt_b.load_state_dict(loaded)
    assert opt_b.param_groups[1]["lr"] == 3e-3
    for i, p in enumerate(params_b):
        if i in masks:
            assert torch.equal(opt_b.get_mask(p), masks[i])
        else:
            assert opt_b.get_mask(p) is None
    _assert_same_state(opt_a, params_a, opt_b, params_b, EXACT)
    for p in params_b:
        step = opt_b.state[p].get("step")
        if step is not None:
            assert step.dtype == torch.float32 and step.device.type == "cpu"

    _train(opt_a, params_a, grads[10:])
    _train(opt_b, params_b, grads[10:])
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for k, v in _state_tensors(opt_a, pa).items():
            assert torch.equal(v, opt_b.state[pb][k]), k
    for i, m in masks.items():
        _assert_pruned_zero(opt_b, params_b[i], m)


@pytest.mark.parametrize("key", FULL_IDS)
def test_torch_state_dict_loads_into_masked(key):
    name = _kind(key)
    torch_cls, masked_cls = OPTIMIZERS[name]
    shapes = [(33, 17), (7,)]
    ref = _new_params(shapes)
    t_opt = torch_cls(ref, **FULL[key])
    grads = [[torch.randn(s) for s in shapes] for _ in range(20)]
    _train(t_opt, ref, grads[:10])
    ours = _copy(ref)
    m_opt = masked_cls(ours, **FULL[key])
    m_opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))
    assert m_opt.masks == {}
    _train(t_opt, ref, grads[10:])
    _train(m_opt, ours, grads[10:])
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])


@pytest.mark.parametrize("key", FULL_IDS)
def test_masked_state_dict_loads_into_torch(key):
    # torch.optim.Optimizer.load_state_dict reads only "state" and "param_groups", so the
    # extra "masks" key is accepted as is (no need to pop it).
    name = _kind(key)
    torch_cls, masked_cls = OPTIMIZERS[name]
    shapes = [(33, 17), (7,)]
    ours = _new_params(shapes)
    mask = torch.rand(33, 17) < 0.5
    m_opt = masked_cls(ours, **FULL[key], masks={ours[0]: mask})
    grads = [[torch.randn(s) for s in shapes] for _ in range(20)]
    _train(m_opt, ours, grads[:10])
    sd = copy.deepcopy(m_opt.state_dict())
    assert "masks" in sd
    ref = _copy(ours)
    t_opt = torch_cls(ref, **FULL[key])
    t_opt.load_state_dict(sd)
    _assert_same_state(m_opt, ours, t_opt, ref, EXACT)
    # torch continues as the oracle: gradient masked, param and state re-masked
    for gs in grads[10:]:
        _set_grads(ours, gs)
        m_opt.step()
        _set_grads(ref, [torch.where(mask, gs[0], 0), gs[1]])
        t_opt.step()
        _remask(t_opt, ref[:1], [mask])
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])


@pytest.mark.parametrize(
    "name,kw",
    [
        pytest.param(
            *c.values,
            id=c.id,
        )
        for c in ALL_CONFIGS[::2]
    ],
)
def test_state_dict_structure_matches_torch(name, kw):
    torch_cls, masked_cls = OPTIMIZERS[name]
    ref = _new_params([(7,), (3, 4)])
    ours = _copy(ref)
    t_opt, m_opt = torch_cls(ref, **kw), masked_cls(ours, **kw)
    _set_grads(ref, [torch.randn(7), None])
    _set_grads(ours, [torch.randn(7), None])
    t_opt.step()
    m_opt.step()
    t_sd, m_sd = t_opt.state_dict(), m_opt.state_dict()
    assert set(m_sd) == set(t_sd) | {"masks"} and m_sd["masks"] == {}
    assert m_sd["param_groups"] == t_sd["param_groups"]
    assert {i: set(s) for i, s in m_sd["state"].items()} == {
        i: set(s) for i, s in t_sd["state"].items()
    }


# -------------------------------------------------------------------------------------------
# 5. drop-in behaviour


@pytest.mark.parametrize("sched", ["step", "lambda"])
@pytest.mark.parametrize("key", FULL_IDS)
def test_lr_schedulers(key, sched):
    name = _kind(key)
    torch_cls, masked_cls = OPTIMIZERS[name]
    ref = _new_params([(33, 17), (7,)], torch.float64)
    ours = _copy(ref)
    t_opt = torch_cls([{"params": ref[:1]}, {"params": ref[1:], "lr": 0.2}], **FULL[key])
    m_opt = masked_cls([{"params": ours[:1]}, {"params": ours[1:], "lr": 0.2}], **FULL[key])

    def make(opt):
        if sched == "step":
            return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 / (1.0 + e))

    t_s, m_s = make(t_opt), make(m_opt)
    lrs = []
    for _ in range(12):
        grads = [torch.randn_like(p) for p in ref]
        _set_grads(ref, grads)
        _set_grads(ours, grads)
        t_opt.step()
        m_opt.step()
        t_s.step()
        m_s.step()
        assert [g["lr"] for g in m_opt.param_groups] == [g["lr"] for g in t_opt.param_groups]
        lrs.append(m_opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 2  # the schedule did change lr
    assert m_s.get_last_lr() == t_s.get_last_lr()
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float64])


@pytest.mark.parametrize("key", FULL_IDS)
def test_closure(key):
    name = _kind(key)
    torch_cls, masked_cls = OPTIMIZERS[name]
    model_t = torch.nn.Linear(4, 3)
    model_m = copy.deepcopy(model_t)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    t_opt = torch_cls(model_t.parameters(), **FULL[key])
    m_opt = masked_cls(model_m.parameters(), **FULL[key])
    calls = []

    def closure_for(model, opt):
        def closure():
            calls.append(model)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        return closure

    losses_t, losses_m = [], []
    for _ in range(10):
        losses_t.append(t_opt.step(closure_for(model_t, t_opt)))
        losses_m.append(m_opt.step(closure_for(model_m, m_opt)))
    assert calls.count(model_m) == 10
    for lt, lm in zip(losses_t, losses_m):
        assert isinstance(lm, torch.Tensor) and lm.requires_grad
        torch.testing.assert_close(lm, lt, **TOL[torch.float32])
    if FULL[key].get("maximize"):
        assert losses_m[-1] > losses_m[0]
    else:
        assert losses_m[-1] < losses_m[0]
    assert m_opt.step() is None  # no closure: returns None, like torch


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_grad(name):
    _, masked_cls = OPTIMIZERS[name]
    params = _new_params([(4, 3), (2,)])
    opt = masked_cls(params, lr=1e-2)
    _set_grads(params, [torch.randn(4, 3), torch.randn(2)])
    opt.zero_grad(set_to_none=False)
    for p in params:
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    opt.zero_grad()  # default: set_to_none=True, like torch
    assert all(p.grad is None for p in params)
    _set_grads(params, [torch.randn(4, 3), torch.randn(2)])
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("key", FULL_IDS)
def test_add_param_group(key):
    name = _kind(key)
    torch_cls, masked_cls = OPTIMIZERS[name]
    ref = _new_params([(33, 17), (7,), (5, 3)])
    ours = _copy(ref)
    t_opt, m_opt = torch_cls(ref[:1], **FULL[key]), masked_cls(ours[:1], **FULL[key])
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ref[:1]]
        _set_grads(ref[:1], grads)
        _set_grads(ours[:1], grads)
        t_opt.step()
        m_opt.step()
    t_opt.add_param_group({"params": ref[1:], "lr": 0.1})
    m_opt.add_param_group({"params": ours[1:], "lr": 0.1})
    assert len(m_opt.param_groups) == 2
    assert m_opt.param_groups[1].keys() == t_opt.param_groups[1].keys()
    mask = torch.rand(5, 3) < 0.5
    m_opt.set_mask(ours[2], mask)  # a parameter added later can be masked
    _remask(t_opt, ref[2:], [mask])
    for _ in range(10):
        grads = [torch.randn_like(p) for p in ref]
        _set_grads(ours, grads)
        _set_grads(ref, grads[:2] + [torch.where(mask, grads[2], 0)])
        t_opt.step()
        m_opt.step()
        _remask(t_opt, ref[2:], [mask])
    _assert_same_state(t_opt, ref, m_opt, ours, TOL[torch.float32])
    _assert_pruned_zero(m_opt, ours[2], mask)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_isinstance_and_signature(name):
    torch_cls, masked_cls = OPTIMIZERS[name]
    opt = masked_cls([torch.nn.Parameter(torch.randn(3))])
    assert isinstance(opt, torch_cls)
    assert isinstance(opt, torch.optim.Optimizer)
    if name == "adamw":
        assert isinstance(opt, torch.optim.AdamW)
    t_sig = inspect.signature(torch_cls.__init__).parameters
    m_sig = inspect.signature(masked_cls.__init__).parameters
    assert list(m_sig) == list(t_sig) + ["masks"]
    for pname, tp in t_sig.items():
        mp = m_sig[pname]
        assert mp.kind == tp.kind, pname
        assert mp.default == tp.default, pname
    assert m_sig["masks"].default is None
    assert m_sig["masks"].kind == inspect.Parameter.KEYWORD_ONLY
    # defaults really reach the param groups, as in torch
    ref_opt = torch_cls([torch.nn.Parameter(torch.randn(3))])
    assert opt.defaults == ref_opt.defaults


@pytest.mark.parametrize(
    "name,kw",
    [
        ("sgd", dict(lr=-1.0)),
        ("sgd", dict(momentum=-0.5)),
        ("sgd", dict(weight_decay=-1.0)),
        ("sgd", dict(momentum=0.9, dampening=0.1, nesterov=True)),
        ("sgd", dict(nesterov=True)),
        ("adam", dict(lr=-1.0)),
        ("adam", dict(eps=-1.0)),
        ("adam", dict(betas=(1.0, 0.999))),
        ("adam", dict(betas=(0.9, -0.1))),
        ("adam", dict(weight_decay=-1.0)),
        ("adamw", dict(betas=(0.9, 1.5))),
        ("adamw", dict(eps=-1e-8)),
    ],
)
def test_invalid_arguments_rejected_like_torch(name, kw):
    torch_cls, masked_cls = OPTIMIZERS[name]
    with pytest.raises(ValueError) as t_err:
        torch_cls([torch.nn.Parameter(torch.randn(3))], **kw)
    with pytest.raises(type(t_err.value)):
        masked_cls([torch.nn.Parameter(torch.randn(3))], **kw)


# -------------------------------------------------------------------------------------------
# 6. end to end


def test_mlp_end_to_end_half_masked_first_layer():
    model_m = torch.nn.Sequential(
        torch.nn.Linear(10, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )
    model_t = copy.deepcopy(model_m)
    mask = torch.rand(32, 10) < 0.5
    opt_m = MaskedAdam(model_m.parameters(), lr=1e-2, masks={model_m[0].weight: mask})
    with torch.no_grad():
        model_t[0].weight.mul_(mask)
    opt_t = torch.optim.Adam(model_t.parameters(), lr=1e-2)
    x = torch.randn(128, 10)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]
    losses_m, losses_t = [], []
    for _ in range(30):
        for model, opt, losses in ((model_m, opt_m, losses_m), (model_t, opt_t, losses_t)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if opt is opt_t:
                model[0].weight.grad.mul_(mask)
            opt.step()
            losses.append(loss.item())
        assert torch.count_nonzero(model_m[0].weight.detach()[~mask]) == 0
    torch.testing.assert_close(torch.tensor(losses_m), torch.tensor(losses_t), rtol=1e-4, atol=1e-6)
    assert losses_m[-1] < 0.7 * losses_m[0]
    for pm, pt in zip(model_m.parameters(), model_t.parameters()):
        torch.testing.assert_close(pm, pt, rtol=1e-4, atol=1e-5)
