"""lottery_ext.pruning.interop: masks to torch.nn.utils.prune's reparametrisation and back."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import lottery_ext as lx
from lottery_ext.pruning.interop import from_torch_prune, to_torch_prune

DTYPES = [torch.float32, torch.float64]


def _mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 3)).to(dtype)  # fmt: skip


def _cnn(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
    ).to(dtype)  # fmt: skip


def _input(model, dtype):
    if isinstance(model[0], nn.Conv2d):
        return torch.randn(4, 3, 8, 8, dtype=dtype)
    return torch.randn(5, 12, dtype=dtype)


def _random_masks(model, p=0.5, biases=True):
    return {
        n: torch.rand(t.shape) < p
        for n, t in model.named_parameters()
        if n.endswith("weight") or (biases and n.endswith("bias"))
    }


def _dense_masked(model, masks):
    """The reference: a copy with the pruned weights set to 0."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].masked_fill_(~m, 0)
    return ref


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, saved):
    sd = model.state_dict()
    assert list(sd) == list(saved)
    for k, v in saved.items():
        assert torch.equal(sd[k], v), k


def _assert_round_trip(model, masks, dtype, by_tensor=False):
    """masks -> torch's pruning (forward = masked dense) -> back: same masks, same weights.
    `by_tensor`: hand the masks over keyed by parameter instead of by name."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    ref = _dense_masked(model, masks)
    x = _input(model, dtype)
    named = dict(model.named_parameters())
    to_torch_prune(model, {named[n]: m for n, m in masks.items()} if by_tensor else masks)
    for n in masks:
        mod_name, _, attr = n.rpartition(".")
        module = model.get_submodule(mod_name)
        assert prune.is_pruned(module)
        assert f"{attr}_orig" in dict(module.named_parameters(recurse=False))
        assert f"{attr}_mask" in dict(module.named_buffers(recurse=False))
        assert torch.equal(getattr(module, f"{attr}_orig"), before[n])  # values kept
    for m in (model, ref):
        m.eval()
    assert torch.equal(model(x), ref(x))
    back = from_torch_prune(model)
    assert list(back) == [n for n in before if n in masks]  # model order
    assert not prune.is_pruned(model)
    params = dict(model.named_parameters())
    assert list(params) == list(before)  # same names as before the pruning
    for n, p in params.items():
        assert type(p) is nn.Parameter and id(p) == ids[n]  # same parameter objects
        if n not in masks:
            assert torch.equal(p, before[n])
            continue
        m = back[n]
        assert m.dtype == torch.bool and m.shape == p.shape and m.device == p.device
        assert torch.equal(m, masks[n])
        assert torch.equal(p[m], before[n][m])  # survivors untouched
        pruned = p.detach()[~m]
        assert torch.equal(pruned, torch.zeros_like(pruned))
        assert not torch.signbit(pruned).any()  # +0, not torch's -0 from orig * mask
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    assert torch.equal(model(x), ref(x))
    return back


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_round_trip_exact(make, dtype):
    model = make(dtype)
    masks = _random_masks(model)
    masks["1.weight" if make is _cnn else "0.weight"] = torch.zeros_like(
        masks["1.weight" if make is _cnn else "0.weight"]
    )  # BatchNorm weight (cnn) or a whole Linear (mlp) fully pruned
    masks[next(n for n in masks if n.endswith("bias"))].fill_(True)  # an all-True mask
    _assert_round_trip(model, masks, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_from_the_pruner_keyed_by_tensor(dtype):
    model = _mlp(dtype)
    pruner = lx.MagnitudePruner(model, rate=0.4, prune_biases=True)
    pruner.prune()
    pruner.prune()
    back = _assert_round_trip(model, pruner.masks, dtype, by_tensor=True)
    assert list(back) == list(pruner.masks)
    for n, m in pruner.masks.items():
        assert torch.equal(back[n], m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_false_and_all_true(dtype):
    model = _mlp(dtype)
    masks = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    _assert_round_trip(model, masks, dtype)
    assert all(not p.any() for p in model.parameters())
    model = _mlp(dtype)
    masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    _assert_round_trip(model, masks, dtype)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_stacked_torch_methods(make, dtype):
    """l1_unstructured then random_unstructured (torch's PruningContainer), biases too."""
    model = make(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    x = _input(model, dtype)
    expected = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            prune.l1_unstructured(module, "weight", amount=0.3)
            prune.random_unstructured(module, "weight", amount=0.25)
            prune.l1_unstructured(module, "bias", amount=1)
            assert isinstance(module._forward_pre_hooks[next(iter(module._forward_pre_hooks))],
                              prune.PruningContainer)  # fmt: skip
            for attr in ("weight", "bias"):
                expected[f"{mod_name}.{attr}"] = getattr(module, f"{attr}_mask").bool()
    model.eval()
    out = model(x)
    back = from_torch_prune(model)
    assert list(back) == list(expected)
    assert not prune.is_pruned(model)
    for n, p in model.named_parameters():
        assert id(p) == ids[n]
        if n not in expected:
            assert torch.equal(p, before[n])
            continue
        m = back[n]
        assert torch.equal(m, expected[n])
        assert m.shape == p.shape and m.dtype == torch.bool
        assert torch.equal(p[m], before[n][m])
        assert not p[~m].any() and not torch.signbit(p.detach()[~m]).any()
    assert torch.equal(model(x), out)
    # the masks work as a masked optimizer's, keyed by name
    opt = lx.MaskedAdam(model.named_parameters(), lr=1e-2, masks=back)
    for n, p in model.named_parameters():
        if n in back:
            assert torch.equal(opt.get_mask(p), back[n])
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in back:
            assert not p[~back[n]].any()


def test_masked_adam_after_round_trip_matches_masks_from_start():
    model = _mlp(torch.float64)
    twin = copy.deepcopy(model)
    masks = _random_masks(model, 0.6)
    to_torch_prune(model, masks)
    back = from_torch_prune(model)
    opt = lx.MaskedAdam(model.named_parameters(), lr=1e-2, masks=back)
    opt_twin = lx.MaskedAdam(twin.named_parameters(), lr=1e-2, masks=masks)
    x = torch.randn(7, 12, dtype=torch.float64)
    for _ in range(4):
        for o, m in ((opt, model), (opt_twin, twin)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_optimizer_and_views_stay_valid():
    """prune.remove swaps the parameter's storage; from_torch_prune puts it back."""
    model = _mlp()
    w = model[0].weight
    view = w.detach()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = {"0.weight": torch.rand(w.shape) < 0.5}
    to_torch_prune(model, masks)
    assert model[0].weight_orig is w
    from_torch_prune(model)
    assert model[0].weight is w and opt.param_groups[0]["params"][0] is w
    assert view.data_ptr() == w.data_ptr() and not view[~masks["0.weight"]].any()


def test_channels_last_layout_kept():
    model = _cnn().to(memory_format=torch.channels_last)
    masks = _random_masks(model, biases=False)
    masks = {n: m for n, m in masks.items() if m.dim() == 4}
    weight = model[0].weight
    to_torch_prune(model, masks)
    prune.random_unstructured(model[0], "weight", amount=0.2)  # container: contiguous mask
    back = from_torch_prune(model)
    assert model[0].weight is weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert back["0.weight"].stride() == weight.stride()
    assert not (back["0.weight"] & ~masks["0.weight"]).any()


def test_to_torch_prune_stacks_on_existing_pruning():
    model = _mlp()
    w = model[0].weight
    a, b = torch.rand(w.shape) < 0.6, torch.rand(w.shape) < 0.6
    prune.l1_unstructured(model[0], "weight", amount=0.2)
    l1 = model[0].weight_mask.bool()
    to_torch_prune(model, {"0.weight": a})  # by the name from before the pruning
    to_torch_prune(model, {"0.weight_orig": b})  # by the name named_parameters() now gives
    c = torch.rand(w.shape) < 0.9
    to_torch_prune(model, {w: c})  # by the parameter (now weight_orig)
    d = torch.rand(w.shape) < 0.9
    to_torch_prune(model, {model[0].weight: d})  # by the pruned tensor torch computed
    assert isinstance(next(iter(model[0]._forward_pre_hooks.values())), prune.PruningContainer)
    back = from_torch_prune(model)
    assert torch.equal(back["0.weight"], l1 & a & b & c & d)


def test_empty_masks_and_no_pruning_change_nothing():
    model = _cnn()
    saved = _state(model)
    params = list(model.parameters())
    to_torch_prune(model, {})
    assert not prune.is_pruned(model)
    assert from_torch_prune(model) == {}
    _assert_same_state(model, saved)
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_invalid_masks_change_nothing():
    model = _cnn()
    saved = _state(model)
    good = torch.ones(6, 3, 3, 3, dtype=torch.bool)
    w = model[3].weight
    cases = [
        ({"0.weight": good, "nope.weight": good}, ValueError, "nope.weight"),
        ({"0.weight": good, "1.running_mean": torch.ones(6, dtype=torch.bool)}, ValueError,
         "not a parameter"),
        ({"0.weight": good, torch.zeros(3): good}, ValueError, "not a parameter"),
        ({"0.weight": good, 3: good}, TypeError, "keyed"),
        ({"0.weight": good, "3.weight": torch.ones(4, 6, 3, dtype=torch.bool)}, ValueError,
         "3.weight.*shape"),
        ({"0.weight": good, "3.weight": torch.ones(w.shape)}, TypeError, "3.weight.*dtype"),
        ({"0.weight": good, "3.weight": torch.ones(w.shape, dtype=torch.bool, device="meta")},
         ValueError, "3.weight.*meta"),
        ({"0.weight": good, "3.weight": w.detach().numpy() > 0}, TypeError, "3.weight"),
        ({"0.weight": good, model[0].weight: good}, ValueError, "0.weight.*two masks"),
    ]  # fmt: skip
    for masks, exc, match in cases:
        with pytest.raises(exc, match=match):
            to_torch_prune(model, masks)
        assert not prune.is_pruned(model)
        _assert_same_state(model, saved)
    with pytest.raises(TypeError, match="dict"):
        to_torch_prune(model, [good])


def test_tied_weights_refused():
    emb, out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    out.weight = emb.weight
    model = nn.Sequential(emb, out)
    with pytest.raises(ValueError, match="tied"):
        to_torch_prune(model, {"0.weight": torch.ones(10, 4, dtype=torch.bool)})
    assert not prune.is_pruned(model)


def test_parametrized_original_refused():
    model = _mlp()
    nn.utils.parametrize.register_parametrization(model[0], "weight", nn.Identity())
    with pytest.raises(ValueError, match="parametriz"):
        to_torch_prune(
            model, {"0.parametrizations.weight.original": torch.ones(16, 12, dtype=torch.bool)}
        )
    assert not prune.is_pruned(model)


def test_name_taken_refused():
    model = _mlp()
    model[0].register_buffer("weight_mask", torch.ones(16, 12))
    with pytest.raises(ValueError, match="weight_mask"):
        to_torch_prune(model, {"0.weight": torch.ones(16, 12, dtype=torch.bool)})
    assert not prune.is_pruned(model) and isinstance(model[0].weight, nn.Parameter)


def test_from_torch_prune_refuses_broken_reparametrisation():
    model = _mlp()
    prune.random_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    model[2].weight_mask[0, 0] = 0.5  # not a pruning mask
    saved = _state(model)
    with pytest.raises(ValueError, match="2.weight.*0 and 1"):
        from_torch_prune(model)
    assert prune.is_pruned(model[0]) and prune.is_pruned(model[2])
    _assert_same_state(model, saved)
    model[2].weight_mask[0, 0] = 1
    del model[2]._buffers["weight_mask"]
    with pytest.raises(ValueError, match="2.weight.*incomplete"):
        from_torch_prune(model)
    assert prune.is_pruned(model[0])


def test_pruned_inf_and_nan_become_zero():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[0, :2] = torch.tensor([float("inf"), float("nan")])
    m = torch.ones(16, 12, dtype=torch.bool)
    m[0, :2] = False
    to_torch_prune(model, {"0.weight": m})
    back = from_torch_prune(model)
    assert torch.equal(back["0.weight"], m)
    assert torch.equal(model[0].weight[0, :2], torch.zeros(2))


def test_compiled_model_names_without_prefix():
    model = _mlp()
    compiled = torch.compile(model, backend="eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    masks = {"0.weight": torch.rand(16, 12) < 0.5}
    to_torch_prune(compiled, masks)
    to_torch_prune(compiled, {"_orig_mod.2.weight": torch.ones(8, 16, dtype=torch.bool)})
    assert prune.is_pruned(model)
    back = from_torch_prune(compiled)
    assert list(back) == ["0.weight", "2.weight"]
    assert torch.equal(back["0.weight"], masks["0.weight"])
    assert not prune.is_pruned(model)
