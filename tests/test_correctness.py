"""Issue 11, "Correctness first": one test (or group) per reported case. Each failed before
the fix: a crash, a mask on the wrong weights, a stale autograd value, a race, a load that
half-happened, a refused strided parameter, a ticket lost without notice, an unclear error.

Oracles: torch.optim on a copy (re-masked after every step), the reference path, or the
exact error the case must raise. The segfault cases run in a subprocess so a regression
shows as a failing test, not a dead test run."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import lottery_ext as lx
from lottery_ext import MaskedAdam, MaskedAdamW, MaskedSGD, _ops

TORCH = {MaskedSGD: torch.optim.SGD, MaskedAdam: torch.optim.Adam, MaskedAdamW: torch.optim.AdamW}
KWARGS = {
    MaskedSGD: dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    MaskedAdam: dict(lr=1e-2, weight_decay=0.01),
    MaskedAdamW: dict(lr=1e-2, amsgrad=True),
}
CLASSES = list(KWARGS)
BUFFERS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@pytest.fixture(params=CLASSES, ids=lambda c: c.__name__)
def cls(request):
    return request.param


def _buffers(opt, p):
    return [v for k, v in opt.state.get(p, {}).items() if k in BUFFERS]


def _assert_pruned_zero(opt, p, mask):
    assert not p.detach()[~mask].any()
    for b in _buffers(opt, p):
        assert not b[~mask].any()


class _Oracle:
    """torch.optim on copies, pruned gradients zeroed and parameter + state re-masked after
    every step: what a masked step must give, by logical index."""

    def __init__(self, cls, params, masks):
        self.params = [nn.Parameter(p.detach().clone()) for p in params]
        self.masks = masks
        self.opt = TORCH[cls](self.params, **KWARGS[cls])

    @torch.no_grad()
    def step(self, grads):
        for p, g, m in zip(self.params, grads, self.masks):
            p.grad = g.clone() if m is None else g.masked_fill(~m, 0)
        self.opt.step()
        for p, m in zip(self.params, self.masks):
            if m is not None:
                p.masked_fill_(~m, 0)
                for b in _buffers(self.opt, p):
                    b.masked_fill_(~m, 0)


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------------------------------------
# 1. state on another device: a clear error, never a segfault


@pytest.mark.parametrize("key", ["exp_avg", "momentum_buffer", "mask"])
def test_state_on_another_device_is_refused_not_a_crash(key):
    cls = "MaskedSGD" if key == "momentum_buffer" else "MaskedAdam"
    kw = "lr=0.1, momentum=0.9" if key == "momentum_buffer" else "lr=0.1"
    edit = (
        "opt._masks[p] = torch.ones(10, dtype=torch.bool, device='meta')"
        if key == "mask"
        else f"opt.state[p]['{key}'] = torch.zeros(10, device='meta')"
    )
    result = _run_isolated(f"""
        import torch, lottery_ext as lx
        p = torch.nn.Parameter(torch.randn(10))
        opt = lx.{cls}([p], {kw}, masks={{p: torch.rand(10) > 0.5}})
        p.grad = torch.randn(10); opt.step()
        {edit}
        p.grad = torch.randn(10)
        try:
            opt.step()
        except ValueError as e:
            print("REFUSED", e)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED" in result.stdout and "meta" in result.stdout, result.stdout


def test_loaded_state_moves_to_the_parameters_device():
    # torch's load_state_dict casts state to each parameter's device; so does ours
    p = nn.Parameter(torch.randn(5))
    opt = MaskedAdam([p], masks={p: torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool)})
    p.grad = torch.randn(5)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].double()
    opt2 = MaskedAdam([p])
    opt2.load_state_dict(sd)
    assert opt2.state[p]["exp_avg"].dtype == torch.float32
    p.grad = torch.randn(5)
    opt2.step()
    _assert_pruned_zero(opt2, p, opt2.get_mask(p))


# ---------------------------------------------------------------------------------------------
# 2. a layout change after the masks were set: the mask follows the logical indices


