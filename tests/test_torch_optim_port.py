"""Our port of PyTorch's optimizer suite (test/test_optim.py, TestOptimRenewed) to lottery_ext.

The SGD, Adam and AdamW entries of torch's ``optim_db`` are run through MaskedSGD, MaskedAdam
and MaskedAdamW with no masks. torch's suite checks each optimizer against itself (for-loop vs
foreach vs fused, before vs after a save). Here the oracle is the torch.optim class: ours and
torch's get the same configuration (from ``OptimizerInfo.optim_inputs_func``) on identical
copies of the same parameters and identical gradients, and must then agree on parameters,
per-parameter state (same keys) and param_groups, step after step. The same holds for what
torch's suite exercises around the step: state_dict round trips (also between the two classes,
deep copies and pickles), all six kinds of hooks, LR schedulers, zero_grad, add_param_group,
closures, empty and strided parameters, the foreach/fused/maximize/amsgrad/nesterov flags, and
torch's own error inputs.

Options refused by design (a Tensor ``lr``, ``capturable=True``, ``differentiable=True``,
complex parameters, sparse gradients) are checked to fail with a TypeError or ValueError whose
message names the option; those tests have ``rejected_by_design`` in their name or id.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch.nn import Parameter
from torch.optim import lr_scheduler as lrs
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

# torch's optim_db (it needs the expecttest package: in the [test] extra, so a missing one fails)
from torch.testing._internal import common_optimizers

from lottery_ext import MaskedAdam, MaskedAdamW, MaskedSGD

OURS = {torch.optim.SGD: MaskedSGD, torch.optim.Adam: MaskedAdam, torch.optim.AdamW: MaskedAdamW}
INFOS = {
    info.optim_cls.__name__.lower(): info
    for info in common_optimizers.optim_db
    if info.optim_cls in OURS
}
NAMES = ["sgd", "adam", "adamw"]

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# Ours against torch after a few steps. ``atol`` is relative to the largest magnitude in the
# tensor compared (see _close): rounding differences of a large entry propagate to the small
# ones through the loss. 16-bit: torch's CPU reference computes in the 16-bit dtype op by op,
# ours in float32 with one rounding per stored value, so a few ulps apart.
TOL = {
    F32: dict(rtol=1e-5, atol=1e-6),
    F64: dict(rtol=1e-12, atol=1e-13),
    F16: dict(rtol=5e-3, atol=5e-3),
    BF16: dict(rtol=3e-2, atol=3e-2),
}
EXACT = dict(rtol=0, atol=0)
# 20 steps on torch's (w.mv(x) + b).pow(2).sum(): near its minimum the residual is a small
# difference of large terms, so a one-ulp difference in a parameter becomes a relative
# difference of ~1e-5 in the gradient (and in SGD's momentum buffer). torch's own float32
# default (assertEqual) has this atol.
LONG = dict(rtol=1e-5, atol=1e-5)

# The implementation flags torch's suite toggles (its "global cliquey" kwargs, minus
# differentiable, which lottery_ext refuses by design). Ours accepts them all; torch's runs
# the matching implementation, so each one is a separate oracle.
IMPLS = {
    "default": {},
    "forloop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny; torch 2.13's fused CPU SGD spends milliseconds per step
    waking a thread pool for them. One intra-op thread for this module, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def _classes(name):
    torch_cls = INFOS[name].optim_cls
    return torch_cls, OURS[torch_cls]


def _by_design(kwargs) -> bool:
    """A configuration lottery_ext refuses on purpose (see the module docstring)."""
    return (
        isinstance(kwargs.get("lr"), torch.Tensor)
        or bool(kwargs.get("capturable"))
        or bool(kwargs.get("differentiable"))
    )


def _optim_inputs(name, dtype=F32):
    return INFOS[name].optim_inputs_func(device="cpu", dtype=dtype)


def _config(name, desc, dtype=F32) -> dict:
    for inp in _optim_inputs(name, dtype):
        if inp.desc == desc:
            return copy.deepcopy(inp.kwargs)
    raise KeyError(f"optim_db has no {name} config {desc!r}")


def _supported(name, dtype=F32):
    """(desc, kwargs) of every optim_db configuration lottery_ext supports."""
    return [(i.desc, i.kwargs) for i in _optim_inputs(name, dtype) if not _by_design(i.kwargs)]


def _all_inputs(name, dtype=F32, impls=tuple(IMPLS)):
    """Every supported configuration with every implementation flag, like torch's
    ``_get_optim_inputs_including_global_cliquey_kwargs``."""
    return [
        (f"{desc} [{impl}]", {**kwargs, **IMPLS[impl]})
        for desc, kwargs in _supported(name, dtype)
        for impl in impls
    ]


CONFIGS = [
    pytest.param(name, inp.desc, id=f"{name}-{_slug(inp.desc)}")
    for name in NAMES
    for inp in _optim_inputs(name)
    if not _by_design(inp.kwargs)
]

# -------------------------------------------------------------------------------------------
# helpers


def _params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _clone(t: torch.Tensor, requires_grad=True) -> Parameter:
    """A Parameter with `t`'s values AND strides (also for non-dense views)."""
    q = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        q.copy_(t)
    return Parameter(q, requires_grad=requires_grad)


def _twin(tensors, requires_grad=True):
    """Two independent lists of Parameters: one for torch's optimizer, one for ours."""
    return tuple([_clone(t, requires_grad) for t in tensors] for _ in range(2))


def _twin_views(factory, seed=0):
    """Two lists of Parameters built by `factory` from the same seed: same values, views of
    fresh bases with the same strides and storage offsets."""
    out = []
    for _ in range(2):
        torch.manual_seed(seed)
        out.append([Parameter(t) for t in factory()])
    return out


def _pair(name, kwargs, shapes=((4, 3), (3,)), dtype=F32, groups=None):
    """torch's optimizer and ours on identical parameters. `groups(params)` builds the
    param_groups argument (default: the plain list)."""
    torch_cls, our_cls = _classes(name)
    t_params, m_params = _twin([torch.randn(s, dtype=F64).to(dtype) for s in shapes])
    groups = groups or (lambda ps: ps)
    return torch_cls(groups(t_params), **kwargs), our_cls(groups(m_params), **kwargs)


def _grad_like(p, g):
    """`g` laid out as autograd lays out p's gradient."""
    return torch.empty_like(p).copy_(g)


def _feed(t_opt, m_opt):
    """Identical random gradients for both optimizers' parameters (none for parameters that
    do not require grad)."""
    for tp, mp in zip(_params(t_opt), _params(m_opt)):
        if not tp.requires_grad:
            tp.grad = mp.grad = None
            continue
        g = torch.randn(tp.shape, dtype=F64).to(tp.dtype)
        tp.grad = _grad_like(tp, g)
        mp.grad = _grad_like(mp, g)


def _step_both(t_opt, m_opt, steps=1, tol=None, what=""):
    for k in range(steps):
        _feed(t_opt, m_opt)
        t_opt.step()
        m_opt.step()
        _assert_agree(t_opt, m_opt, tol, what=f"{what} step {k}")


def _close(actual, expected, tol, where):
    """assert_close with ``atol`` scaled by max(1, largest |expected|) (a cheap check first:
    assert_close itself is slow and only needed for its message)."""
    actual, expected = actual.detach(), expected.detach()
    scale = 1.0
    if expected.numel() and expected.dtype.is_floating_point:
        scale = max(1.0, expected.abs().max().item())
    rtol, atol = tol["rtol"], tol["atol"] * scale
    if (
        actual.dtype == expected.dtype
        and actual.shape == expected.shape
        and actual.device == expected.device
        and torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True).all()
    ):
        return
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{where}: {m}"
    )


