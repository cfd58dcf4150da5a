"""MagnitudePruner, snapshot/rewind, reinitialize and the rewind op.

Oracles used here:
- exact counts computed independently in the test (``n -= round(rate * n)`` per round, Python
  ``round``), and the remaining fractions of LeNet-300-100 in Frankle & Carbin (2019);
- the definition of magnitude pruning checked on the masks themselves: every pruned |w| is
  <= every kept |w| among the round's candidates, ties broken by flat index, and masks only
  ever lose entries;
- bit patterns (``view`` as an integer dtype) for the rewind of survivors;
- a freshly constructed optimizer trained from the rewound weights, for optimizer resets;
- the pure-PyTorch reference (``_ops.reference_backend()``) for the fused rewind kernel.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import lottery_ext
from lottery_ext import (
    MagnitudePruner,
    MaskedAdam,
    MaskedAdamW,
    MaskedSGD,
    Snapshot,
    _ops,
    reinitialize,
    rewind,
    snapshot,
)

INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
OPCHECK_TESTS = (
    "test_aot_dispatch_static",
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)

# -------------------------------------------------------------------------------------------
# models and helpers

# rewind()/reinitialize() given masks but no masked optimizer warn on purpose (tested in
# test_correctness.py); here they are called that way deliberately, many times
pytestmark = pytest.mark.filterwarnings("ignore:.*nothing keeps the pruned weights:UserWarning")


def lenet():
    """LeNet-300-100 as in the paper: 784-300-100-10."""
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


class MLP(nn.Module):
    def __init__(self, sizes=(12, 20, 16, 5)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.out = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Conv2Net(nn.Module):
    """A small Conv-2-like network (input 1x12x12)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.out(torch.relu(self.fc2(x)))


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn1(self.fc(x.flatten(1))))
        return self.out(x)


def compounded(n: int, rate: float, rounds: int) -> int:
    for _ in range(rounds):
        n -= round(rate * n)
    return n


def weights_of(pruner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pruner.targets.items()}