@pytest.mark.parametrize("to", ["contiguous", "channels_last"])
def test_mask_follows_parameter_through_a_layout_change(cls, to):
    start = torch.contiguous_format if to == "channels_last" else torch.channels_last
    target = torch.channels_last if to == "channels_last" else torch.contiguous_format
    conv = nn.Conv2d(3, 4, 3).to(memory_format=start)
    mask = torch.rand(conv.weight.shape) > 0.5
    opt = cls(conv.parameters(), masks={conv.weight: mask}, **KWARGS[cls])
    oracle = _Oracle(cls, [conv.weight, conv.bias], [mask, None])
    for i in range(6):
        if i == 2:  # the optimizer exists, has state and masks: now the model changes layout
            conv.to(memory_format=target)
            assert conv.weight.is_contiguous(memory_format=target)
        grads = [torch.randn_like(conv.weight), torch.randn(4)]
        conv.weight.grad = grads[0].contiguous(memory_format=target if i >= 2 else start)
        conv.bias.grad = grads[1].clone()
        opt.step()
        oracle.step(grads)
    _assert_pruned_zero(opt, conv.weight, mask)
    torch.testing.assert_close(conv.weight.detach(), oracle.params[0].detach())
    torch.testing.assert_close(conv.bias.detach(), oracle.params[1].detach())
    # and the state stays usable: a round trip and a rewind keep the mask in place
    snap = lx.snapshot(conv)
    lx.rewind(conv, snap, optimizer=opt)
    _assert_pruned_zero(opt, conv.weight, mask)


def test_set_mask_after_layout_change_zeroes_the_right_entries(cls):
    conv = nn.Conv2d(2, 3, 3)
    opt = cls(conv.parameters(), **KWARGS[cls])
    conv.weight.grad, conv.bias.grad = torch.randn_like(conv.weight), torch.randn(3)
    opt.step()
    conv.to(memory_format=torch.channels_last)
    mask = torch.rand(conv.weight.shape) > 0.5
    kept = conv.weight.detach()[mask].clone()
    opt.set_mask(conv.weight, mask)
    _assert_pruned_zero(opt, conv.weight, mask)
    assert torch.equal(conv.weight.detach()[mask], kept)


# ---------------------------------------------------------------------------------------------
# 3. autograd sees every in-place write of the kernels


def _version_bumped(write, tensor):
    before = tensor._version
    write()
    return tensor._version > before


def test_step_bumps_versions_like_torchs_fused_step(cls):
    p = nn.Parameter(torch.randn(8))
    opt = cls([p], masks={p: torch.rand(8) > 0.3}, **KWARGS[cls])
    y = (p * p).sum()  # saves p for backward
    p.grad = torch.randn(8)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    for b in _buffers(opt, p):
        assert _version_bumped(lambda: (setattr(p, "grad", torch.randn(8)), opt.step()), b)


def test_apply_mask_rewind_reinitialize_bump_versions():
    model = nn.Linear(4, 3)
    mask = torch.rand(3, 4) > 0.5
    w = model.weight
    assert _version_bumped(lambda: _ops.apply_mask([w.detach()], [mask]), w)
    snap = lx.snapshot(model)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, masks={w: mask})
    y = (w**2).sum()  # saves w for backward
    lx.rewind(model, snap, optimizer=opt)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    assert _version_bumped(lambda: lx.reinitialize(model, {w: mask}, seed=1, optimizer=opt), w)
    hist = torch.zeros(2**16 + 1, dtype=torch.int64)
    assert _version_bumped(lambda: _ops.magnitude_histogram([w.detach()], [None], 15, 16, 0, 0,
                                                            hist), hist)  # fmt: skip
    out = torch.ones(3, 4, dtype=torch.bool)
    assert _version_bumped(lambda: _ops.threshold_mask([w.detach()], [None], [out], 0, 0), out)


# ---------------------------------------------------------------------------------------------
# 4. aliasing: refused with a clear error, never a race


def test_duplicate_parameter_in_one_group_is_refused(cls):
    p = nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="appears twice"):
        cls([p, p], **KWARGS[cls])


def test_parameter_in_two_groups_is_refused(cls):
    p, q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="appears twice|more than one parameter group"):
        cls([{"params": [p, q]}, {"params": [p]}], **KWARGS[cls])
    opt = cls([q], **KWARGS[cls])
    with pytest.raises(ValueError, match="appears twice|more than one parameter group"):
        opt.add_param_group({"params": [q]})
    assert len(opt.param_groups) == 1  # the refused group was not kept