def _assert_value(actual, expected, where):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        _close(actual, expected, EXACT, where)
    else:
        assert actual == expected, (where, actual, expected)


def _assert_agree(t_opt, m_opt, tol=None, what="", skip_keys=()):
    """Ours matches torch's: group hyperparameters (but `skip_keys`), parameters,
    per-parameter state."""
    assert len(m_opt.param_groups) == len(t_opt.param_groups), what
    for gi, (tg, mg) in enumerate(zip(t_opt.param_groups, m_opt.param_groups)):
        assert mg.keys() == tg.keys(), (what, gi, set(mg) ^ set(tg))
        for key in tg:
            if key != "params" and key not in skip_keys:
                _assert_value(mg[key], tg[key], f"{what} param_groups[{gi}][{key!r}]")
        assert len(mg["params"]) == len(tg["params"]), what
        for i, (tp, mp) in enumerate(zip(tg["params"], mg["params"])):
            where = f"{what} group {gi} param {i}"
            t = tol or TOL[tp.dtype]
            assert mp.shape == tp.shape and mp.dtype == tp.dtype, where
            _close(mp.detach(), tp.detach(), t, where)
            ts, ms = t_opt.state.get(tp, {}), m_opt.state.get(mp, {})
            assert set(ms) == set(ts), (where, set(ms), set(ts))
            for key, tv in ts.items():
                mv = ms[key]
                if key == "step":
                    assert float(mv) == float(tv), (where, float(mv), float(tv))
                elif isinstance(tv, torch.Tensor):
                    _close(mv, tv, t, f"{where} state {key!r}")
                else:
                    assert mv == tv, (where, key, mv, tv)


def _assert_tree(actual, expected, tol=EXACT, path="state_dict"):
    """Nested dicts/lists/tensors equal (tensors to `tol`)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        assert set(actual) == set(expected), (path, set(actual) ^ set(expected))
        for k in expected:
            _assert_tree(actual[k], expected[k], tol, f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_tree(a, e, tol, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), path
        _close(actual, expected, tol, path)
    else:
        assert actual == expected, (path, actual, expected)


def _assert_sd_like_torch(our_sd, torch_sd, tol=EXACT):
    """Our state_dict is torch's plus an extra ``masks`` entry (empty: no masks here)."""
    assert our_sd.get("masks") == {}, our_sd.get("masks")
    _assert_tree({k: v for k, v in our_sd.items() if k != "masks"}, torch_sd, tol)


def _without_names(sd):
    sd = copy.deepcopy(sd)
    for group in sd["param_groups"]:
        group.pop("param_names", None)
    return sd


def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else list(params)


def _net(dtype=F32):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
    ).to(dtype)


def _conv_bn(dtype=F32):
    """torch's model for the state_dict BC tests (a Conv2d and a BatchNorm2d), with the
    BatchNorm first: after it, the conv bias (and, with a plain sum as the loss, every conv
    parameter) would get gradients that are pure rounding noise, which Adam scales up to
    full steps. The tests weight the output with a random target for the same reason."""
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.BatchNorm2d(4, eps=1e-05, momentum=0.1), torch.nn.Conv2d(4, 2, 1, stride=2)
    ).to(dtype)


def _loss_closure(opt, w, b, x):
    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    return closure


def _recording_closure(closure, calls, returned):
    """`closure`, noting whether grad mode was on and what it returned."""

    def recording():
        calls.append(torch.is_grad_enabled())
        loss = closure()
        returned.append(loss)
        return loss

    return recording


def _module_params(model, named):
    return model.named_parameters() if named else model.parameters()


def _train_conv_bn(opt, model, x, target):
    opt.zero_grad()
    (model(x) * target).sum().backward()
    opt.step()


def _step_schedulers(schedulers, loss):
    for s in schedulers:
        if isinstance(s, lrs.ReduceLROnPlateau):
            s.step(loss.detach() if torch.is_tensor(loss) else loss)
        else:
            s.step()


def _lockstep_net(name, kwargs, dtype, iters=7):
    """torch's ``_compare_between``: a small net plus a 0-dim parameter, 7 steps. A layer is
    frozen on steps 3-4 and step 2 has no backward at all, so parameters that require grad
    but have grad None are skipped. Ours must match torch after every step."""
    torch_cls, our_cls = _classes(name)
    net_t = _net(dtype)
    net_m = copy.deepcopy(net_t)
    scalar_t, scalar_m = _twin([torch.randn((), dtype=F64).to(dtype)])
    t_opt = torch_cls([*net_t.parameters(), *scalar_t], **kwargs)
    m_opt = our_cls([*net_m.parameters(), *scalar_m], **kwargs)
    start = [p.detach().clone() for p in net_m.parameters()]
    for i in range(iters):
        x = torch.randn(4, 2, dtype=F64).to(dtype)
        for net, scalar, opt in ((net_t, scalar_t[0], t_opt), (net_m, scalar_m[0], m_opt)):
            opt.zero_grad()
            if i == 3:
                net[2].requires_grad_(False)
            if i == 5:
                net[2].requires_grad_(True)
            if i != 2:
                loss = net(x).sum() + (scalar * x.sum()).tanh()
                loss.backward()
            opt.step()
        _assert_agree(t_opt, m_opt, TOL[dtype], what=f"iteration {i}")
    assert any(not torch.equal(p.detach(), s) for p, s in zip(net_m.parameters(), start))


# -------------------------------------------------------------------------------------------
# 1. the step: every optim_db configuration, every implementation flag, every float dtype


def test_optim_db_has_sgd_adam_adamw():
    assert set(INFOS) == set(NAMES)
    for name in NAMES:
        assert _supported(name), name


STEP_CASES = [
    pytest.param(*c.values, dtype, impl, id=f"{c.id}-{str(dtype)[6:]}-{impl}")
    for c in CONFIGS
    for dtype, impls in (
        (F32, ("forloop", "foreach", "fused")),
        (F64, ("forloop", "foreach", "fused")),
        # torch's own 16-bit CPU reference: its for-loop implementation in that dtype
        (F16, ("forloop",)),
        (BF16, ("forloop",)),
    )
    for impl in impls
]


@pytest.mark.parametrize("name,desc,dtype,impl", STEP_CASES)
def test_step_matches_torch(name, desc, dtype, impl):
    """Every optim_db configuration, as torch's test_foreach_matches_forloop and
    test_fused_matches_forloop run it, with torch's class (same flag, same dtype) as the
    oracle."""
    _lockstep_net(name, {**_config(name, desc, dtype), **IMPLS[impl]}, dtype)


EXTRA_CONFIGS = {
    "sgd": {
        "nesterov_maximize": dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True),
        "nesterov_no_weight_decay": dict(lr=0.05, momentum=0.5, nesterov=True),
        "dampening_wd_maximize": dict(
            momentum=0.9, dampening=0.3, weight_decay=0.05, maximize=True
        ),
    },
    "adam": {
        "amsgrad_maximize": dict(lr=0.01, amsgrad=True, maximize=True, weight_decay=0.1),
        "decoupled_weight_decay": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
        "amsgrad_decoupled": dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True),
        "betas_eps": dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6),
    },
    "adamw": {
        "amsgrad_maximize": dict(lr=0.01, amsgrad=True, maximize=True),
        "amsgrad_no_weight_decay": dict(amsgrad=True, weight_decay=0.0),
        "betas_eps": dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.3),
    },
}