def with_ties(model, values=(-1.0, 0.5, 1.0, -0.5, 2.0, 0.25), seed=0):
    """Set every parameter to a handful of distinct values (many ties per magnitude)."""
    vals = torch.tensor(values, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            idx = torch.randint(0, len(vals), p.shape, generator=g)
            p.copy_(vals[idx].to(p.dtype))
    return model


def check_smallest(weights: list[torch.Tensor], old: list, new: list) -> int:
    """The entries pruned this round (old & ~new, over the list as one pool) are the smallest
    magnitudes among the candidates (old), ties at the threshold broken by flat index, lowest
    first. Returns how many were pruned."""
    w = torch.cat([t.reshape(-1).double().abs() for t in weights])
    o = torch.cat([m.reshape(-1) for m in old])
    n = torch.cat([m.reshape(-1) for m in new])
    assert not (n & ~o).any(), "a pruned weight was revived"
    pruned = o & ~n
    if not pruned.any():
        return 0
    t = w[pruned].max()
    if n.any():
        assert w[n].min() >= t, "a kept weight is smaller than a pruned one"
    tied = torch.nonzero(o & (w == t)).flatten()
    flags = pruned[tied].to(torch.int64)
    # pruned ties form a prefix of the tied candidates in flat order
    assert torch.equal(flags, flags.sort(descending=True).values), "ties not broken by index"
    return int(pruned.sum())


def assert_masked(pruner):
    for name, p in pruner.targets.items():
        m = pruner.masks[name]
        assert torch.count_nonzero(p.detach()[~m]) == 0, f"{name}: pruned weights not zero"


def train(model, opt, steps, seed=1, in_shape=(12,), out_dim=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn((16, *in_shape), generator=g).to(dtype)
        y = torch.randn(16, out_dim, generator=g).to(dtype)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
    return loss.item()


def perturb(model, seed=5, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


# -------------------------------------------------------------------------------------------
# 1. LeNet-300-100: round-compounded counts and the paper's fractions

PAPER = {3: 51.3, 7: 21.1, 9: 13.5, 12: 7.0, 15: 3.6, 18: 1.9}


def test_lenet_counts_compound_and_match_the_paper():
    model = lenet()
    pruner = MagnitudePruner(model, 0.2)
    assert pruner.output_layer == "4"
    assert pruner.rates == {"0.weight": 0.2, "2.weight": 0.2, "4.weight": 0.1}
    sizes = {"0.weight": 784 * 300, "2.weight": 300 * 100, "4.weight": 100 * 10}
    biases = [model[i].bias.detach().clone() for i in (0, 2, 4)]
    seen = {}
    for k in range(1, 19):
        before = weights_of(pruner)
        old = pruner.masks
        masks = pruner.prune()
        assert pruner.rounds == k
        for name, n in sizes.items():
            expected = compounded(n, pruner.rates[name], k)
            assert int(masks[name].sum()) == expected, (k, name)
            check_smallest([before[name]], [old[name]], [masks[name]])
        fraction = sum(int(m.sum()) for m in masks.values()) / sum(sizes.values())
        assert pruner.density()["pruned_tensors"] == pytest.approx(fraction, abs=1e-12)
        seen[k] = round(100 * fraction, 1)
        assert_masked(pruner)
    assert {k: seen[k] for k in PAPER} == PAPER
    for i, b in zip((0, 2, 4), biases):
        assert torch.equal(model[i].bias, b), "biases are kept by default"


# -------------------------------------------------------------------------------------------
# 2. exact counts, ties, smallest magnitudes, no revival


@pytest.mark.parametrize("dtype", list(INT_VIEW), ids=lambda d: str(d).replace("torch.", ""))
def test_layer_scope_exact_counts_with_heavy_ties(dtype):
    model = with_ties(MLP((30, 40, 24, 7)).to(dtype))
    pruner = MagnitudePruner(model, 0.37)
    assert pruner.rates == {"fc1.weight": 0.37, "fc2.weight": 0.37, "out.weight": 0.185}
    for k in range(1, 6):
        before, old = weights_of(pruner), pruner.masks
        masks = pruner.prune()
        for name, w in before.items():
            removed = check_smallest([w], [old[name]], [masks[name]])
            remaining = int(old[name].sum())
            assert removed == round(pruner.rates[name] * remaining), (k, name)
            assert int(masks[name].sum()) == compounded(w.numel(), pruner.rates[name], k)
        assert_masked(pruner)


@pytest.mark.parametrize("output_in_global", [False, True], ids=["output-apart", "output-in"])
def test_global_scope_exact_counts_with_heavy_ties(output_in_global):
    model = with_ties(MLP((30, 40, 24, 7)))
    pruner = MagnitudePruner(model, 0.37, scope="global", output_in_global=output_in_global)
    pool = ["fc1.weight", "fc2.weight"] + (["out.weight"] if output_in_global else [])
    for _ in range(5):
        before, old = weights_of(pruner), pruner.masks
        masks = pruner.prune()
        pool_remaining = sum(int(old[n].sum()) for n in pool)
        removed = check_smallest(
            [before[n] for n in pool], [old[n] for n in pool], [masks[n] for n in pool]
        )
        assert removed == round(0.37 * pool_remaining)
        if not output_in_global:
            n = "out.weight"
            removed = check_smallest([before[n]], [old[n]], [masks[n]])
            assert removed == round(0.37 / 2 * int(old[n].sum()))
        assert_masked(pruner)


def test_masks_never_revive_and_only_survivors_are_candidates():
    model = MLP((30, 40, 24, 7))
    for scope in ("layer", "global"):
        m = copy.deepcopy(model)
        pruner = MagnitudePruner(m, 0.3, scope=scope)
        assert pruner.rates == {"fc1.weight": 0.3, "fc2.weight": 0.3, "out.weight": 0.15}
        pruner.prune()
        g = torch.Generator().manual_seed(3)
        for _ in range(4):
            old = pruner.masks
            # "training": every weight moves, pruned ones become nonzero; half of the pruned
            # entries get tiny magnitudes (they would be pruned again if they were candidates),
            # half get huge ones (they would be kept if they were candidates)
            with torch.no_grad():
                for name, p in pruner.targets.items():
                    p.add_(torch.randn(p.shape, generator=g))
                    tiny = torch.rand(p.shape, generator=g) < 0.5
                    p.copy_(torch.where(~old[name] & tiny, torch.full_like(p, 1e-9), p))
                    p.copy_(torch.where(~old[name] & ~tiny, torch.full_like(p, 1e3), p))
            before = weights_of(pruner)
            masks = pruner.prune()
            if scope == "layer":
                for name in masks:
                    removed = check_smallest([before[name]], [old[name]], [masks[name]])
                    assert removed == round(pruner.rates[name] * int(old[name].sum()))
            else:
                pool = ["fc1.weight", "fc2.weight"]
                removed = check_smallest(
                    [before[n] for n in pool], [old[n] for n in pool], [masks[n] for n in pool]
                )
                assert removed == round(0.3 * sum(int(old[n].sum()) for n in pool))
            for name in masks:
                assert not (masks[name] & ~old[name]).any()
            assert_masked(pruner)  # the revived-looking weights are zeroed again


def test_output_layer_rate_default_and_explicit():
    model = MLP((30, 40, 24, 10))
    assert MagnitudePruner(model, 0.2).rates["out.weight"] == 0.1
    pruner = MagnitudePruner(copy.deepcopy(model), 0.2, output_rate=0.5)
    assert pruner.rates == {"fc1.weight": 0.2, "fc2.weight": 0.2, "out.weight": 0.5}
    for k in range(1, 4):
        masks = pruner.prune()
        assert int(masks["out.weight"].sum()) == compounded(240, 0.5, k)
        assert int(masks["fc1.weight"].sum()) == compounded(1200, 0.2, k)
    # output_rate=0 keeps the output layer whole
    pruner = MagnitudePruner(copy.deepcopy(model), 0.2, output_rate=0.0)
    pruner.prune()
    assert bool(pruner.masks["out.weight"].all())


def test_layer_rates_conv2_recipe():
    model = Conv2Net()
    pruner = MagnitudePruner(model, 0.2, layer_rates={"conv": 0.1, "linear": 0.2})
    assert pruner.output_layer == "out"
    assert pruner.rates == {
        "conv1.weight": 0.1,
        "conv2.weight": 0.1,
        "fc1.weight": 0.2,
        "fc2.weight": 0.2,
        "out.weight": 0.1,  # a type key does not override the output rate
    }
    for k in range(1, 5):
        before, old = weights_of(pruner), pruner.masks
        masks = pruner.prune()
        for name, p in pruner.targets.items():
            assert int(masks[name].sum()) == compounded(p.numel(), pruner.rates[name], k)
            check_smallest([before[name]], [old[name]], [masks[name]])
    assert_masked(pruner)
    # the type key applies to the output layer neither with an explicit output_rate
    p2 = MagnitudePruner(Conv2Net(), 0.2, output_rate=0.05, layer_rates={"linear": 0.3})
    assert p2.rates["out.weight"] == 0.05 and p2.rates["fc1.weight"] == 0.3
    assert p2.rates["conv1.weight"] == 0.2


def test_layer_rates_by_module_and_param_name():
    model = MLP((30, 40, 24, 10))
    pruner = MagnitudePruner(
        model,
        0.2,
        prune_biases=True,
        layer_rates={"linear": 0.3, "fc1": 0.5, "fc1.weight": 0.6, "out": 0.4},
    )
    assert pruner.rates == {
        "fc1.weight": 0.6,  # parameter name beats module name beats type
        "fc1.bias": 0.5,
        "fc2.weight": 0.3,
        "fc2.bias": 0.3,
        "out.weight": 0.4,  # a module key does override the output rate
        "out.bias": 0.4,
    }
    masks = pruner.prune()
    for name, p in pruner.targets.items():
        assert int(masks[name].sum()) == p.numel() - round(pruner.rates[name] * p.numel())


def test_prune_biases():
    model = with_ties(MLP((30, 40, 24, 10)))
    kept = MagnitudePruner(copy.deepcopy(model), 0.2)
    assert set(kept.targets) == {"fc1.weight", "fc2.weight", "out.weight"}
    pruner = MagnitudePruner(model, 0.2, prune_biases=True)
    assert set(pruner.targets) == {
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out.weight", "out.bias",
    }  # fmt: skip
    assert pruner.rates["out.bias"] == 0.1 and pruner.rates["fc1.bias"] == 0.2
    for k in range(1, 4):
        before, old = weights_of(pruner), pruner.masks
        masks = pruner.prune()
        for name in ("fc1.bias", "fc2.bias", "out.bias"):
            n = pruner.targets[name].numel()
            assert int(masks[name].sum()) == compounded(n, pruner.rates[name], k)
            check_smallest([before[name]], [old[name]], [masks[name]])
    assert_masked(pruner)
    assert (model.fc1.bias == 0).sum() >= 40 - compounded(40, 0.2, 3)


def test_exclude_globs_and_never_prune_norms_or_embeddings():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.norm = nn.LayerNorm(6)
            self.block_a = nn.Linear(6, 8)
            self.block_b = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 4)

    model = Net()
    pruner = MagnitudePruner(model, 0.5, prune_biases=True)
    assert set(pruner.targets) == {
        "block_a.weight", "block_a.bias", "block_b.weight", "block_b.bias", "head.weight",
        "head.bias",
    }  # fmt: skip
    pruner = MagnitudePruner(model, 0.5, prune_biases=True, exclude=["block_*", "head.bias"])
    assert set(pruner.targets) == {"head.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner.prune()
    for name, p in model.named_parameters():
        if name != "head.weight":
            assert torch.equal(p, before[name]), name
    assert int(pruner.masks["head.weight"].sum()) == 32 - round(0.25 * 32)
    # exclude by module name
    pruner = MagnitudePruner(model, 0.5, exclude=["block_b"])
    assert set(pruner.targets) == {"block_a.weight", "head.weight"}


def test_output_layer_by_name():
    model = MLP((30, 40, 24, 10))
    pruner = MagnitudePruner(model, 0.2, output_layer="fc1")
    assert pruner.output_layer == "fc1"
    assert pruner.rates == {"fc1.weight": 0.1, "fc2.weight": 0.2, "out.weight": 0.2}
    masks = pruner.prune()
    assert int(masks["fc1.weight"].sum()) == 1200 - 120
    assert int(masks["out.weight"].sum()) == 240 - 48
    # global scope keeps the named output layer out of the pool
    g = MagnitudePruner(copy.deepcopy(model), 0.2, output_layer="fc1", scope="global")
    masks = g.prune()
    assert int(masks["fc1.weight"].sum()) == 1200 - 120
    pool = int(masks["fc2.weight"].sum()) + int(masks["out.weight"].sum())
    assert pool == 960 + 240 - round(0.2 * 1200)


def test_global_and_layer_scope_same_total_different_distribution():
    model = MLP((32, 40, 24, 8))
    with torch.no_grad():
        model.fc2.weight.mul_(10)  # a layer of larger weights: global prunes it less
    rate = 0.25  # rate * size is an integer for every layer: no rounding difference
    layer = MagnitudePruner(copy.deepcopy(model), rate)
    glob = MagnitudePruner(copy.deepcopy(model), rate, scope="global")
    ml, mg = layer.prune(), glob.prune()
    kept = {n: (int(ml[n].sum()), int(mg[n].sum())) for n in ml}
    assert sum(a for a, _ in kept.values()) == sum(b for _, b in kept.values())
    assert kept["fc1.weight"][0] != kept["fc1.weight"][1]
    assert kept["fc2.weight"][1] > kept["fc2.weight"][0]
    assert kept["out.weight"][0] == kept["out.weight"][1] == 192 - round(0.125 * 192)
    # further rounds: the pool loses exactly round(rate * pool_remaining)
    for _ in range(3):
        old = glob.masks
        new = glob.prune()
        pool = ("fc1.weight", "fc2.weight")
        before = sum(int(old[n].sum()) for n in pool)
        after = sum(int(new[n].sum()) for n in pool)
        assert before - after == round(rate * before)


def test_magnitude_prune_is_deterministic():
    torch.manual_seed(7)
    a = MLP((30, 40, 24, 10))
    torch.manual_seed(7)
    b = MLP((30, 40, 24, 10))
    for scope in ("layer", "global"):
        pa = MagnitudePruner(copy.deepcopy(a), 0.3, scope=scope)
        pb = MagnitudePruner(copy.deepcopy(b), 0.3, scope=scope)
        for _ in range(3):
            ma, mb = pa.prune(), pb.prune()
            assert ma.keys() == mb.keys()
            for n in ma:
                assert torch.equal(ma[n], mb[n])


def _magnitude_counts(pruner):
    """What prune() would leave in each tensor, from the pruner's current state."""
    probe = MagnitudePruner(
        copy.deepcopy(pruner.model), pruner.rate, scope=pruner.scope,
        output_rate=pruner.output_rate,
    )  # fmt: skip
    probe.load_state_dict(pruner.state_dict())
    return {n: int(m.sum()) for n, m in probe.prune().items()}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_random_prune_seeded_counts_match_magnitude(scope):
    model = MLP((30, 40, 24, 10))
    with torch.no_grad():
        model.fc2.weight.mul_(5)  # makes global counts differ from layer counts
    mag = MagnitudePruner(copy.deepcopy(model), 0.3, scope=scope)
    r1 = MagnitudePruner(copy.deepcopy(model), 0.3, scope=scope)
    r2 = MagnitudePruner(copy.deepcopy(model), 0.3, scope=scope)
    r3 = MagnitudePruner(copy.deepcopy(model), 0.3, scope=scope)
    for k in range(3):
        old = r1.masks
        expected1, expected3 = _magnitude_counts(r1), _magnitude_counts(r3)
        mm = mag.prune()
        m1, m2, m3 = (
            r1.prune_randomly(seed=k),
            r2.prune_randomly(seed=k),
            r3.prune_randomly(seed=k + 9),
        )
        assert r1.rounds == k + 1
        for n in mm:
            assert torch.equal(m1[n], m2[n]), "same seed, same masks"
            assert int(m1[n].sum()) == expected1[n], n
            assert int(m3[n].sum()) == expected3[n], n
            assert not (m1[n] & ~old[n]).any()
            if scope == "layer" or k == 0:  # same state: same counts as magnitude pruning
                assert int(m1[n].sum()) == int(mm[n].sum()), n
        assert any(not torch.equal(m1[n], m3[n]) for n in mm), "different seed, same masks"
        assert any(not torch.equal(m1[n], mm[n]) for n in mm), "random masks are magnitude"
        assert_masked(r1)
    if scope == "global":
        assert sum(expected1.values()) == sum(int(m.sum()) for m in m1.values())


def test_random_prune_channels_last_conv():
    model = Conv2Net().to(memory_format=torch.channels_last)
    assert not model.conv2.weight.is_contiguous()
    mag = MagnitudePruner(copy.deepcopy(model), 0.2)
    pruner = MagnitudePruner(model, 0.2)
    mm = mag.prune()  # magnitude pruning works on channels_last
    masks = pruner.prune_randomly(seed=0)
    for n in mm:
        assert int(masks[n].sum()) == int(mm[n].sum())


def test_prune_channels_last_conv_matches_contiguous():
    model = with_ties(Conv2Net())
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    pc, pl = MagnitudePruner(model, 0.3), MagnitudePruner(cl, 0.3)
    for _ in range(3):
        mc, ml = pc.prune(), pl.prune()
        for n in mc:
            assert int(mc[n].sum()) == int(ml[n].sum())
            if n.startswith("fc") or n.startswith("out"):
                assert torch.equal(mc[n], ml[n])  # same layout: same tie-break
        assert_masked(pl)


# -------------------------------------------------------------------------------------------
# 3. attach, state_dict


@pytest.mark.parametrize("cls", [MaskedSGD, MaskedAdam, MaskedAdamW], ids=lambda c: c.__name__)
def test_attach_keeps_optimizer_masks_in_sync(cls):
    model = MLP()
    kw = dict(lr=0.05, momentum=0.9) if cls is MaskedSGD else dict(lr=1e-2)
    opt = cls(model.parameters(), **kw)
    pruner = MagnitudePruner(model, 0.3)
    train(model, opt, 2)
    pruner.attach(opt)
    for name, p in pruner.targets.items():  # synced immediately: all kept
        assert torch.equal(opt.get_mask(p), pruner.masks[name])
        assert bool(opt.get_mask(p).all())
    assert opt.get_mask(model.fc1.bias) is None
    for _ in range(3):
        pruner.prune()
        for name, p in pruner.targets.items():
            assert torch.equal(opt.get_mask(p), pruner.masks[name])
            for buf in opt._buffers_of(p):  # state zeroed at the newly pruned entries
                assert torch.count_nonzero(buf[~pruner.masks[name]]) == 0
        train(model, opt, 3, seed=pruner.rounds)
        assert_masked(pruner)
        for name, p in pruner.targets.items():
            bufs = opt._buffers_of(p)
            assert bufs
            for buf in bufs:
                assert torch.count_nonzero(buf[~pruner.masks[name]]) == 0
    # attaching after pruning syncs the current masks at once
    opt2 = cls(model.parameters(), **kw)
    pruner.attach(opt2)
    for name, p in pruner.targets.items():
        assert torch.equal(opt2.get_mask(p), pruner.masks[name])


def test_pruner_state_dict_roundtrip():
    model = MLP((30, 40, 24, 10))
    original = copy.deepcopy(model)
    pruner = MagnitudePruner(model, 0.3, prune_biases=True)
    pruner.prune()
    pruner.prune()
    buf = io.BytesIO()
    torch.save(pruner.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = MagnitudePruner(original, 0.3, prune_biases=True)
    opt = MaskedAdam(original.parameters(), lr=1e-2)
    fresh.attach(opt)
    fresh.load_state_dict(sd)
    assert fresh.rounds == 2
    for name, m in pruner.masks.items():
        assert torch.equal(fresh.masks[name], m)
        assert torch.equal(opt.get_mask(fresh.targets[name]), m)
    for (name, p), q in zip(model.named_parameters(), original.parameters()):
        assert torch.equal(p, q), name  # pruned zeroed, survivors untouched
    # the state dict is a copy, not a view of the pruner's masks
    sd2 = pruner.state_dict()
    sd2["masks"]["fc1.weight"].fill_(False)
    assert bool(pruner.masks["fc1.weight"].any())
    # and both continue identically
    ma, mb = pruner.prune(), fresh.prune()
    for name in ma:
        assert torch.equal(ma[name], mb[name])


def test_pruner_load_state_dict_contiguous_masks_into_channels_last():
    model = Conv2Net().to(memory_format=torch.channels_last)
    pruner = MagnitudePruner(model, 0.3)
    pruner.prune()
    sd = {"masks": {n: m.contiguous() for n, m in pruner.masks.items()}, "rounds": 1}
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    fresh = MagnitudePruner(target, 0.3)
    fresh.load_state_dict(sd)
    for name, m in pruner.masks.items():
        assert torch.equal(fresh.masks[name], m)
        assert torch.count_nonzero(fresh.targets[name].detach()[~m]) == 0


# -------------------------------------------------------------------------------------------
# 4. density, layer_stats, report


def test_density_layer_stats_and_report():
    model = lenet()
    pruner = MagnitudePruner(model, 0.2)
    assert pruner.density() == {"pruned_tensors": 1.0, "all_parameters": 1.0}
    pruner.prune()
    kept = {"0.weight": 188160, "2.weight": 24000, "4.weight": 900}
    total = {"0.weight": 235200, "2.weight": 30000, "4.weight": 1000}
    all_params = 266200 + 300 + 100 + 10
    pruned = sum(total.values()) - sum(kept.values())
    d = pruner.density()
    assert d["pruned_tensors"] == pytest.approx(213060 / 266200, abs=1e-12)
    assert d["all_parameters"] == pytest.approx((all_params - pruned) / all_params, abs=1e-12)
    stats = pruner.layer_stats()
    assert [r["name"] for r in stats] == ["0.weight", "2.weight", "4.weight"]
    for r in stats:
        assert r["remaining"] == kept[r["name"]]
        assert r["total"] == total[r["name"]]
        assert r["fraction"] == pytest.approx(kept[r["name"]] / total[r["name"]])
    assert [r["shape"] for r in stats] == [(300, 784), (100, 300), (10, 100)]
    assert [r["rate"] for r in stats] == [0.2, 0.2, 0.1]
    report = pruner.report()
    lines = report.splitlines()
    assert len(lines) == 1 + 3 + 2
    assert lines[0].split() == ["name", "shape", "remaining", "fraction"]
    assert "188,160" in lines[1] and "80.00%" in lines[1] and "(300, 784)" in lines[1]
    assert "24,000" in lines[2] and "80.00%" in lines[2]
    assert "900" in lines[3] and "90.00%" in lines[3]
    assert lines[4].startswith("pruned tensors") and f"{100 * 213060 / 266200:.2f}%" in lines[4]
    assert "80.04%" in lines[4]
    expected_all = f"{100 * (all_params - pruned) / all_params:.2f}%"
    assert lines[5].startswith("all parameters") and expected_all in lines[5]
    for _ in range(6):
        pruner.prune()
    assert "21.1" in f"{100 * pruner.density()['pruned_tensors']:.1f}"
    assert f"{100 * pruner.density()['pruned_tensors']:.2f}%" in pruner.report()


# -------------------------------------------------------------------------------------------
# 5. snapshot and rewind


@pytest.mark.parametrize("dtype", list(INT_VIEW), ids=lambda d: str(d).replace("torch.", ""))
def test_rewind_survivors_bitwise_pruned_zero(dtype):
    model = MLP((30, 40, 24, 10)).to(dtype)
    special = torch.tensor([-0.0, float("nan"), 1e-7, -1e-40, float("inf"), -3.0])
    with torch.no_grad():
        model.fc1.weight.view(-1)[:6] = special.to(dtype)
    snap = snapshot(model)
    pruner = MagnitudePruner(copy.deepcopy(model), 0.4)
    with torch.no_grad():
        pruner.targets["fc1.weight"].view(-1)[:6] = 1.0  # keep the specials out of the ranking
    pruner.prune()
    pruner.prune()
    masks = pruner.masks
    masks["fc1.weight"].view(-1)[:6] = True
    perturb(model)
    rewind(model, snap, masks)
    iv = INT_VIEW[dtype]
    for name, p in model.named_parameters():
        bits, ref = p.detach().view(iv), snap[name].view(iv)
        m = masks.get(name)
        if m is None:
            assert torch.equal(bits, ref), name
        else:
            assert torch.equal(bits[m], ref[m]), name
            assert torch.equal(bits[~m], torch.zeros_like(bits[~m])), name  # +0, not -0


def test_rewind_restores_batchnorm_buffers():
    model = BNNet()
    snap = snapshot(model)
    assert "bn.running_mean" in snap and "bn1.num_batches_tracked" in snap
    assert snap.param_names == frozenset(n for n, _ in model.named_parameters())
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = MagnitudePruner(model, 0.5)
    pruner.attach(opt)
    train(model, opt, 4, in_shape=(2, 6, 6), out_dim=3)
    assert int(model.bn.num_batches_tracked) == 4
    assert not torch.equal(model.bn.running_var, snap["bn.running_var"])
    pruner.prune()
    rewind(model, snap, pruner.masks, optimizer=opt)
    for name, b in model.named_buffers():
        assert torch.equal(b, snap[name]), name
    assert int(model.bn1.num_batches_tracked) == 0
    for name, p in model.named_parameters():
        m = pruner.masks.get(name)
        expected = snap[name] if m is None else torch.where(m, snap[name], 0.0)
        assert torch.equal(p.detach(), expected), name


def test_late_rewinding_to_iteration_k():
    model = MLP()
    opt = MaskedAdam(model.parameters(), lr=1e-2)
    pruner = MagnitudePruner(model, 0.3)
    pruner.attach(opt)
    theta0 = snapshot(model)
    train(model, opt, 3)
    theta_k = snapshot(model, iteration=3)
    assert theta_k.iteration == 3 and theta0.iteration == 0
    train(model, opt, 5, seed=2)
    pruner.prune()
    rewind(model, theta_k, optimizer=opt)  # masks from the optimizer
    for name, p in model.named_parameters():
        m = pruner.masks.get(name)
        expected = theta_k[name] if m is None else torch.where(m, theta_k[name], 0.0)
        assert torch.equal(p.detach(), expected), name
    assert not torch.equal(model.fc2.bias, theta0["fc2.bias"])


OPT_CASES = {
    "sgd-momentum-dampening": (
        MaskedSGD,
        dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=1e-3),
    ),
    "sgd-nesterov": (MaskedSGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (MaskedAdam, dict(lr=1e-2, weight_decay=1e-3)),
    "adam-amsgrad": (MaskedAdam, dict(lr=1e-2, amsgrad=True)),
    "adamw": (MaskedAdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
}


@pytest.mark.parametrize("case", list(OPT_CASES))
def test_rewind_resets_optimizer_state_in_place(case):
    cls, kw = OPT_CASES[case]
    model = MLP()
    snap = snapshot(model)
    opt = cls(model.parameters(), **kw)
    train(model, opt, 4)
    pruner = MagnitudePruner(model, 0.3)
    masks = pruner.prune()  # not attached: rewind stores the masks in the optimizer
    before = {
        (id(p), k): (v, v.data_ptr())
        for p, st in opt.state.items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor)
    }
    assert any(float(v.abs().sum()) > 0 for v, _ in before.values())
    rewind(model, snap, masks, optimizer=opt)
    for p, st in opt.state.items():
        for k, v in st.items():
            old, ptr = before[(id(p), k)]
            assert v is old and v.data_ptr() == ptr, (k, "re-allocated")
            assert torch.count_nonzero(v) == 0, k
    if cls is not MaskedSGD:
        assert all(float(st["step"]) == 0 for st in opt.state.values())
    for name, p in pruner.targets.items():
        assert torch.equal(opt.get_mask(p), masks[name])


@pytest.mark.parametrize("case", list(OPT_CASES))
def test_training_after_rewind_equals_fresh_optimizer(case):
    cls, kw = OPT_CASES[case]
    model = MLP()
    snap = snapshot(model)
    opt = cls(model.named_parameters(), **kw)
    pruner = MagnitudePruner(model, 0.3)
    pruner.attach(opt)
    train(model, opt, 5)
    pruner.prune()
    rewind(model, snap, pruner.masks, optimizer=opt)
    fresh_model = copy.deepcopy(model)
    fresh_opt = cls(fresh_model.named_parameters(), **kw, masks=pruner.masks)
    for step in range(6):
        train(model, opt, 1, seed=100 + step)
        train(fresh_model, fresh_opt, 1, seed=100 + step)
        for (name, p), q in zip(model.named_parameters(), fresh_model.parameters()):
            assert torch.equal(p, q), (step, name)
            sa, sb = opt.state[p], fresh_opt.state[q]
            assert set(sa) == set(sb)
            for k in sa:
                assert torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])), (step, k)
    assert_masked(pruner)


def test_rewind_then_checkpoint_then_step_equals_fresh_sgd():
    kw = dict(lr=0.05, momentum=0.9, dampening=0.5)
    model = MLP()
    snap = snapshot(model)
    opt = MaskedSGD(model.parameters(), **kw)
    train(model, opt, 3)
    pruner = MagnitudePruner(model, 0.3)
    pruner.attach(opt)
    pruner.prune()
    rewind(model, snap, optimizer=opt)
    sd = copy.deepcopy(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed = MaskedSGD(resumed_model.parameters(), **kw)
    resumed.load_state_dict(sd)
    fresh_model = copy.deepcopy(model)
    fresh = MaskedSGD(
        fresh_model.parameters(),
        **kw,
        masks={q: opt.get_mask(p) for p, q in zip(model.parameters(), fresh_model.parameters())
               if opt.get_mask(p) is not None},
    )  # fmt: skip
    train(resumed_model, resumed, 2, seed=9)
    train(fresh_model, fresh, 2, seed=9)
    for p, q in zip(resumed_model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


def test_rewind_with_mixed_amsgrad_groups():
    # one fused call per dtype with a different number of state buffers per tensor
    model = MLP()
    snap = snapshot(model)
    opt = MaskedAdam(
        [
            {"params": model.fc1.parameters(), "amsgrad": True},
            {"params": list(model.fc2.parameters()) + list(model.out.parameters())},
        ],
        lr=1e-2,
    )
    train(model, opt, 3)
    pruner = MagnitudePruner(model, 0.3)
    pruner.attach(opt)
    pruner.prune()
    rewind(model, snap, optimizer=opt)
    assert "max_exp_avg_sq" in opt.state[model.fc1.weight]
    assert "max_exp_avg_sq" not in opt.state[model.fc2.weight]
    for st in opt.state.values():
        for k, v in st.items():
            assert torch.count_nonzero(v) == 0, k
    for name, p in model.named_parameters():
        m = pruner.masks.get(name)
        expected = snap[name] if m is None else torch.where(m, snap[name], 0.0)
        assert torch.equal(p.detach(), expected), name


def test_rewind_masks_keyed_by_parameter_and_default_to_optimizer():
    model = MLP()
    snap = snapshot(model)
    pruner = MagnitudePruner(model, 0.4)
    opt = MaskedAdam(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    train(model, opt, 2)
    pruner.prune()
    by_param = {pruner.targets[n]: m for n, m in pruner.masks.items()}
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), model
    rewind(a, snap, pruner.masks)
    rewind(b, snap, {getattr(b, n.split(".")[0]).weight: m for n, m in pruner.masks.items()})
    rewind(c, snap, optimizer=opt)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and torch.equal(pa, pc)
    for p, m in by_param.items():
        assert torch.count_nonzero(p.detach()[~m]) == 0
    for name, m in pruner.masks.items():
        assert torch.equal(a.get_parameter(name).detach()[m], snap[name][m])
    # without masks nor optimizer: a plain restore
    d = copy.deepcopy(model)
    rewind(d, snap)
    for name, p in d.named_parameters():
        assert torch.equal(p, snap[name])


def test_rewind_plain_torch_optimizer_clears_state():
    model = MLP()
    snap = snapshot(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 3)
    assert len(opt.state) > 0
    pruner = MagnitudePruner(model, 0.3)
    pruner.prune()
    rewind(model, snap, pruner.masks, optimizer=opt)
    assert len(opt.state) == 0
    assert_masked(pruner)


def test_rewind_refuses_modified_snapshot():
    model = MLP()
    snap = snapshot(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model)
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    rewind(copy.deepcopy(model), snap)  # untouched: fine
    snap["fc1.weight"].add_(1.0)
    with pytest.raises(ValueError, match="modified"):
        rewind(model, snap)
    for n, p in model.named_parameters():
        assert torch.equal(p, perturbed[n]), "refused rewind touched the model"
    # through the state dict's tensors too
    snap2 = snapshot(model)
    snap2.state_dict()["tensors"]["out.bias"].zero_()
    with pytest.raises(ValueError, match="modified"):
        rewind(model, snap2)
    # the snapshot is a copy: changing the model does not change it
    snap3 = snapshot(model)
    perturb(model, seed=8)
    for n in perturbed:
        assert torch.equal(snap3[n], perturbed[n])
        assert not torch.equal(snap3[n], before[n])


def test_rewind_refuses_snapshot_of_another_model():
    model = MLP()
    perturb(model)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        rewind(model, snapshot(lenet()))  # other names
    with pytest.raises(ValueError):
        rewind(model, snapshot(MLP((12, 20, 16, 6))))  # same names, other output shape
    with pytest.raises((TypeError, ValueError)):
        rewind(model, snapshot(MLP().double()))  # other dtype
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), "a refused rewind modified the model"


def test_rewind_refuses_snapshot_with_other_buffer_shape():
    class WithBuffer(MLP):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("scale", torch.arange(float(n)))

    model = WithBuffer(3)
    with pytest.raises(ValueError):
        rewind(model, snapshot(WithBuffer(1)))


def test_rewind_non_contiguous_masks_and_params():
    model = Conv2Net()
    snap = snapshot(model)
    pruner = MagnitudePruner(copy.deepcopy(model), 0.5)
    pruner.prune()
    ref = copy.deepcopy(model)
    rewind(ref, snap, pruner.masks)
    # masks in other memory layouts (transposed, channels_last)
    odd = {}
    for name, m in pruner.masks.items():
        if m.dim() == 2:
            odd[name] = m.t().contiguous().t()
        else:
            odd[name] = m.contiguous(memory_format=torch.channels_last)
        assert name == "conv1.weight" or not odd[name].is_contiguous()  # conv1: 1 channel
    model_a = copy.deepcopy(model)
    perturb(model_a)
    rewind(model_a, snap, odd)
    for p, q in zip(model_a.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    # channels_last parameters with contiguous masks
    model_b = copy.deepcopy(model).to(memory_format=torch.channels_last)
    snap_b = snapshot(model_b)
    perturb(model_b)
    opt = MaskedSGD(model_b.parameters(), lr=0.1, momentum=0.9)
    train(model_b, opt, 2, in_shape=(1, 12, 12), out_dim=10)
    rewind(model_b, snap_b, pruner.masks, optimizer=opt)
    for p, q in zip(model_b.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert not model_b.conv2.weight.is_contiguous()
    for p in model_b.parameters():
        assert torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0


def test_snapshot_state_dict_survives_torch_save_weights_only():
    model = BNNet()
    opt = MaskedSGD(model.parameters(), lr=0.1)
    train(model, opt, 2, in_shape=(2, 6, 6), out_dim=3)
    snap = snapshot(model, iteration=2)
    buf = io.BytesIO()
    torch.save(snap.state_dict(), buf)
    buf.seek(0)
    loaded = Snapshot.from_state_dict(torch.load(buf, weights_only=True))
    assert isinstance(loaded, Snapshot)
    assert loaded.iteration == 2
    assert loaded.param_names == snap.param_names
    assert set(loaded) == set(snap) and len(loaded) == len(snap)
    for k in snap:
        assert torch.equal(loaded[k], snap[k])
    pruner = MagnitudePruner(model, 0.3)
    pruner.prune()
    train(model, opt, 2, in_shape=(2, 6, 6), out_dim=3)
    other = copy.deepcopy(model)
    rewind(model, snap, pruner.masks)
    rewind(other, loaded, pruner.masks)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # the loaded snapshot is its own copy: modifying the source dict does not reach it
    sd = snap.state_dict()
    loaded2 = Snapshot.from_state_dict(sd)
    sd["tensors"]["fc.weight"].add_(1)
    rewind(other, loaded2)


def _rewind_args(dtype, with_masks=True, per=2, shapes=((4, 5), (7,), (2, 3, 2), (1,), (0, 3))):
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    snaps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    masks = [
        (torch.rand(s, generator=g) < 0.6) if with_masks and i % 3 != 1 else None
        for i, s in enumerate(shapes)
    ]
    states = [torch.randn(s, generator=g).to(dtype) for s in shapes for _ in range(per)]
    return params, snaps, masks, states


@pytest.mark.parametrize("dtype", list(INT_VIEW), ids=lambda d: str(d).replace("torch.", ""))
def test_rewind_tensors_native_matches_reference_and_custom_op(dtype):
    shapes = ((40, 50), (7,), (6, 3, 5, 5), (1,), (0, 3), (100_003,))
    args = _rewind_args(dtype, shapes=shapes)
    native = [[t.clone() if t is not None else None for t in lst] for lst in args]
    ref = [[t.clone() if t is not None else None for t in lst] for lst in args]
    op = [[t.clone() if t is not None else None for t in lst] for lst in args]
    lottery_ext.ops.rewind_tensors(*native)
    with _ops.reference_backend():
        lottery_ext.ops.rewind_tensors(*ref)
    torch.ops.lottery_ext.rewind_(*op)
    iv = INT_VIEW[dtype]
    for i in (0, 3):  # params, states
        for a, b, c in zip(native[i], ref[i], op[i]):
            assert torch.equal(a.view(iv), b.view(iv)) and torch.equal(a.view(iv), c.view(iv))
    params, snaps, masks, _ = args
    for p, s, m in zip(native[0], snaps, masks):
        expected = s if m is None else torch.where(m, s, torch.zeros((), dtype=dtype))
        assert torch.equal(p.view(iv), expected.view(iv))
    for st in native[3]:
        assert torch.count_nonzero(st) == 0
    for s0, s1 in zip(snaps, native[1]):
        assert torch.equal(s0, s1), "snapshots are read-only"


def test_rewind_tensors_checks():
    params, snaps, masks, states = _rewind_args(torch.float32)
    with pytest.raises(ValueError):
        lottery_ext.ops.rewind_tensors(params, snaps, masks, states[:-1])
    with pytest.raises(ValueError):
        lottery_ext.ops.rewind_tensors(params, snaps[:-1], masks, states)
    bad = list(masks)
    bad[0] = torch.ones(5, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        lottery_ext.ops.rewind_tensors(params, snaps, bad, states)
    bad_snaps = list(snaps)
    bad_snaps[0] = bad_snaps[0].double()
    with pytest.raises(TypeError):
        lottery_ext.ops.rewind_tensors(params, bad_snaps, masks, states)


@pytest.mark.parametrize("with_masks", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("per", [0, 2])
def test_opcheck_rewind(with_masks, per):
    args = _rewind_args(torch.float32, with_masks=with_masks, per=per)
    torch.library.opcheck(torch.ops.lottery_ext.rewind_.default, args, test_utils=OPCHECK_TESTS)


# -------------------------------------------------------------------------------------------
# 6. reinitialize


def test_reinitialize_seeded_masked_and_rng_untouched():
    torch.manual_seed(1)
    a = MLP((30, 40, 24, 10))
    torch.manual_seed(2)
    b = MLP((30, 40, 24, 10))
    original = {n: p.detach().clone() for n, p in a.named_parameters()}
    pruner = MagnitudePruner(a, 0.5)
    pruner.prune()
    masks = pruner.masks
    rng = torch.get_rng_state()
    reinitialize(a, masks, seed=3)
    assert torch.equal(torch.get_rng_state(), rng), "caller RNG changed"
    reinitialize(b, {b.get_parameter(n): m for n, m in masks.items()}, seed=3)
    c = copy.deepcopy(b)
    reinitialize(c, masks, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name
        assert not torch.equal(pa, original[name]), name
    for name, m in masks.items():
        p = a.get_parameter(name).detach()
        assert torch.count_nonzero(p[~m]) == 0
        assert torch.count_nonzero(p[m]) == int(m.sum())
    # equal to the modules' own reset_parameters under that seed
    d = MLP((30, 40, 24, 10))
    torch.manual_seed(3)
    for mod in d.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    for name, p in d.named_parameters():
        expected = p.detach() if name not in masks else torch.where(masks[name], p.detach(), 0)
        assert torch.equal(a.get_parameter(name), expected), name
    # the stream after the call continues as if it had not been made
    torch.manual_seed(123)
    x0 = torch.randn(5)
    torch.manual_seed(123)
    reinitialize(b, seed=0)
    assert torch.equal(torch.randn(5), x0)


def test_reinitialize_init_fn_and_batchnorm():
    def init_fn(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)

    model = MLP((30, 40, 24, 10))
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    pruner = MagnitudePruner(model, 0.3)
    pruner.prune()
    masks = pruner.masks
    reinitialize(model, masks, seed=5, init_fn=init_fn)
    expected = MLP((30, 40, 24, 10))
    torch.manual_seed(5)
    expected.apply(init_fn)
    for name, p in model.named_parameters():
        if name in biases:
            assert torch.equal(p, biases[name]), "init_fn does not touch biases"
        else:
            assert torch.equal(p.detach(), torch.where(masks[name], expected.get_parameter(name),
                                                       0.0))  # fmt: skip
    # xavier_normal_ std for fc1: sqrt(2 / (30 + 40)); the default init is uniform(+-1/sqrt(30))
    w = model.fc1.weight.detach()[masks["fc1.weight"]]
    assert w.std().item() == pytest.approx(math.sqrt(2 / 70), rel=0.15)
    assert w.abs().max() > 1 / math.sqrt(30)
    # BatchNorm: running stats are reset with the parameters
    bn = BNNet()
    opt = MaskedSGD(bn.parameters(), lr=0.1)
    train(bn, opt, 2, in_shape=(2, 6, 6), out_dim=3)
    reinitialize(bn, seed=1)
    assert int(bn.bn.num_batches_tracked) == 0
    assert torch.equal(bn.bn.running_mean, torch.zeros(4))


# -------------------------------------------------------------------------------------------
# 7. a full IMP round by hand


def test_imp_rounds_by_hand():
    model = MLP((10, 16, 8, 3))
    theta0 = snapshot(model)
    opt = MaskedAdam(model.named_parameters(), lr=1e-2)
    pruner = MagnitudePruner(model, 0.4)
    pruner.attach(opt)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randn(64, 3, generator=g)

    def fit(steps):
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            assert_masked(pruner)
            for name, p in pruner.targets.items():
                for buf in opt._buffers_of(p):
                    assert torch.count_nonzero(buf[~pruner.masks[name]]) == 0
        return losses

    losses = fit(20)
    assert losses[-1] < losses[0]
    for k in range(1, 4):
        trained = {n: p.detach().clone() for n, p in model.named_parameters()}
        old = pruner.masks
        masks = pruner.prune()
        for name in masks:
            check_smallest([trained[name]], [old[name]], [masks[name]])
            assert int(masks[name].sum()) == compounded(
                pruner.targets[name].numel(), pruner.rates[name], k
            )
        rewind(model, theta0, optimizer=opt)
        for name, p in model.named_parameters():
            m = masks.get(name)
            if m is None:
                assert torch.equal(p, theta0[name])
            else:
                assert torch.equal(p.detach()[m], theta0[name][m])
                assert torch.count_nonzero(p.detach()[~m]) == 0
        assert all(float(st["step"]) == 0 for st in opt.state.values())
        losses = fit(15)
        assert losses[-1] < losses[0]
        for name, p in pruner.targets.items():
            assert not torch.equal(p.detach()[masks[name]], theta0[name][masks[name]])


# -------------------------------------------------------------------------------------------
# 8. bad inputs


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_rate(rate):
    model = MLP()
    with pytest.raises(ValueError):
        MagnitudePruner(model, rate)
    with pytest.raises(ValueError):
        MagnitudePruner(model, 0.2, output_rate=rate)
    with pytest.raises(ValueError):
        MagnitudePruner(model, 0.2, layer_rates={"fc1": rate})


def test_bad_rate_types():
    model = MLP()
    for rate in ("0.2", None, True, torch.tensor(0.2)):
        with pytest.raises(TypeError):
            MagnitudePruner(model, rate)
    MagnitudePruner(model, 0)  # an int is a number


def test_bad_constructor_arguments():
    model = MLP()
    with pytest.raises(ValueError, match="scope"):
        MagnitudePruner(model, 0.2, scope="network")
    with pytest.raises(ValueError, match="fc9"):
        MagnitudePruner(model, 0.2, layer_rates={"fc9": 0.3})
    with pytest.raises(ValueError, match="fc1"):
        MagnitudePruner(model, 0.2, layer_rates={"fc1": 0.3}, exclude=["fc1"])
    with pytest.raises(ValueError, match="global"):
        MagnitudePruner(model, 0.2, scope="global", layer_rates={"fc1": 0.3})
    with pytest.raises(ValueError, match="output_layer"):
        MagnitudePruner(model, 0.2, output_layer="head")
    with pytest.raises(ValueError):
        MagnitudePruner(nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4)), 0.2)
    with pytest.raises(ValueError):
        MagnitudePruner(model, 0.2, exclude=["*"])


def test_attach_plain_torch_optimizer():
    model = MLP()
    pruner = MagnitudePruner(model, 0.2)
    with pytest.raises(TypeError):
        pruner.attach(torch.optim.Adam(model.parameters()))
    pruner.prune()  # the failed attach left nothing behind
    assert pruner.rounds == 1


def test_load_state_dict_bad_inputs():
    model = MLP()
    pruner = MagnitudePruner(model, 0.2)
    pruner.prune()
    sd = pruner.state_dict()
    fresh = MagnitudePruner(copy.deepcopy(model), 0.2)
    wrong = {"masks": {**sd["masks"], "extra.weight": sd["masks"]["fc1.weight"]}, "rounds": 1}
    with pytest.raises(ValueError, match="extra"):
        fresh.load_state_dict(wrong)
    missing = {"masks": {k: v for k, v in sd["masks"].items() if k != "out.weight"}}
    with pytest.raises(ValueError, match="out.weight"):
        fresh.load_state_dict(missing)
    bad_shape = {"masks": {**sd["masks"], "fc1.weight": torch.ones(3, 3, dtype=torch.bool)}}
    with pytest.raises(ValueError):
        fresh.load_state_dict(bad_shape)
    bad_dtype = {"masks": {**sd["masks"], "fc1.weight": sd["masks"]["fc1.weight"].float()}}
    with pytest.raises(TypeError):
        fresh.load_state_dict(bad_dtype)
    assert fresh.rounds == 0
    assert all(bool(m.all()) for m in fresh.masks.values())


def test_rewind_bad_masks():
    model = MLP()
    snap = snapshot(model)
    perturb(model)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        rewind(model, snap, {"fc2.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError):
        rewind(model, snap, {"fc2.weight": torch.ones(16, 20)})
    with pytest.raises(ValueError):
        rewind(model, snap, {"fc7.weight": torch.ones(16, 20, dtype=torch.bool)})
    with pytest.raises(ValueError):
        rewind(model, snap, {torch.zeros(16, 20): torch.ones(16, 20, dtype=torch.bool)})
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), "a refused rewind modified the model"


def test_reinitialize_bad_mask_leaves_model_untouched():
    model = MLP()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        reinitialize(model, {"fc2.weight": torch.ones(3, 3, dtype=torch.bool)}, seed=1)
    for n, p in model.named_parameters():
        assert torch.equal(p, state[n]), "a refused reinitialize modified the model"