def test_overlapping_views_are_refused_and_disjoint_views_step_like_torch(cls):
    base = torch.randn(6, 4)
    a, b = nn.Parameter(base[:4]), nn.Parameter(base[2:])
    with pytest.raises(ValueError, match="share memory"):
        cls([a, b], **KWARGS[cls])
    opt = cls([nn.Parameter(torch.randn(3))], **KWARGS[cls])
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [a, nn.Parameter(base[3:5])]})
    # alternate columns of one matrix: one storage, no shared element
    even, odd = nn.Parameter(base[:, ::2]), nn.Parameter(base[:, 1::2])
    opt = cls([even, odd], **KWARGS[cls])
    oracle = _Oracle(cls, [even, odd], [None, None])
    for _ in range(3):
        grads = [torch.randn(6, 2), torch.randn(6, 2)]
        even.grad, odd.grad = (g.clone() for g in grads)
        opt.step()
        oracle.step(grads)
    torch.testing.assert_close(even.detach(), oracle.params[0].detach())
    torch.testing.assert_close(odd.detach(), oracle.params[1].detach())


def test_aliased_state_buffers_in_a_loaded_state_dict_are_refused():
    p, q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = MaskedAdam([p, q])
    p.grad, q.grad = torch.randn(4), torch.randn(4)
    opt.step()
    sd = opt.state_dict()
    sd["state"][1]["exp_avg"] = sd["state"][0]["exp_avg"]
    fresh_p, fresh_q = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    fresh = MaskedAdam([fresh_p, fresh_q])
    # torch's load keeps a tensor that needs no cast as it is: both would share one buffer
    with pytest.raises(ValueError, match="appears twice|share memory"):
        fresh.load_state_dict(sd)
    assert not fresh.state


# ---------------------------------------------------------------------------------------------
# 5. hand-made and foreign state dicts


def _trained(cls=MaskedAdam, n=5):
    p = nn.Parameter(torch.randn(n))
    mask = torch.rand(n) > 0.4
    opt = cls([p], masks={p: mask}, **KWARGS[cls])
    for _ in range(3):
        p.grad = torch.randn(n)
        opt.step()
    return p, mask, opt


@pytest.mark.parametrize("step", [torch.tensor(3), torch.tensor(3.0, dtype=torch.float64), 3,
                                  3.0, torch.tensor([3.0])])  # fmt: skip
def test_foreign_step_counters_are_read_as_numbers(step):
    p, mask, opt = _trained()
    ref_p, _, ref = _trained()
    with torch.no_grad():
        ref_p.copy_(p)
    ref.load_state_dict(opt.state_dict())
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = step
    opt.load_state_dict(sd)
    assert opt.state[p]["step"].dtype == torch.float32
    opt.state[p]["step"] = step  # and set by hand after the load
    g = torch.randn(5)
    p.grad, ref_p.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    torch.testing.assert_close(p.detach(), ref_p.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("edit", "exc", "msg"),
    [
        (lambda sd: sd["masks"].update({-1: sd["masks"][0]}), ValueError, r"masks'\]\[-1\].*range"),
        (lambda sd: sd["masks"].update({7: sd["masks"][0]}), ValueError, r"masks'\]\[7\].*range"),
        (
            lambda sd: sd["masks"].update({0: torch.ones(3, dtype=torch.bool)}),
            ValueError,
            r"state_dict\['masks'\]\[0\].*shape",
        ),
        (lambda sd: sd["masks"].update({0: torch.ones(5)}), TypeError, r"masks'\]\[0\].*bool"),
        (lambda sd: sd.update(masks=[1, 2]), TypeError, r"state_dict\['masks'\]: expected a dict"),
        (lambda sd: sd.pop("state"), ValueError, r"no 'state' entry"),
        (lambda sd: sd.update(param_groups=5), TypeError, r"'param_groups'\]: expected a list"),
        (lambda sd: sd["state"].update({0: 5}), TypeError, r"state'\]\[0\]: expected a dict"),
        (lambda sd: sd["state"][0].update(step="x"), TypeError, r"'step' of .*got str"),
        (lambda sd: sd["state"][0].update(step=torch.tensor(-2.0)), ValueError, r"'step'.*>= 0"),
        (
            lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3)),
            ValueError,
            r"'exp_avg' of .*shape \(3,\)",
        ),
        (lambda sd: sd.update(restart=[9]), ValueError, r"restart'\].*index 9 is out of range"),
    ],  # fmt: skip
)
def test_malformed_state_dict_names_the_key_and_changes_nothing(edit, exc, msg):
    p, mask, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    edit(sd)
    before = copy.deepcopy(opt.state_dict())
    weights = p.detach().clone()
    with pytest.raises(exc, match=msg):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert torch.equal(after["masks"][0], before["masks"][0])
    for k, v in before["state"][0].items():
        assert torch.equal(after["state"][0][k], v), k
    assert torch.equal(p.detach(), weights)
    p.grad = torch.randn(5)
    opt.step()  # still masked
    _assert_pruned_zero(opt, p, mask)