@pytest.mark.parametrize("impl", ["forloop", "foreach", "fused"])
@pytest.mark.parametrize(
    "name,label", [(n, label) for n in NAMES for label in EXTRA_CONFIGS[n]], ids=lambda v: v
)
def test_flag_combinations_beyond_optim_db_match_torch(name, label, impl):
    """maximize / amsgrad / nesterov / decoupled_weight_decay combinations optim_db lacks."""
    _lockstep_net(name, {**EXTRA_CONFIGS[name][label], **IMPLS[impl]}, F32)


@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "sched"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("name", NAMES)
def test_forloop_goes_right_direction(name, contiguous, with_lrsched):
    """torch's test_forloop_goes_right_direction (weight/bias, strided as ``[..., 0]`` views
    when not contiguous, with optim_db's scheduler sets), ours in lockstep with torch."""
    torch_cls, our_cls = _classes(name)

    def weight_bias():
        if contiguous:
            return torch.randn(10, 5), torch.randn(10)
        return torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0]

    sched_sets = INFOS[name].scheduler_inputs if with_lrsched else [[]]
    for si, constructors in enumerate(sched_sets):
        for desc, kwargs in _supported(name):
            what = f"{desc} schedulers #{si}"
            kwargs = {**kwargs, "foreach": False}
            (tw, tb), (mw, mb) = _twin_views(weight_bias)
            x = torch.randn(5)
            t_opt, m_opt = torch_cls([tw, tb], **kwargs), our_cls([mw, mb], **kwargs)
            t_sched = [c(t_opt) for c in constructors]
            m_sched = [c(m_opt) for c in constructors]
            t_closure, m_closure = _loss_closure(t_opt, tw, tb, x), _loss_closure(m_opt, mw, mb, x)
            initial = m_closure().item()
            for _ in range(20):
                t_loss, m_loss = t_closure(), m_closure()
                t_opt.step()
                m_opt.step()
                _step_schedulers(t_sched, t_loss)
                _step_schedulers(m_sched, m_loss)
                torch.testing.assert_close(m_loss, t_loss, **LONG)
                _assert_agree(t_opt, m_opt, LONG, what=what)
            final = m_closure().item()
            if kwargs.get("maximize"):
                assert final > initial, what
            else:
                assert final < initial, what


