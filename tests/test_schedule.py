"""The search's structure: the units and their dependencies, the controls registry, and the
pure next-round mask computation the runner uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lottery_ext as lx
from lottery_ext.experiments.controls import CONTROLS, REGISTRY
from lottery_ext.experiments.presets import PRESETS, RunConfig
from lottery_ext.experiments.schedule import Unit, needs, units


@pytest.mark.parametrize("controls", [[], ["reinit"], ["reinit", "random_prune"]])
@pytest.mark.parametrize("rewind_iteration", [0, 5])
def test_units_come_after_everything_they_need(controls, rewind_iteration):
    cfg = RunConfig.from_preset(PRESETS["mnist1d-mlp"], trials=2, rounds=3, controls=controls,
                                rewind_iteration=rewind_iteration)  # fmt: skip
    order = units(cfg)
    assert len(order) == len(set(order)) == 2 * (4 + 3 * len(controls))
    position = {u: i for i, u in enumerate(order)}
    for u in order:
        for dep in needs(u):
            assert position[dep] < position[u], (u, dep)
    assert needs(Unit(1, "ticket", 0)) == []
    assert needs(Unit(1, "reinit", 2)) == [Unit(1, "ticket", 2)]


def test_controls_registry():
    assert CONTROLS == ("ticket", "reinit", "random_prune")
    assert REGISTRY["ticket"].late_rewind and REGISTRY["random_prune"].late_rewind
    assert not REGISTRY["reinit"].late_rewind


def test_compute_masks_from_given_masks_is_pure():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    pruner = lx.MagnitudePruner(model, rate=0.5)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    level1 = pruner.compute_masks()
    own = {n: m.clone() for n, m in pruner.masks.items()}
    level2 = pruner.compute_masks(level1)  # from a ticket's masks, the pruner untouched
    assert pruner.rounds == 0
    assert all(torch.equal(own[n], m) for n, m in pruner.masks.items())
    assert all(torch.equal(weights[n], p.detach()) for n, p in model.named_parameters())
    for n in level1:
        assert not (level2[n] & ~level1[n]).any()
        assert int(level2[n].sum()) == int(level1[n].sum()) - round(
            pruner.rates[n] * int(level1[n].sum())
        )
    pruner.prune()
    assert all(torch.equal(level2[n], m) for n, m in pruner.compute_masks().items())
    with pytest.raises(ValueError, match="mask names differ"):
        pruner.compute_masks({"0.weight": level1["0.weight"]})