def test_non_parameter_keys_in_state_and_post_hooks_see_the_masks():
    # torch's own tests keep flags in optimizer.state from a load_state_dict post-hook
    p, mask, opt = _trained()
    seen = {}

    def post_hook(optimizer):
        optimizer.state["ran_post_hook"] = True
        seen["mask"] = optimizer.get_mask(p)

    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(opt.state_dict())
    assert seen["mask"] is not None and torch.equal(seen["mask"], mask)
    sd = opt.state_dict()  # the flag is saved, as torch saves it
    assert sd["state"]["ran_post_hook"] is True
    opt.load_state_dict(sd)
    p.grad = torch.randn(5)
    opt.step()
    snap_model = nn.Module()
    snap_model.p = p
    lx.rewind(snap_model, lx.snapshot(snap_model), optimizer=opt)
    _assert_pruned_zero(opt, p, mask)


def test_pre_hook_can_rewrite_the_state_dict_including_masks():
    p, mask, opt = _trained()
    new_mask = mask & (torch.arange(5) % 2 == 0)

    def pre_hook(optimizer, sd):
        sd = dict(sd)
        sd["masks"] = {0: new_mask}
        return sd

    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.load_state_dict(opt.state_dict())
    assert torch.equal(opt.get_mask(p), new_mask)


# ---------------------------------------------------------------------------------------------
# 6. a failed load changes nothing


def test_load_failing_inside_torch_keeps_the_masks(cls):
    p, mask, opt = _trained(cls)
    other = cls([nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(2))], **KWARGS[cls])
    with pytest.raises(ValueError):  # torch: the groups do not match
        opt.load_state_dict(other.state_dict())
    assert torch.equal(opt.get_mask(p), mask)
    p.grad = torch.randn(5)
    opt.step()
    _assert_pruned_zero(opt, p, mask)


def test_load_failing_after_torchs_part_restores_everything():
    p, mask, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(float("nan"))  # refused after torch's load ran
    state_before = opt.state
    with pytest.raises(ValueError, match="'step'"):
        opt.load_state_dict(sd)
    assert opt.state is state_before and torch.equal(opt.get_mask(p), mask)


# ---------------------------------------------------------------------------------------------
# 7. strided parameters step exactly like torch


@pytest.mark.parametrize("view", ["transposed", "sliced", "sliced_transposed", "expanded_dim"])
def test_strided_parameters_step_like_torch(cls, view, dtype=torch.float64):
    base = torch.randn(8, 6, dtype=dtype)
    p = {
        "transposed": lambda: base.t(),
        "sliced": lambda: base[::2, 1:5],
        "sliced_transposed": lambda: base.t()[1:, ::3],
        "expanded_dim": lambda: base[:, 2:3],
    }[view]()
    p = nn.Parameter(p)
    mask = torch.rand(p.shape) > 0.4
    opt = cls([p], masks={p: mask}, **KWARGS[cls])
    oracle = _Oracle(cls, [p], [mask])
    for _ in range(5):
        g = torch.randn(p.shape, dtype=dtype)
        p.grad = g.clone()
        opt.step()
        oracle.step([g])
    torch.testing.assert_close(p.detach(), oracle.params[0].detach())
    _assert_pruned_zero(opt, p, mask)
    sd = opt.state_dict()  # and round-trips
    opt2 = cls([p], **KWARGS[cls])
    opt2.load_state_dict(sd)
    model = nn.Module()
    model.p = p
    lx.rewind(model, lx.snapshot(model), optimizer=opt2)
    _assert_pruned_zero(opt2, p, mask)