LAYOUTS = {
    # (weight of shape (10, 5), bias of shape (10,)), as views of fresh bases
    "transposed": lambda: (torch.randn(5, 10).t(), torch.randn(10)),
    "last_dim_slice": lambda: (torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0]),
    "step_slice": lambda: (torch.randn(10, 10)[:, ::2], torch.randn(20)[::2]),
    "column_slice": lambda: (torch.randn(10, 8)[:, 1:6], torch.randn(12)[1:11]),
    "transposed_slice": lambda: (torch.randn(7, 12)[1:6, 2:12].t(), torch.randn(3, 10)[1]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", NAMES)
def test_strided_params_match_torch(name, layout):
    """Transposed and sliced views used directly as parameters (autograd's gradients, every
    configuration and implementation flag): updated in place like torch, views kept.

    The oracle is torch's for-loop implementation (torch's own ground truth): torch 2.13's
    fused CPU kernels mis-update non-dense parameters, so torch(fused=True) is no reference."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        t_params, m_params = _twin_views(LAYOUTS[layout])
        layout_before = [(p.stride(), p.storage_offset(), p.data_ptr()) for p in m_params]
        x = torch.randn(5)
        t_kwargs = {**kwargs, **IMPLS["forloop"]}
        t_opt, m_opt = torch_cls(t_params, **t_kwargs), our_cls(m_params, **kwargs)
        t_closure = _loss_closure(t_opt, *t_params, x)
        m_closure = _loss_closure(m_opt, *m_params, x)
        for k in range(5):
            torch.testing.assert_close(t_opt.step(t_closure), m_opt.step(m_closure))
            _assert_agree(
                t_opt, m_opt, what=f"{layout} {label} step {k}", skip_keys=("foreach", "fused")
            )
        assert [(p.stride(), p.storage_offset(), p.data_ptr()) for p in m_params] == layout_before


@pytest.mark.parametrize("name", NAMES)
def test_empty_params_match_torch(name):
    """0-element parameters (alone in a group too) and a 0-dim one, as torch's
    foreach/fused tests append: stepped without error, state created as torch creates it."""
    shapes = [(0,), (4, 0, 3), (), (3,), (0,), (2, 0)]

    def groups(ps):
        return [{"params": ps[:4]}, {"params": ps[4:], "lr": 0.1}]

    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs, shapes=shapes, groups=groups)
        _step_both(t_opt, m_opt, steps=3, what=label)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_group_match_torch(name):
    """float32, float64, float16 and bfloat16 parameters in one group (per-dtype tolerance)."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        if "eps" not in kwargs and name != "sgd":
            kwargs = {**kwargs, "eps": 0.1}  # as optim_db does for 16-bit (eps underflows)
        tensors = [
            torch.randn(3, 2),
            torch.randn(5, dtype=F64),
            torch.randn(2, 3, dtype=F16),
            torch.randn(7, dtype=BF16),
        ]
        t_params, m_params = _twin(tensors)
        t_opt, m_opt = torch_cls(t_params, **kwargs), our_cls(m_params, **kwargs)
        _step_both(t_opt, m_opt, steps=4, what=label)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_configs_param_groups_match_torch(name):
    """One param group per optim_db configuration, all in one optimizer."""
    torch_cls, our_cls = _classes(name)
    configs = [kw for _, kw in _supported(name)]
    shapes = [(4, 3)] * len(configs)

    def groups(ps):
        return [{"params": [p], **kw} for p, kw in zip(ps, configs)]

    t_opt, m_opt = _pair(name, {}, shapes=shapes, groups=groups)
    _step_both(t_opt, m_opt, steps=5)


# -------------------------------------------------------------------------------------------
# 2. param groups, zero_grad, add_param_group, closures, no-op steps


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_weight_decay_match_torch(name):
    """torch's test_param_groups_weight_decay: weight_decay on the weight only."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        (tw, tb), (mw, mb) = _twin([torch.randn(10, 5), torch.randn(10)])
        x = torch.randn(5)

        def groups(w, b, kwargs=kwargs):
            return [dict(params=[w], **kwargs), dict(params=[b], **{**kwargs, "weight_decay": 0})]

        t_opt, m_opt = torch_cls(groups(tw, tb)), our_cls(groups(mw, mb))
        t_closure, m_closure = _loss_closure(t_opt, tw, tb, x), _loss_closure(m_opt, mw, mb, x)
        initial = m_closure().item()
        for _ in range(20):
            t_closure()
            m_closure()
            t_opt.step()
            m_opt.step()
        _assert_agree(t_opt, m_opt, what=label)
        final = m_closure().item()
        assert final > initial if kwargs.get("maximize") else final < initial, label


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_lr_match_torch(name):
    """torch's test_param_groups_lr: a group with lr 1e-28 leaves its parameter unchanged."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        kwargs = {**kwargs, "lr": kwargs.get("lr") or 1e-3}
        (tw, tb, ti), (mw, mb, mi) = _twin([torch.randn(10, 5), torch.randn(10), torch.randn(2)])
        irrelevant = mi.detach().clone()
        x = torch.randn(5)
        t_opt = torch_cls([dict(params=[tw, tb], **kwargs), dict(params=[ti])], lr=1e-28)
        m_opt = our_cls([dict(params=[mw, mb], **kwargs), dict(params=[mi])], lr=1e-28)
        t_closure, m_closure = _loss_closure(t_opt, tw, tb, x), _loss_closure(m_opt, mw, mb, x)
        initial = m_closure().item()
        for _ in range(20):
            t_loss, m_loss = t_closure(), m_closure()
            _close(m_loss, t_loss, TOL[F32], label)
            g = torch.rand(2)
            ti.grad, mi.grad = g.clone(), g.clone()
            t_opt.step()
            m_opt.step()
        _assert_agree(t_opt, m_opt, what=label)
        assert m_loss.item() > initial if kwargs.get("maximize") else m_loss.item() < initial
        torch.testing.assert_close(mi.detach(), irrelevant)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_fill"])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_then_step_matches_torch(name, set_to_none):
    """zero_grad(set_to_none=...) between steps; every other step keeps the zeroed (or None)
    gradients, so weight decay / momentum / step counters run on zero gradients like torch."""
    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        for k in range(6):
            t_opt.zero_grad(set_to_none=set_to_none)
            m_opt.zero_grad(set_to_none=set_to_none)
            for tp, mp in zip(_params(t_opt), _params(m_opt)):
                assert (mp.grad is None) == (tp.grad is None), label
                if mp.grad is not None:
                    assert torch.count_nonzero(mp.grad) == 0, label
            if k % 2 == 0:
                _feed(t_opt, m_opt)
            t_opt.step()
            m_opt.step()
            _assert_agree(t_opt, m_opt, what=f"{label} step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_for_zero_grads(name):
    """torch's test_step_is_noop_for_zero_grads (configs without weight decay)."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        if kwargs.get("weight_decay", 0) != 0:
            continue
        if name == "adamw":
            kwargs = {**kwargs, "lr": 1e-5}  # AdamW's default weight decay moves params
        (tp,), (mp,) = _twin([torch.randn(5, 1)])
        old = mp.detach().clone()
        t_opt, m_opt = torch_cls([tp], **kwargs), our_cls([mp], **kwargs)
        tp.grad, mp.grad = torch.zeros_like(tp), torch.zeros_like(mp)
        loss = torch.tensor([1.0])
        assert m_opt.step(lambda loss=loss: loss) is loss
        t_opt.step(lambda loss=loss: loss)
        torch.testing.assert_close(mp.detach(), old)
        _assert_agree(t_opt, m_opt, what=label)


@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_when_params_have_no_grad(name):
    """torch's test_step_is_noop_when_params_have_no_grad: requires_grad=False params."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        t_params, m_params = _twin([torch.randn(2, 3) for _ in range(2)], requires_grad=False)
        old = [p.detach().clone() for p in m_params]
        t_opt, m_opt = torch_cls(t_params, **kwargs), our_cls(m_params, **kwargs)
        loss = torch.tensor([1.0])
        assert m_opt.step(lambda loss=loss: loss) is loss
        t_opt.step(lambda loss=loss: loss)
        for p, o in zip(m_params, old):
            assert torch.equal(p, o), label
        assert len(m_opt.state) == len(t_opt.state) == 0, label


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_later_in_training(name):
    """A second group added after a few steps (its own hyper-parameters, the rest from the
    defaults), then trained and saved/loaded like torch."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        t_params, m_params = _twin([torch.randn(4, 3), torch.randn(3), torch.randn(2, 2)])
        t_opt, m_opt = torch_cls(t_params[:1], **kwargs), our_cls(m_params[:1], **kwargs)
        _step_both(t_opt, m_opt, steps=3, what=label)
        t_opt.add_param_group({"params": t_params[1:], "lr": 0.02, "weight_decay": 0.0})
        m_opt.add_param_group({"params": m_params[1:], "lr": 0.02, "weight_decay": 0.0})
        _assert_agree(t_opt, m_opt, what=label)
        _step_both(t_opt, m_opt, steps=4, what=label)
        _assert_sd_like_torch(m_opt.state_dict(), t_opt.state_dict(), TOL[F32])
        # the grown optimizer's state_dict loads into a fresh pair built with two groups
        t_new, m_new = _twin([p.detach() for p in m_params])
        t2 = torch_cls([{"params": t_new[:1]}, {"params": t_new[1:]}], **kwargs)
        m2 = our_cls([{"params": m_new[:1]}, {"params": m_new[1:]}], **kwargs)
        t2.load_state_dict(copy.deepcopy(t_opt.state_dict()))
        m2.load_state_dict(copy.deepcopy(m_opt.state_dict()))
        _step_both(t2, m2, steps=2, what=label)


@pytest.mark.parametrize("name", NAMES)
def test_closure_like_torch(name):
    """step(closure): called once per step with grad enabled (even under no_grad), its
    return value handed back as is; step() without a closure returns None."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        (tw, tb), (mw, mb) = _twin([torch.randn(10, 5), torch.randn(10)])
        x = torch.randn(5)
        t_opt, m_opt = torch_cls([tw, tb], **kwargs), our_cls([mw, mb], **kwargs)
        calls, returned = [], []
        closure = _recording_closure(_loss_closure(m_opt, mw, mb, x), calls, returned)
        for k in range(4):
            with torch.no_grad():
                t_loss = t_opt.step(_loss_closure(t_opt, tw, tb, x))
                m_loss = m_opt.step(closure)
            assert m_loss is returned[-1], label
            torch.testing.assert_close(m_loss, t_loss)
            _assert_agree(t_opt, m_opt, what=f"{label} step {k}")
        assert calls == [True] * 4, label
        assert m_opt.step() is None and t_opt.step() is None
        _assert_agree(t_opt, m_opt, what=label)


# -------------------------------------------------------------------------------------------
# 3. LR schedulers

EXTRA_SCHEDULERS = {
    "onecycle": [lambda opt: lrs.OneCycleLR(opt, max_lr=0.05, total_steps=25)],
    "cyclic": [lambda opt: lrs.CyclicLR(opt, base_lr=1e-3, max_lr=0.02, step_size_up=4)],
    "cosine_warm_restarts": [lambda opt: lrs.CosineAnnealingWarmRestarts(opt, T_0=5)],
    "exponential_multistep": [
        lambda opt: lrs.ExponentialLR(opt, gamma=0.95),
        lambda opt: lrs.MultiStepLR(opt, milestones=[5, 10], gamma=0.5),
    ],
}
SCHED_CASES = [
    pytest.param(name, f"optim_db{i}", id=f"{name}-optim_db{i}")
    for name in NAMES
    for i in range(len(INFOS[name].scheduler_inputs))
] + [pytest.param(name, key, id=f"{name}-{key}") for name in NAMES for key in EXTRA_SCHEDULERS]


@pytest.mark.parametrize("name,sched", SCHED_CASES)
def test_lr_schedulers_step_identically(name, sched):
    """torch's test_param_group_with_lrscheduler_goes_right_direction with optim_db's
    scheduler sets (and OneCycleLR / CyclicLR, which also cycle momentum or betas), every
    configuration: same lr (and momentum/betas) in every group after every step."""
    torch_cls, our_cls = _classes(name)
    if sched.startswith("optim_db"):
        constructors = INFOS[name].scheduler_inputs[int(sched[len("optim_db") :])]
    else:
        constructors = EXTRA_SCHEDULERS[sched]
    for label, kwargs in _all_inputs(name, impls=("default", "fused")):
        (tw, tb), (mw, mb) = _twin([torch.randn(10, 5), torch.randn(10)])
        x = torch.randn(5)
        t_opt = torch_cls([{"params": [tw]}, {"params": [tb], "lr": 0.01}], **kwargs)
        m_opt = our_cls([{"params": [mw]}, {"params": [mb], "lr": 0.01}], **kwargs)
        t_sched = [c(t_opt) for c in constructors]
        m_sched = [c(m_opt) for c in constructors]
        t_closure, m_closure = _loss_closure(t_opt, tw, tb, x), _loss_closure(m_opt, mw, mb, x)
        initial = m_closure().item()
        lrs_seen = set()
        for k in range(20):
            t_loss, m_loss = t_opt.step(t_closure), m_opt.step(m_closure)
            _step_schedulers(t_sched, t_loss)
            _step_schedulers(m_sched, m_loss)
            _assert_agree(t_opt, m_opt, LONG, what=f"{label} step {k}")
            for ts, ms in zip(t_sched, m_sched):
                if hasattr(ts, "get_last_lr"):
                    assert ms.get_last_lr() == ts.get_last_lr(), label
            lrs_seen.add(m_opt.param_groups[0]["lr"])
        final = m_closure().item()
        if kwargs == {} or kwargs == IMPLS["fused"]:  # torch's test: default hyper-parameters
            assert final < initial, label
        # the schedule did act (ReduceLROnPlateau alone may legitimately not)
        assert len(lrs_seen) > 1 or any(isinstance(s, lrs.ReduceLROnPlateau) for s in m_sched), (
            label
        )
        # the schedulers' own state_dicts agree too
        for ts, ms in zip(t_sched, m_sched):
            t_sd = {k: v for k, v in ts.state_dict().items() if k != "optimizer"}
            m_sd = {k: v for k, v in ms.state_dict().items() if k != "optimizer"}
            assert m_sd.keys() == t_sd.keys(), label
            for key, value in t_sd.items():
                if isinstance(value, float) and key in ("best", "_last_lr"):
                    assert m_sd[key] == pytest.approx(value, rel=1e-5), (label, key)
                elif not callable(value):
                    assert repr(m_sd[key]) == repr(value), (label, key)


# -------------------------------------------------------------------------------------------
# 4. state_dict / load_state_dict, deepcopy, pickle


@pytest.mark.parametrize("named_c", [False, True], ids=["load_into_plain", "load_into_named"])
@pytest.mark.parametrize("named", [False, True], ids=["from_plain", "from_named"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_deterministic(name, named, named_c):
    """torch's test_state_dict_deterministic, plus: our state_dict equals torch's (with an
    empty ``masks``) after identical training, and loading does not modify the dict."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        (tw, tb), (w, b) = _twin([torch.randn(2, 3), torch.randn(2)])
        x = torch.randn(3)
        t_opt = torch_cls(_named([tw, tb], named), **kwargs)
        opt = our_cls(_named([w, b], named), **kwargs)
        closure, t_closure = _loss_closure(opt, w, b, x), _loss_closure(t_opt, tw, tb, x)
        for _ in range(10):
            opt.step(closure)
            t_opt.step(t_closure)
        _assert_sd_like_torch(opt.state_dict(), t_opt.state_dict(), TOL[F32])

        wc, bc = Parameter(w.detach().clone()), Parameter(b.detach().clone())
        opt_c = our_cls(_named([wc, bc], named_c), **kwargs)
        closure_c = _loss_closure(opt_c, wc, bc, x)
        # a deep copy, as torch's test loads: load_state_dict may keep the dict's tensors
        sd = copy.deepcopy(opt.state_dict())
        kept = copy.deepcopy(sd)
        opt_c.load_state_dict(sd)
        _assert_tree(sd, kept)  # load_state_dict left the caller's dict alone
        for _ in range(10):
            opt.step(closure)
            opt_c.step(closure_c)
            assert torch.equal(w, wc) and torch.equal(b, bc), label
        _assert_tree(_without_names(opt_c.state_dict()), _without_names(opt.state_dict()))
        # repeated parameters have identical representations
        opt_c.param_groups.extend(opt_c.param_groups)
        assert (
            _without_names(opt.state_dict())["param_groups"][-1]
            == _without_names(opt_c.state_dict())["param_groups"][-1]
        ), label


@pytest.mark.parametrize("direction", ["torch_into_ours", "ours_into_torch"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_loads_between_torch_and_ours(name, direction):
    """A state dict saved mid-training by one class loads into the other (two groups, other
    lr at construction) and both then continue identically."""
    torch_cls, our_cls = _classes(name)

    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.02}]

    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs, shapes=[(4, 3), (3,), (2,)], groups=groups)
        _step_both(t_opt, m_opt, steps=4, what=label)
        src = t_opt if direction == "torch_into_ours" else m_opt
        dst_cls = our_cls if direction == "torch_into_ours" else torch_cls
        sd = src.state_dict()
        dst_params = [Parameter(p.detach().clone()) for p in _params(src)]
        dst = dst_cls(groups(dst_params), **{**kwargs, "lr": 0.5})
        dst.load_state_dict(copy.deepcopy(sd))
        pair = (src, dst) if direction == "torch_into_ours" else (dst, src)
        _assert_agree(*pair, tol=EXACT, what=label)
        _step_both(*pair, steps=4, what=label)
        _assert_sd_like_torch(pair[1].state_dict(), pair[0].state_dict(), TOL[F32])


@pytest.mark.parametrize("name", NAMES)
def test_can_load_older_state_dict(name):
    """torch's test_can_load_older_state_dict: the flags added after the optimizer first
    shipped (foreach, fused, maximize, capturable, differentiable) are missing from the
    param_groups; ours fills them in like torch and keeps training identically."""
    torch_cls, our_cls = _classes(name)
    flags = INFOS[name].not_og_supported_flags
    for label, kwargs in _all_inputs(name):
        model_t = _conv_bn()
        model_m = copy.deepcopy(model_t)
        x, target = torch.rand(1, 4, 8, 8), torch.randn(1, 2, 4, 4)
        t_opt = torch_cls(model_t.parameters(), **kwargs)
        m_opt = our_cls(model_m.parameters(), **kwargs)
        for _ in range(3):
            _train_conv_bn(t_opt, model_t, x, target)
            _train_conv_bn(m_opt, model_m, x, target)
        for opt in (t_opt, m_opt):
            old = copy.deepcopy(opt.state_dict())
            for group in old["param_groups"]:
                for flag in flags:
                    group.pop(flag, None)
            opt.load_state_dict(old)
        _assert_agree(t_opt, m_opt, what=label)
        for _ in range(2):
            _train_conv_bn(t_opt, model_t, x, target)
            _train_conv_bn(m_opt, model_m, x, target)
        _assert_agree(t_opt, m_opt, what=label)


@pytest.mark.parametrize("name", NAMES)
def test_load_nontensor_step(name):
    """torch's test_load_nontensor_step: ``step`` saved as a Python number."""
    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        _step_both(t_opt, m_opt, steps=3, what=label)
        for opt in (t_opt, m_opt):
            sd = copy.deepcopy(opt.state_dict())
            for p_state in sd["state"].values():
                if torch.is_tensor(p_state.get("step")):
                    p_state["step"] = p_state["step"].item()
            opt.load_state_dict(sd)
        _step_both(t_opt, m_opt, steps=2, what=label)


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize("name", NAMES)
def test_save_load_equality_with_weights_only(name, named):
    """torch's test_save_load_equality_with_weights_only, plus pickle and deepcopy of the
    state dict; a reloaded copy keeps training like torch."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        (tw, tb), (w, b) = _twin([torch.randn(2, 3), torch.randn(2)])
        x = torch.randn(3)
        t_opt = torch_cls(_named([tw, tb], named), **kwargs)
        opt = our_cls(_named([w, b], named), **kwargs)
        for _ in range(3):
            opt.step(_loss_closure(opt, w, b, x))
            t_opt.step(_loss_closure(t_opt, tw, tb, x))
        sd = opt.state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        for weights_only in (False, True):
            buf.seek(0)
            _assert_tree(torch.load(buf, weights_only=weights_only), sd)
        _assert_tree(pickle.loads(pickle.dumps(sd)), sd)
        _assert_tree(copy.deepcopy(sd), sd)

        buf.seek(0)
        (tw2, tb2), (w2, b2) = _twin([tw.detach(), tb.detach()])
        t2 = torch_cls(_named([tw2, tb2], named), **kwargs)
        m2 = our_cls(_named([w2, b2], named), **kwargs)
        t2.load_state_dict(copy.deepcopy(t_opt.state_dict()))
        m2.load_state_dict(torch.load(buf, weights_only=True))
        _assert_agree(t2, m2, what=label)
        _step_both(t2, m2, steps=3, what=label)


@pytest.mark.parametrize("name", NAMES)
def test_can_load_from_to_named_state_dict(name):
    """torch's test_can_load_from_to_named_state_dict: parameters vs named_parameters on
    either side; param_names kept as torch keeps them."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        for named0 in (False, True):
            for named1 in (False, True):
                what = f"{label} named {named0}->{named1}"
                model_t = _conv_bn()
                model_m = copy.deepcopy(model_t)
                x, target = torch.rand(1, 4, 8, 8), torch.randn(1, 2, 4, 4)

                t_opt = torch_cls(_module_params(model_t, named0), **kwargs)
                m_opt = our_cls(_module_params(model_m, named0), **kwargs)
                for _ in range(3):
                    _train_conv_bn(t_opt, model_t, x, target)
                    _train_conv_bn(m_opt, model_m, x, target)
                t2 = torch_cls(_module_params(model_t, named1), **kwargs)
                m2 = our_cls(_module_params(model_m, named1), **kwargs)
                t2.load_state_dict(copy.deepcopy(t_opt.state_dict()))
                m2.load_state_dict(copy.deepcopy(m_opt.state_dict()))
                _train_conv_bn(t2, model_t, x, target)
                _train_conv_bn(m2, model_m, x, target)
                _assert_agree(t2, m2, what=what)
                _assert_sd_like_torch(m2.state_dict(), t2.state_dict(), TOL[F32])
                if named0 or named1:
                    assert m2.state_dict()["param_groups"][0]["param_names"] == [
                        "0.weight",
                        "0.bias",
                        "1.weight",
                        "1.bias",
                    ], what


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_optimizer_keeps_training_like_torch(name, how):
    """torch's test_deepcopy_copies_all_public_attrs, then the copy (deepcopy, or a pickle
    round trip) is used: it steps, saves and loads exactly like a copy of torch's."""
    duplicate = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        _step_both(t_opt, m_opt, steps=3, what=label)
        t_dup, m_dup = duplicate(t_opt), duplicate(m_opt)
        assert public(m_dup) == public(m_opt) == public(t_dup), label
        assert type(m_dup) is type(m_opt)
        assert not set(map(id, _params(m_dup))) & set(map(id, _params(m_opt)))
        _assert_agree(t_dup, m_dup, what=f"{label} copy")
        _step_both(t_dup, m_dup, steps=3, what=f"{label} copy")
        _assert_sd_like_torch(m_dup.state_dict(), t_dup.state_dict(), TOL[F32])
        m_dup.load_state_dict(m_dup.state_dict())
        t_dup.load_state_dict(t_dup.state_dict())
        _step_both(t_dup, m_dup, steps=1, what=f"{label} copy reloaded")
        # the originals were not touched by training the copies
        _step_both(t_opt, m_opt, steps=1, what=label)


# -------------------------------------------------------------------------------------------
# 5. hooks


def _sd_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _sd_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer, state_dict):
    # returns a new dict (a deep copy), which must then be the one loaded
    replacement = copy.deepcopy(state_dict)
    replacement["param_groups"][0]["lr"] = 0.003
    return replacement


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_pre_and_post_hooks(name):
    """torch's test_state_dict_pre_hook / _post_hook / _pre_post_hook."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        for cls in (torch_cls, our_cls):
            what = f"{cls.__name__} {label}"
            opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
            opt.register_state_dict_pre_hook(_sd_pre_hook)
            assert opt.state_dict()["state"]["test"] == 1, what

            opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
            opt.register_state_dict_post_hook(_sd_post_hook)
            assert opt.state_dict()["ran_state_dict_pre_hook"] is False, what

            opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
            opt.register_state_dict_pre_hook(_sd_pre_hook)
            opt.register_state_dict_post_hook(_sd_post_hook)
            sd = opt.state_dict()
            assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True, what


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_then_train_and_reload(name):
    """After the state_dict pre hook put a non-parameter entry in ``optimizer.state`` (as
    torch's test does), training, saving and loading continue exactly like torch."""
    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        for opt in (t_opt, m_opt):
            opt.register_state_dict_pre_hook(_sd_pre_hook)
            opt.register_state_dict_post_hook(_sd_post_hook)
        _step_both(t_opt, m_opt, steps=2, what=label)
        t_sd, m_sd = t_opt.state_dict(), m_opt.state_dict()
        assert m_sd["ran_state_dict_pre_hook"] is True and m_opt.state["test"] == 1
        _assert_sd_like_torch(m_sd, t_sd, TOL[F32])
        _step_both(t_opt, m_opt, steps=2, what=label)
        t_opt.load_state_dict(t_sd)
        m_opt.load_state_dict(m_sd)
        _assert_agree(t_opt, m_opt, what=f"{label} reloaded")
        _step_both(t_opt, m_opt, steps=2, what=f"{label} reloaded")


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_pre_hook_and_prepend(name):
    """torch's test_load_state_dict_pre_hook_and_prepend (and the same without prepend, where
    the returned dict of the second hook wins), then training matches torch."""
    for label, kwargs in _all_inputs(name):
        for prepend, expected_lr in ((True, 0.002), (False, 0.003)):
            what = f"{label} prepend={prepend}"
            t_opt, m_opt = _pair(name, kwargs)
            for opt in (t_opt, m_opt):
                state_dict = opt.state_dict()
                opt.register_load_state_dict_pre_hook(_load_pre_hook1)
                opt.load_state_dict(state_dict)
                assert opt.param_groups[0]["lr"] == 0.002, what
                opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=prepend)
                opt.load_state_dict(state_dict)
                assert opt.param_groups[0]["lr"] == expected_lr, what
            _step_both(t_opt, m_opt, steps=2, what=what)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_post_hook_then_train_and_reload(name):
    """torch's test_load_state_dict_post_hook: the hook stores flags in ``optimizer.state``
    (``optimizer.state["ran_load_state_dict_post_hook"] = True``); then the optimizer steps,
    saves and loads again, like torch."""
    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        _step_both(t_opt, m_opt, steps=2, what=label)
        for opt in (t_opt, m_opt):
            opt.register_load_state_dict_post_hook(_load_post_hook)
            opt.load_state_dict(opt.state_dict())
            assert opt.state["ran_load_state_dict_pre_hook2"] is False, label
            assert opt.state["ran_load_state_dict_post_hook"] is True, label
        _step_both(t_opt, m_opt, steps=2, what=label)
        t_sd, m_sd = t_opt.state_dict(), m_opt.state_dict()
        _assert_sd_like_torch(m_sd, t_sd, TOL[F32])
        t_opt.load_state_dict(t_sd)
        m_opt.load_state_dict(m_sd)
        _step_both(t_opt, m_opt, steps=2, what=f"{label} reloaded")


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_pre_post_hook(name):
    """torch's test_load_state_dict_pre_post_hook: the post hook sees what the pre hook's
    returned dict loaded."""
    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        for opt in (t_opt, m_opt):
            opt.register_load_state_dict_pre_hook(_load_pre_hook2)
            opt.register_load_state_dict_post_hook(_load_post_hook)
            opt.load_state_dict(opt.state_dict())
            assert opt.state["ran_load_state_dict_pre_hook2"] is True, label
            assert opt.state["ran_load_state_dict_post_hook"] is True, label
        _step_both(t_opt, m_opt, steps=2, what=label)


HOOK_KINDS = {
    # kind: (register method, hook factory(log, tag), trigger(opt))
    "state_dict_pre": (
        "register_state_dict_pre_hook",
        lambda log, tag: lambda opt: log.append(tag),
        lambda opt: opt.state_dict(),
    ),
    "state_dict_post": (
        "register_state_dict_post_hook",
        lambda log, tag: lambda opt, sd: log.append(tag),
        lambda opt: opt.state_dict(),
    ),
    "load_state_dict_pre": (
        "register_load_state_dict_pre_hook",
        lambda log, tag: lambda opt, sd: log.append(tag),
        lambda opt: opt.load_state_dict(opt.state_dict()),
    ),
    "load_state_dict_post": (
        "register_load_state_dict_post_hook",
        lambda log, tag: lambda opt: log.append(tag),
        lambda opt: opt.load_state_dict(opt.state_dict()),
    ),
}


@pytest.mark.parametrize("kind", list(HOOK_KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_hook_order_with_prepend(name, kind):
    """Hooks run in registration order, prepend=True ones first (latest first); a removed
    handle stops its hook; same order as torch's class."""
    register, make, trigger = HOOK_KINDS[kind]
    logs = []
    for opt in _pair(name, {}):
        _feed(opt, opt)
        opt.step()
        log = []
        handles = {}
        for tag, prepend in (("a", False), ("b", True), ("c", False), ("d", True)):
            handles[tag] = getattr(opt, register)(make(log, tag), prepend=prepend)
        trigger(opt)
        handles["b"].remove()
        trigger(opt)
        logs.append(log)
    assert logs[1] == logs[0] == ["d", "b", "a", "c", "d", "a", "c"]


@pytest.mark.parametrize("name", NAMES)
def test_step_pre_and_post_hooks(name):
    """torch's test_step_pre_hook and test_step_post_hook: fire once per step, stop once
    removed; they receive the same (args, kwargs) as on torch's class."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        seen = {}
        for cls in (torch_cls, our_cls):
            opt = cls([torch.tensor([1.0, 1.0])], **kwargs)
            data = {"pre": 5, "post": 2, "calls": []}

            def pre_hook(o, args, kw, data=data, opt=opt):
                assert o is opt
                data["pre"] += 2
                data["calls"].append(("pre", len(args), sorted(kw)))

            def post_hook(o, args, kw, data=data, opt=opt):
                assert o is opt
                data["post"] += 2
                data["calls"].append(("post", len(args), sorted(kw)))

            pre = opt.register_step_pre_hook(pre_hook)
            post = opt.register_step_post_hook(post_hook)
            opt.step()
            opt.step(closure=None)
            assert (data["pre"], data["post"]) == (9, 6), (cls.__name__, label)
            pre.remove()
            post.remove()
            opt.step()
            assert (data["pre"], data["post"]) == (9, 6), (cls.__name__, label)
            seen[cls] = data["calls"]
        assert seen[our_cls] == seen[torch_cls], label


@pytest.mark.parametrize("name", NAMES)
def test_step_all_hooks(name):
    """torch's test_step_all_hooks: global pre, local pre, local post, global post."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        params = [torch.tensor([1.0, 1.0])]
        optim = our_cls(params, **kwargs)
        optim2 = torch.optim.SGD(params)
        data = []
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k, data=data: data.append(0)),
            register_optimizer_step_post_hook(lambda o, a, k, data=data: data.append(5)),
        ]
        try:
            for opt in (optim, optim2):
                pre, post = (lambda o, a, k, data=data, tag=tag: data.append(tag) for tag in (1, 2))
                handles += [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
            optim.step()
            assert data == [0, 1, 2, 5], label
            optim2.step()
            assert data == [0, 1, 2, 5] * 2, label
            optim.step()
            assert data == [0, 1, 2, 5] * 3, label
        finally:
            for handle in handles:
                handle.remove()
        optim.step()
        optim2.step()
        assert data == [0, 1, 2, 5] * 3, label


@pytest.mark.parametrize("name", NAMES)
def test_step_pre_hook_can_replace_arguments(name):
    """A step pre hook may return new (args, kwargs): here it swaps in another closure."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        (tw, tb), (mw, mb) = _twin([torch.randn(10, 5), torch.randn(10)])
        x = torch.randn(5)
        t_opt, m_opt = torch_cls([tw, tb], **kwargs), our_cls([mw, mb], **kwargs)
        for opt, w, b in ((t_opt, tw, tb), (m_opt, mw, mb)):
            real = _loss_closure(opt, w, b, x)
            opt.register_step_pre_hook(lambda o, args, kw, real=real: ((args[0], real), {}))
        for _ in range(3):
            t_loss = t_opt.step(lambda: None)
            m_loss = m_opt.step(lambda: None)
            assert isinstance(m_loss, torch.Tensor), label
            torch.testing.assert_close(m_loss, t_loss)
        _assert_agree(t_opt, m_opt, what=label)


# -------------------------------------------------------------------------------------------
# 6. compatibility: defaults, param_groups, repr, non-empty state, torch's error inputs


@pytest.mark.parametrize("name", NAMES)
def test_defaults_param_groups_and_repr_match_torch(name):
    """``optimizer.defaults``, the param_groups (keys and values), repr, the state_dict of an
    untouched optimizer, and torch's test_non_empty_state after one step."""
    torch_cls, our_cls = _classes(name)
    for label, kwargs in _all_inputs(name):
        t_opt, m_opt = _pair(name, kwargs)
        assert m_opt.defaults == t_opt.defaults, label
        _assert_agree(t_opt, m_opt, what=label)
        assert repr(m_opt).replace(our_cls.__name__, torch_cls.__name__, 1) == repr(t_opt)
        _assert_sd_like_torch(m_opt.state_dict(), t_opt.state_dict())
        extra_t, extra_m = _twin([torch.randn(2)])
        t_opt.add_param_group({"params": extra_t})
        m_opt.add_param_group({"params": extra_m})
        _assert_agree(t_opt, m_opt, what=label)
        _step_both(t_opt, m_opt, what=label)
        assert all(len(s) > 0 for s in m_opt.state.values()), label
        assert len(m_opt.state) == len(t_opt.state), label


ERROR_CASES = []
for _name in NAMES:
    for _i, _err in enumerate(INFOS[_name].optim_error_inputs_func(device="cpu", dtype=F32)):
        _kw = _err.optimizer_error_input.kwargs
        _tag = "-rejected_by_design" if isinstance(_kw.get("lr"), torch.Tensor) else ""
        _id = f"{_name}-{_i}-{_slug(_err.optimizer_error_input.desc)}{_tag}"
        ERROR_CASES.append(pytest.param(_name, _i, id=_id))


@pytest.mark.parametrize("name,index", ERROR_CASES)
def test_error_inputs_like_torch(name, index):
    """torch's test_errors on optim_db's error inputs: same error type and message. The
    Tensor-lr inputs are refused by design: a TypeError naming ``lr`` instead."""
    err = INFOS[name].optim_error_inputs_func(device="cpu", dtype=F32)[index]
    params, kwargs = err.optimizer_error_input.params, err.optimizer_error_input.kwargs
    our_cls = _classes(name)[1]
    if isinstance(kwargs.get("lr"), torch.Tensor):
        with pytest.raises(TypeError, match=r"\blr\b"):
            our_cls(params, **kwargs)
        return
    if "duplicate parameters" in err.error_regex:
        # torch warns and keeps both; the fused step would update the one tensor from two
        # threads, so a duplicate is refused by design (after torch's own warning)
        with pytest.warns(UserWarning, match=err.error_regex):
            with pytest.raises(ValueError, match="appears twice"):
                our_cls(params, **kwargs)
        return
    if err.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                our_cls(params, **kwargs)
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                our_cls(params, **kwargs)
    else:
        opt = our_cls(params, **kwargs)
        if issubclass(err.error_type, Warning):
            with pytest.warns(err.error_type, match=err.error_regex):
                opt.step()
        else:
            with pytest.raises(err.error_type, match=err.error_regex):
                opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_fused_with_meta_params_behaves_like_torch(name):
    """torch's test_fused_error_on_params_on_meta: fused=True with parameters on the meta
    device. Ours must do what torch does (construct, raise on step or not, with the same
    exception type), then work once the module is materialised on the CPU."""
    outcomes = {}
    models = {}
    for cls in _classes(name):
        with torch.device("meta"):
            model = torch.nn.Sequential(
                torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1)
            )
        events = []
        try:
            opt = cls(model.parameters(), fused=True)
            events.append("constructed")
        except Exception as e:  # compared with torch's outcome below
            events.append(type(e).__name__)
            outcomes[cls] = events
            continue
        with torch.device("meta"):
            for p in model.parameters():
                p.grad = torch.rand_like(p)
        try:
            opt.step()
            events.append("stepped")
        except Exception as e:
            events.append(type(e).__name__)
        opt.zero_grad(set_to_none=True)
        model.to_empty(device="cpu")
        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape))
                p.grad = torch.randn(p.shape)
        opt.step()
        outcomes[cls] = events
        models[cls] = model
    torch_cls, our_cls = _classes(name)
    assert outcomes[our_cls] == outcomes[torch_cls]
    for pt, pm in zip(*(models[c].parameters() for c in models if len(models) == 2)):
        torch.testing.assert_close(pm, pt, **TOL[F32])


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_on_cpu_matches_torch(name):
    """torch.amp.GradScaler("cpu") drives ours like torch's (for-loop and fused, where
    torch's fused step unscales itself), including a skipped step on an inf gradient."""
    torch_cls, our_cls = _classes(name)
    for impl in ("forloop", "fused"):
        kwargs = {"lr": 0.01, **IMPLS[impl]}
        (tw, tb), (mw, mb) = _twin([torch.randn(10, 5), torch.randn(10)])
        x = torch.randn(5)
        t_opt, m_opt = torch_cls([tw, tb], **kwargs), our_cls([mw, mb], **kwargs)
        scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
        for k in range(5):
            for opt, w, b, scaler in ((t_opt, tw, tb, scalers[0]), (m_opt, mw, mb, scalers[1])):
                opt.zero_grad()
                scaler.scale((w.mv(x) + b).pow(2).sum()).backward()
                if k == 2:
                    w.grad[0, 0] = float("inf")
                scaler.step(opt)
                scaler.update()
            assert scalers[1].get_scale() == scalers[0].get_scale()
            _assert_agree(t_opt, m_opt, what=f"{impl} step {k}")


# -------------------------------------------------------------------------------------------
# 7. unsupported by design: a clear TypeError / ValueError naming the option


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_rejected_by_design(name):
    torch_cls, our_cls = _classes(name)
    configs = [
        i.kwargs for i in _optim_inputs(name) if isinstance(i.kwargs.get("lr"), torch.Tensor)
    ]
    configs += [{"lr": torch.tensor(1e-3)}, {"lr": torch.tensor(1e-3), "foreach": False}]
    for kwargs in configs:
        torch_cls([Parameter(torch.randn(3))], **kwargs)  # torch takes it
        with pytest.raises(TypeError, match=r"\blr\b"):
            our_cls([Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_capturable_rejected_by_design(name):
    _, our_cls = _classes(name)
    with pytest.raises((TypeError, ValueError), match="capturable"):
        our_cls([Parameter(torch.randn(3))], capturable=True)


def test_sgd_has_no_capturable_argument_like_torch():
    with pytest.raises(TypeError) as t_err:
        torch.optim.SGD([Parameter(torch.randn(3))], capturable=True)
    with pytest.raises(TypeError, match="capturable") as m_err:
        MaskedSGD([Parameter(torch.randn(3))], capturable=True)
    assert "capturable" in str(t_err.value) and "capturable" in str(m_err.value)


@pytest.mark.parametrize("name", NAMES)
def test_differentiable_rejected_by_design(name):
    _, our_cls = _classes(name)
    with pytest.raises((TypeError, ValueError), match="differentiable"):
        our_cls([Parameter(torch.randn(3))], differentiable=True)


@pytest.mark.parametrize("name", NAMES)
def test_complex_params_rejected_by_design(name):
    torch_cls, our_cls = _classes(name)
    assert INFOS[name].supports_complex  # torch's own suite runs these (test_complex)
    t_param = torch.randn(5, 5, dtype=torch.complex64, requires_grad=True)
    t_opt = torch_cls([t_param])
    t_param.grad = torch.randn_like(t_param)
    t_opt.step()
    with pytest.raises((TypeError, ValueError), match="complex"):
        param = torch.randn(5, 5, dtype=torch.complex64, requires_grad=True)
        opt = our_cls([param])
        param.grad = torch.randn_like(param)
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_sparse_grads_rejected_by_design(name):
    _, our_cls = _classes(name)
    param = Parameter(torch.randn(4, 3))
    opt = our_cls([param])
    param.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises((TypeError, ValueError), match="sparse"):
        opt.step()
    if name == "sgd":  # torch.optim.SGD takes sparse gradients: a deliberate difference
        ref = Parameter(torch.randn(4, 3))
        t_opt = torch.optim.SGD([ref])
        ref.grad = torch.randn(4, 3).to_sparse()
        t_opt.step()