def test_strided_parameter_unmasked_matches_torch_bitwise():
    base = torch.randn(5, 7)
    p = nn.Parameter(base[:, ::2])
    ref = nn.Parameter(p.detach().clone())
    opt, topt = MaskedAdam([p], lr=0.01), torch.optim.Adam([ref], lr=0.01, foreach=False)
    for _ in range(4):
        g = torch.randn(5, 4)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 8. guard rails: where a ticket would be lost without notice


def _pruned_model():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    snap = lx.snapshot(model)
    masks = {"0.weight": torch.rand(5, 6) > 0.5}
    return model, snap, masks


@pytest.mark.parametrize("opt_kind", ["none", "torch"])
def test_rewind_and_reinitialize_warn_without_a_masked_optimizer(opt_kind):
    model, snap, masks = _pruned_model()
    opt = torch.optim.Adam(model.parameters()) if opt_kind == "torch" else None
    with pytest.warns(UserWarning, match="nothing keeps the pruned weights at zero"):
        lx.rewind(model, snap, masks, opt)
    with pytest.warns(UserWarning, match="nothing keeps the pruned weights at zero"):
        lx.reinitialize(model, masks, seed=0, optimizer=opt)


def test_rewind_and_reinitialize_with_a_masked_optimizer_are_silent():
    model, snap, masks = _pruned_model()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lx.rewind(model, snap, masks, opt)
        lx.reinitialize(model, masks, seed=0, optimizer=opt)
    w = model[0].weight
    assert torch.equal(opt.get_mask(w), masks["0.weight"])
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    assert not w.detach()[~masks["0.weight"]].any()


def test_rewind_restarts_the_lr_schedule():
    model, snap, masks = _pruned_model()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    fresh_lrs = []
    for _ in range(5):
        fresh_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] != 0.1
    lx.rewind(model, snap, masks, opt)  # documented: the schedule goes on
    assert opt.param_groups[0]["lr"] != 0.1
    lx.rewind(model, snap, masks, opt, scheduler=sched)
    again = []
    for _ in range(5):
        again.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert again == fresh_lrs


def test_rewind_to_theta_k_restores_the_schedule_at_k():
    model, _, masks = _pruned_model()
    opt = MaskedAdam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=3),
         torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)],
        milestones=[3],
    )  # fmt: skip
    lrs, snap_k = [], None
    for it in range(8):
        if it == 2:
            snap_k = lx.snapshot(model, iteration=2, scheduler=sched)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lx.rewind(model, snap_k, masks, opt, scheduler=sched)
    again = []
    for _ in range(6):
        again.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert again == pytest.approx(lrs[2:])
    with pytest.raises(TypeError, match="cannot be restarted in place"):
        lx.restart_scheduler(sched)
    other = MaskedSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="another optimizer"):
        lx.rewind(model, snap_k, masks, other, scheduler=sched)


def test_random_masks_is_pure_and_prune_randomly_commits():
    model, _, _ = _pruned_model()
    pruner = lx.MagnitudePruner(model, rate=0.5)
    before = {n: m.clone() for n, m in pruner.masks.items()}
    weights = model[0].weight.detach().clone()
    masks = pruner.random_masks(seed=3)
    assert pruner.rounds == 0 and all(torch.equal(before[n], m) for n, m in pruner.masks.items())
    assert torch.equal(model[0].weight.detach(), weights)
    assert all(int(m.sum()) < int(before[n].sum()) for n, m in masks.items())
    magnitude = pruner.compute_masks()  # the control keeps what the next round keeps
    assert all(int(m.sum()) == int(magnitude[n].sum()) for n, m in masks.items())
    # one semantic with the runner's random-mask control: the same draw for the same generator
    from lottery_ext.pruning.pruner import random_like

    again = random_like(magnitude, torch.Generator().manual_seed(3))
    assert all(torch.equal(again[n], m) for n, m in masks.items())
    committed = pruner.prune_randomly(seed=3)  # iterative random pruning: nested, committed
    assert pruner.rounds == 1
    for n, m in committed.items():
        assert int(m.sum()) == int(magnitude[n].sum()) and not (m & ~before[n]).any()
    with pytest.warns(DeprecationWarning, match="random_masks"):
        pruner.random_prune(seed=4)


# ---------------------------------------------------------------------------------------------
# 9. errors that say what is wrong


def test_hyper_parameter_bools_are_accepted_like_torch(cls):
    p = nn.Parameter(torch.randn(3))
    kw = dict(KWARGS[cls], weight_decay=False)
    opt, ref = cls([p], **kw), TORCH[cls]([nn.Parameter(p.detach().clone())], **kw)
    assert opt.defaults["weight_decay"] is False and ref.defaults["weight_decay"] is False
    p.grad = torch.randn(3)
    opt.step()


def test_nan_weight_is_reported_by_parameter_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    for scope in ("layer", "global"):
        pruner = lx.MagnitudePruner(model, rate=0.5, scope=scope)
        with pytest.raises(ValueError, match=r"1\.weight.*NaN"):
            pruner.prune()


@pytest.mark.parametrize(
    ("call", "exc", "msg"),
    [
        (lambda t, h, o: _ops.threshold_mask([t], [None], [o], -1, 0), ValueError, "t_key"),
        (lambda t, h, o: _ops.threshold_mask([t], [None], [o], 2**80, 0), ValueError, "t_key"),
        (
            lambda t, h, o: _ops.threshold_mask([t], [None], [o], 1, 2**70),
            ValueError,
            "ties_to_prune",
        ),
        (lambda t, h, o: _ops.threshold_mask([t], [None], [o], 1.5, 0), TypeError, "t_key"),
        (lambda t, h, o: _ops.magnitude_histogram([t], [None], 0, -1, 0, 0, h), ValueError, "bits"),
        (
            lambda t, h, o: _ops.magnitude_histogram([t], [None], 0, 4, 2**70, 2**70, h[:17]),
            ValueError,
            "prefix",
        ),
        (
            lambda t, h, o: _ops.magnitude_histogram([t], [None], -3, 4, 0, 0, h[:17]),
            ValueError,
            "shift",
        ),
        (lambda t, h, o: lx.kth_smallest_magnitude(t, 10**30), ValueError, "out of range"),
        (
            lambda t, h, o: lx.kth_smallest_magnitude(torch.empty(3, device="meta"), 1),
            ValueError,
            "meta tensors hold no values",
        ),
    ],  # fmt: skip
)
def test_out_of_range_integers_and_meta_are_named(call, exc, msg):
    t = torch.randn(10)
    hist = torch.zeros(2**16 + 1, dtype=torch.int64)
    out = torch.ones(10, dtype=torch.bool)
    with pytest.raises(exc, match=msg):
        call(t, hist, out)


@pytest.mark.parametrize(
    ("edit", "exc", "msg"),
    [
        (lambda p, o: o.state[p].__setitem__("exp_avg", "x"), TypeError, "'exp_avg'.*got str"),
        (lambda p, o: o.state[p].__setitem__("exp_avg", None), TypeError, "got NoneType"),
        (lambda p, o: o.state[p].pop("exp_avg_sq"), ValueError, "has no 'exp_avg_sq'"),
        (lambda p, o: o.state.__setitem__(p, 5), TypeError, "is not a dict"),
        (lambda p, o: setattr(p, "data", p.data[:3].clone()), ValueError, r"shape \(6,\)"),
        (lambda p, o: o.state[p].__setitem__("step", torch.tensor([])), ValueError, "'step'"),
        (
            lambda p, o: o.state[p].__setitem__("step", torch.tensor(1.0, device="meta")),
            ValueError,
            "'step'",
        ),
    ],  # fmt: skip
)
def test_hand_edited_state_is_refused_by_name(edit, exc, msg):
    p = nn.Parameter(torch.randn(6))
    opt = MaskedAdam([p], lr=0.1, masks={p: torch.rand(6) > 0.5})
    p.grad = torch.randn(6)
    opt.step()
    edit(p, opt)
    p.grad = torch.randn_like(p)
    with pytest.raises(exc, match=msg):
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=20),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.2, total_iters=5),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 4),
        lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.3),
    ],
    ids=["onecycle", "cosine", "linear", "warm_restarts", "multistep"],
)
def test_restart_scheduler_replays_the_schedule_from_the_start(make):
    p = nn.Parameter(torch.randn(3))
    opt = MaskedSGD([p], lr=0.1, momentum=0.9)
    sched = make(opt)

    def lrs():
        out = []
        for _ in range(12):
            out.append(opt.param_groups[0]["lr"])
            p.grad = torch.randn(3)
            opt.step()
            sched.step()
        return out

    first = lrs()
    lx.restart_scheduler(sched)
    assert lrs() == first
