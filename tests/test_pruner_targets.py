"""MagnitudePruner on any model: which tensors it prunes (attention, RNN, embeddings, norms,
bare Parameters), the output layer it picks, ``prunable()`` and its reasons, models still
carrying torch.nn.utils.prune, and names under torch.compile.

Oracles: the per-tensor counts are computed independently (``n -= round(rate * n)`` per
round, Python ``round``); magnitude order is checked on the masks themselves; rewinding is
checked bitwise against the snapshot; the expected targets and reasons are written out by
hand from the layers' parameter names in the torch documentation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lottery_ext import MagnitudePruner, MaskedAdam, rewind, snapshot
from lottery_ext.pruning.pruner import DEFAULT_INCLUDE, LAYER_TYPES, format_prunable, prunable

# -------------------------------------------------------------------------------------------
# models and helpers

VOCAB, CLASSES = 40, 3


class TransformerClassifier(nn.Module):
    """Embedding + 2 TransformerEncoderLayers + Linear head."""

    def __init__(self, d=16, heads=2, ff=24):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class LSTMClassifier(nn.Module):
    """Embedding + 2-layer bidirectional LSTM with projections + Linear head."""

    def __init__(self, d=8, hidden=12, proj=6):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, bidirectional=True, proj_size=proj,
                            batch_first=True)  # fmt: skip
        self.head = nn.Linear(2 * proj, CLASSES)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0][:, -1])


class HeadFirst(nn.Module):
    """Registers its classifier head before an attention block (whose out_proj is then the
    last Linear registered)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, CLASSES)
        self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

    def forward(self, x):
        q = self.proj(x)
        return self.head(self.attn(q, x, x)[0].mean(1))


class WithBareParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 6))
        self.block = Scaled()
        self.fc = nn.Linear(6, 4)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(6, 6))
        self.shift_bias = nn.Parameter(torch.randn(6))


TF_LAYER = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
            "linear2.weight"]  # fmt: skip
TF_TARGETS = [f"encoder.layers.{i}.{n}" for i in range(2) for n in TF_LAYER] + ["head.weight"]
LSTM_TARGETS = [
    f"lstm.weight_{w}_l{k}{s}"
    for k in range(2)
    for s in ("", "_reverse")
    for w in ("ih", "hh", "hr")
] + ["head.weight"]


def compounded(n: int, rate: float, rounds: int) -> int:
    for _ in range(rounds):
        n -= round(rate * n)
    return n


def tokens(seed=0, n=8, length=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g), torch.randint(
        0, CLASSES, (n,), generator=g
    )


def assert_smallest(w: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
    assert not (new & ~old).any(), "a pruned weight was revived"
    pruned = old & ~new
    if pruned.any() and new.any():
        assert w.abs()[new].min() >= w.abs()[pruned].max()


def assert_masked(pruner) -> None:
    for name, p in pruner.targets.items():
        assert torch.count_nonzero(p.detach()[~pruner.masks[name]]) == 0, name


def train(model, opt, steps, seed=0):
    for i in range(steps):
        x, y = tokens(seed + i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# -------------------------------------------------------------------------------------------
# 1. exact counts round after round, masks kept through training and rewinding


@pytest.mark.parametrize(
    "make, expected",
    [(TransformerClassifier, TF_TARGETS), (LSTMClassifier, LSTM_TARGETS)],
    ids=["transformer", "lstm"],
)
def test_default_targets_and_exact_counts(make, expected):
    torch.manual_seed(0)
    model = make()
    pruner = MagnitudePruner(model, 0.2)
    assert list(pruner.targets) == expected  # model order
    assert pruner.output_layer == "head"
    assert pruner.rates == {n: 0.1 if n == "head.weight" else 0.2 for n in expected}
    params = dict(model.named_parameters())
    assert all(pruner.targets[n] is params[n] for n in expected)
    untouched = {n: p.detach().clone() for n, p in params.items() if n not in expected}
    for k in range(1, 5):
        before, old = {n: p.detach().clone() for n, p in pruner.targets.items()}, pruner.masks
        masks = pruner.prune()
        for name, p in pruner.targets.items():
            assert int(masks[name].sum()) == compounded(p.numel(), pruner.rates[name], k), name
            assert_smallest(before[name], old[name], masks[name])
        assert_masked(pruner)
    for n, t in untouched.items():  # embeddings, norms and biases kept by default
        assert torch.equal(params[n], t), n


@pytest.mark.parametrize("make", [TransformerClassifier, LSTMClassifier], ids=["tf", "lstm"])
def test_masks_hold_through_masked_adam_and_rewind(make):
    torch.manual_seed(0)
    model = make()
    theta0 = snapshot(model)
    pruner = MagnitudePruner(model, 0.3, prune_biases=True, include=["embedding"])
    opt = MaskedAdam(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    for round_ in range(2):
        train(model, opt, 3, seed=10 * round_)
        pruner.prune()
        train(model, opt, 2, seed=10 * round_ + 5)
        assert_masked(pruner)  # the optimizer keeps pruned weights at zero
        rewind(model, theta0, pruner.masks, opt)
        for name, p in pruner.targets.items():
            m = pruner.masks[name]
            assert torch.count_nonzero(p.detach()[~m]) == 0, name
            assert torch.equal(p.detach()[m], theta0[name][m]), name
        for name, p in model.named_parameters():
            if name not in pruner.targets:
                assert torch.equal(p.detach(), theta0[name]), name
    train(model, opt, 3, seed=99)
    assert_masked(pruner)
    for name, p in pruner.targets.items():
        assert int(pruner.masks[name].sum()) == compounded(p.numel(), pruner.rates[name], 2)


def test_global_scope_on_attention_and_rnn():
    for make in (TransformerClassifier, LSTMClassifier):
        torch.manual_seed(1)
        pruner = MagnitudePruner(make(), 0.25, scope="global")
        pool = [n for n in pruner.targets if n != "head.weight"]
        for k in range(1, 4):
            old = pruner.masks
            masks = pruner.prune()
            before = sum(int(old[n].sum()) for n in pool)
            after = sum(int(masks[n].sum()) for n in pool)
            assert before - after == round(0.25 * before)
            n_head = pruner.targets["head.weight"].numel()
            assert int(masks["head.weight"].sum()) == compounded(n_head, 0.125, k)


# -------------------------------------------------------------------------------------------
# 2. the layer types: attention variants, RNN layers and cells, include/exclude/layer_rates


def test_attention_with_kdim_vdim_and_bias_kv():
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, add_bias_kv=True)
    model = nn.Sequential()
    model.add_module("attn", mha)
    assert list(MagnitudePruner(model, 0.2).targets) == [
        "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight",
    ]  # fmt: skip
    with_biases = MagnitudePruner(model, 0.2, prune_biases=True)
    assert list(with_biases.targets) == [
        "attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.in_proj_bias",
        "attn.bias_k", "attn.bias_v", "attn.out_proj.weight", "attn.out_proj.bias",
    ]  # fmt: skip
    assert with_biases.output_layer is None  # only an out_proj: no output layer
    assert set(with_biases.rates.values()) == {0.2}
    assert "output layer: none" in with_biases.report()


@pytest.mark.parametrize(
    "layer, names",
    [
        (nn.RNN(4, 5, num_layers=2), ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                      "weight_hh_l1"]),
        (nn.GRU(4, 5, bidirectional=True), ["weight_ih_l0", "weight_hh_l0", "weight_ih_l0_reverse",
                                            "weight_hh_l0_reverse"]),
        (nn.LSTM(4, 5, proj_size=3), ["weight_ih_l0", "weight_hh_l0", "weight_hr_l0"]),
        (nn.RNNCell(4, 5), ["weight_ih", "weight_hh"]),
        (nn.LSTMCell(4, 5), ["weight_ih", "weight_hh"]),
        (nn.GRUCell(4, 5), ["weight_ih", "weight_hh"]),
    ],
    ids=["rnn", "gru", "lstm", "rnncell", "lstmcell", "grucell"],
)  # fmt: skip
def test_rnn_layers_and_cells(layer, names):
    model = nn.Sequential(layer)
    pruner = MagnitudePruner(model, 0.2)
    assert list(pruner.targets) == [f"0.{n}" for n in names]
    biases = MagnitudePruner(model, 0.2, prune_biases=True).targets
    expected_biases = [n.replace("weight", "bias") for n in names if "_hr_" not in n]
    assert sorted(n for n in biases if ".bias_" in n) == sorted(f"0.{n}" for n in expected_biases)
    masks = pruner.prune()
    for n, p in pruner.targets.items():
        assert int(masks[n].sum()) == p.numel() - round(0.2 * p.numel())


def test_include_embeddings_norms_and_bare_parameters():
    model = TransformerClassifier()
    norms = [f"encoder.layers.{i}.norm{j}.weight" for i in range(2) for j in (1, 2)]
    p = MagnitudePruner(model, 0.2, include=["embedding"])
    assert list(p.targets) == ["emb.weight"] + TF_TARGETS
    for include in ("norm", ["norm"], [nn.LayerNorm], ["encoder.layers.*.norm?"]):
        p = MagnitudePruner(model, 0.2, include=include)
        assert sorted(p.targets) == sorted(TF_TARGETS + norms), include
    p = MagnitudePruner(model, 0.2, include=["norm"], prune_biases=True)
    assert {n.replace(".bias", ".weight") for n in p.targets if "norm" in n} == set(norms)
    assert len([n for n in p.targets if "norm" in n]) == 8
    # a parameter-name glob opts in that parameter only
    p = MagnitudePruner(model, 0.2, include=["encoder.layers.0.norm1.weight"])
    assert sorted(p.targets) == sorted(TF_TARGETS + ["encoder.layers.0.norm1.weight"])
    # bare Parameters of custom modules: opt-in by name glob or by class
    bare = WithBareParams()
    assert list(MagnitudePruner(bare, 0.2).targets) == ["fc.weight"]
    assert list(MagnitudePruner(bare, 0.2, include=["pos"]).targets) == ["pos", "fc.weight"]
    p = MagnitudePruner(bare, 0.2, include=["block.*", "pos"], prune_biases=True)
    assert list(p.targets) == ["pos", "block.scale", "block.shift_bias", "fc.weight", "fc.bias"]
    p = MagnitudePruner(bare, 0.3, include=[Scaled])
    assert list(p.targets) == ["block.scale", "fc.weight"]
    masks = p.prune()
    assert int(masks["block.scale"].sum()) == 36 - round(0.3 * 36)


def test_exclude_new_types_by_key_class_and_name():
    tf, lstm = TransformerClassifier(), LSTMClassifier()
    assert list(MagnitudePruner(lstm, 0.2, exclude=["rnn"]).targets) == ["head.weight"]
    assert list(MagnitudePruner(lstm, 0.2, exclude=[nn.LSTM]).targets) == ["head.weight"]
    no_attn = [n for n in TF_TARGETS if "self_attn" not in n]
    assert list(MagnitudePruner(tf, 0.2, exclude=["attention"]).targets) == no_attn
    assert list(MagnitudePruner(tf, 0.2, exclude=[nn.MultiheadAttention]).targets) == no_attn
    # the MultiheadAttention's name covers its out_proj
    p = MagnitudePruner(tf, 0.2, exclude=["encoder.layers.0.self_attn"])
    assert [n for n in p.targets if "self_attn" in n] == [
        "encoder.layers.1.self_attn.in_proj_weight", "encoder.layers.1.self_attn.out_proj.weight",
    ]  # fmt: skip
    p = MagnitudePruner(tf, 0.2, exclude=["encoder.layers.1.*", "*.in_proj_weight"])
    assert list(p.targets) == [
        "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.weight", "head.weight",
    ]  # fmt: skip
    # exclude wins over include
    p = MagnitudePruner(tf, 0.2, include=["embedding"], exclude=["emb"])
    assert "emb.weight" not in p.targets


def test_layer_rates_for_new_types():
    tf = TransformerClassifier()
    p = MagnitudePruner(
        tf,
        0.2,
        include=["embedding"],
        layer_rates={
            "attention": 0.1,
            "linear": 0.3,
            "embedding": 0.4,
            "encoder.layers.1.self_attn": 0.15,  # the MultiheadAttention, out_proj included
            "encoder.layers.1.self_attn.in_proj_weight": 0.05,
            "encoder.layers.0.linear2": 0.5,
        },
    )
    assert p.rates == {
        "emb.weight": 0.4,
        "encoder.layers.0.self_attn.in_proj_weight": 0.1,
        "encoder.layers.0.self_attn.out_proj.weight": 0.1,  # "attention", not "linear"
        "encoder.layers.0.linear1.weight": 0.3,
        "encoder.layers.0.linear2.weight": 0.5,
        "encoder.layers.1.self_attn.in_proj_weight": 0.05,
        "encoder.layers.1.self_attn.out_proj.weight": 0.15,
        "encoder.layers.1.linear1.weight": 0.3,
        "encoder.layers.1.linear2.weight": 0.3,
        "head.weight": 0.1,  # a type key does not override the output rate
    }
    for k in range(1, 4):
        masks = p.prune()
        for name, t in p.targets.items():
            assert int(masks[name].sum()) == compounded(t.numel(), p.rates[name], k), name
    lstm = LSTMClassifier()
    p = MagnitudePruner(lstm, 0.2, layer_rates={"rnn": 0.3, "lstm.weight_hr_l1_reverse": 0.1})
    assert p.rates["lstm.weight_hr_l1_reverse"] == 0.1 and p.rates["lstm.weight_ih_l0"] == 0.3
    assert p.rates["head.weight"] == 0.1
    # a key naming a tensor that is not pruned (embeddings are opt-in) is an error
    with pytest.raises(ValueError, match="emb"):
        MagnitudePruner(lstm, 0.2, layer_rates={"emb": 0.3})
    MagnitudePruner(lstm, 0.2, layer_rates={"norm": 0.3})  # type keys may match nothing


def test_tied_embedding_and_head_pruned_once():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, VOCAB, bias=False)
            self.head.weight = self.emb.weight

    model = TiedLM()
    rows = prunable(model)
    assert [r["name"] for r in rows] == [n for n, _ in model.named_parameters()]
    row = rows[0]
    assert row["name"] == "emb.weight" and row["pruned"] and row["rate"] == 0.1
    assert "as head.weight" in row["reason"] and "output layer" in row["reason"]
    pruner = MagnitudePruner(model, 0.2)
    assert list(pruner.targets) == ["emb.weight", "mix.weight"]
    assert pruner.targets["emb.weight"] is model.head.weight


# -------------------------------------------------------------------------------------------
# 3. the output layer


def test_output_layer_is_the_head_not_an_out_proj():
    model = HeadFirst()
    pruner = MagnitudePruner(model, 0.2)
    assert pruner.output_layer == "head"
    assert pruner.rates["head.weight"] == 0.1 and pruner.rates["attn.out_proj.weight"] == 0.2
    report = pruner.report().splitlines()
    marked = [line for line in report if "output layer" in line]
    assert len(marked) == 1 and marked[0].startswith("head.weight")
    rows = {r["name"]: r for r in prunable(model)}
    assert (
        rows["head.weight"]["output"] and "output layer (rate/2)" in rows["head.weight"]["reason"]
    )
    assert not rows["attn.out_proj.weight"]["output"]
    # a Linear inside a Transformer layer registered last is not the head either
    model = nn.Module()
    model.head = nn.Linear(16, 3)
    model.block = nn.TransformerEncoderLayer(16, 2, 24)
    assert MagnitudePruner(model, 0.2).output_layer == "head"
    # a model of only Transformer layers has no output layer
    assert MagnitudePruner(nn.TransformerEncoderLayer(16, 2, 24), 0.2).output_layer is None
    # Linear/Conv models: still the last Linear registered
    seq = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 2))
    assert MagnitudePruner(seq, 0.2).output_layer == "2"


def test_output_layer_by_name_for_new_types():
    model = HeadFirst()
    pruner = MagnitudePruner(model, 0.2, output_layer="attn")  # the MHA, out_proj included
    assert pruner.rates == {
        "proj.weight": 0.2, "head.weight": 0.2, "attn.q_proj_weight": 0.1,
        "attn.k_proj_weight": 0.1, "attn.v_proj_weight": 0.1, "attn.out_proj.weight": 0.1,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"output_layer 'classifier'.*'head'.*'attn'"):
        MagnitudePruner(model, 0.2, output_layer="classifier")
    # an output layer that is not pruned is said so
    pruner = MagnitudePruner(model, 0.2, exclude=["head"])
    assert pruner.output_layer == "head" and "output layer: head (not pruned)" in pruner.report()
    rows = {r["name"]: r for r in prunable(model, exclude=["head"])}
    assert rows["head.weight"]["reason"] == "excluded by 'head' (output layer)"


# -------------------------------------------------------------------------------------------
# 4. prunable(): every parameter, with its reason


def test_prunable_rows_and_reasons_transformer():
    model = TransformerClassifier()
    rows = prunable(model, rate=0.2)
    params = dict(model.named_parameters())
    assert [r["name"] for r in rows] == list(params)
    reasons = {
        "emb.weight": "Embedding: opt-in via include",
        "head.weight": "Linear weight, output layer (rate/2)",
        "head.bias": "bias: prune_biases=False (output layer)",
    }
    for i in range(2):
        pre = f"encoder.layers.{i}."
        reasons |= {
            pre + "self_attn.in_proj_weight": "MultiheadAttention in_proj_weight",
            pre + "self_attn.in_proj_bias": "bias: prune_biases=False",
            pre + "self_attn.out_proj.weight": "MultiheadAttention out_proj.weight",
            pre + "self_attn.out_proj.bias": "bias: prune_biases=False",
            pre + "linear1.weight": "Linear weight",
            pre + "linear1.bias": "bias: prune_biases=False",
            pre + "linear2.weight": "Linear weight",
            pre + "linear2.bias": "bias: prune_biases=False",
        }
        for j in (1, 2):
            for w in ("weight", "bias"):
                reasons[f"{pre}norm{j}.{w}"] = (
                    "LayerNorm: not pruned by default; opt-in via include"
                )
    assert {r["name"]: r["reason"] for r in rows} == reasons
    pruner = MagnitudePruner(model, 0.2)
    for r in rows:
        p = params[r["name"]]
        assert r["shape"] == tuple(p.shape) and r["numel"] == p.numel()
        assert r["pruned"] == (r["name"] in pruner.targets)
        assert r["rate"] == pruner.rates.get(r["name"])
        assert r["output"] == r["name"].startswith("head.")
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["emb.weight"] == "embedding" and kinds["head.weight"] == "linear"
    assert kinds["encoder.layers.0.self_attn.out_proj.weight"] == "attention"
    assert kinds["encoder.layers.1.norm2.bias"] == "norm"
    table = format_prunable(rows)
    lines = table.splitlines()
    assert len(lines) == 1 + len(rows) + 1
    assert lines[0].split()[:6] == ["name", "shape", "numel", "pruned", "rate", "reason"]
    pruned = sum(r["numel"] for r in rows if r["pruned"])
    assert lines[-1].startswith(f"9 of {len(rows)} tensors pruned") and f"{pruned:,d}" in lines[-1]
    # with options: reasons say what decided
    rows = {r["name"]: r for r in prunable(model, include=["embedding"], exclude=["*linear2*"],
                                           layer_rates={"encoder.layers.0.linear1": 0.5},
                                           prune_biases=True)}  # fmt: skip
    assert rows["emb.weight"]["reason"] == "Embedding weight (included by 'embedding')"
    assert rows["encoder.layers.0.linear2.weight"]["reason"] == "excluded by '*linear2*'"
    assert not rows["encoder.layers.0.linear2.bias"]["pruned"]
    r = rows["encoder.layers.0.linear1.bias"]
    assert r["pruned"] and r["rate"] == 0.5
    assert r["reason"] == "Linear bias, rate from layer_rates['encoder.layers.0.linear1']"
    assert rows["head.bias"]["reason"] == "Linear bias, output layer (rate/2)"
    assert rows["encoder.layers.0.norm1.bias"]["reason"].startswith("LayerNorm: not pruned")


def test_prunable_rows_and_reasons_lstm_and_bare():
    model = LSTMClassifier()
    rows = prunable(model, rate=0.4, output_rate=0.3)
    assert [r["name"] for r in rows] == [n for n, _ in model.named_parameters()]
    for r in rows:
        name = r["name"]
        if name in LSTM_TARGETS[:-1]:
            assert r["pruned"] and r["rate"] == 0.4 and r["reason"] == f"LSTM {name[5:]}"
        elif name.startswith("lstm.bias_"):
            assert not r["pruned"] and r["reason"] == "bias: prune_biases=False"
    by_name = {r["name"]: r for r in rows}
    assert by_name["emb.weight"]["reason"] == "Embedding: opt-in via include"
    assert by_name["head.weight"]["reason"] == "Linear weight, output layer (output_rate)"
    assert by_name["head.weight"]["rate"] == 0.3
    assert sum(r["pruned"] for r in rows) == len(LSTM_TARGETS)
    bare = {r["name"]: r for r in prunable(WithBareParams())}
    assert bare["pos"]["reason"] == "bare Parameter: opt-in via include"
    assert bare["block.scale"]["reason"] == "bare Parameter: opt-in via include"
    assert bare["pos"]["kind"] == "parameter" and not bare["pos"]["pruned"]
    bare = {r["name"]: r for r in prunable(WithBareParams(), include=["pos"])}
    assert (
        bare["pos"]["pruned"] and bare["pos"]["reason"] == "bare Parameter pos (included by 'pos')"
    )
    wn = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Linear(4, 2))
    rows = {r["name"]: r["reason"] for r in prunable(wn)}
    assert rows["0.parametrizations.weight.original1"].startswith("torch.nn.utils.parametrize")
    # a model with nothing to prune: prunable says why, the pruner refuses
    empty = nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4))
    assert [r["reason"] for r in prunable(empty)] == [
        "Embedding: opt-in via include", "LayerNorm: not pruned by default; opt-in via include",
        "LayerNorm: not pruned by default; opt-in via include",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no weights to prune"):
        MagnitudePruner(empty, 0.2)


# -------------------------------------------------------------------------------------------
# 5. torch.nn.utils.prune's reparametrisation, torch.compile names


def test_torch_prune_reparametrisation_refused():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.4)
    with pytest.raises(ValueError, match=r"0\.weight_orig.*lottery_ext\.from_torch_prune\(model\)"):
        MagnitudePruner(model, 0.2)
    rows = {r["name"]: r for r in prunable(model)}
    assert not rows["0.weight_orig"]["pruned"]
    assert "from_torch_prune" in rows["0.weight_orig"]["reason"]
    lstm = LSTMClassifier()
    torch_prune.random_unstructured(lstm.lstm, "weight_hh_l1", amount=0.3)
    torch_prune.random_unstructured(lstm.lstm, "weight_hh_l1", amount=0.3)  # a container
    with pytest.raises(ValueError, match=r"lstm\.weight_hh_l1_orig.*from_torch_prune"):
        MagnitudePruner(lstm, 0.2)
    # the reparametrisation removed: accepted
    torch_prune.remove(model[0], "weight")
    assert "0.weight" in MagnitudePruner(model, 0.2).targets


def test_compiled_model_names_and_masks_match_the_plain_model():
    torch.manual_seed(0)
    plain = TransformerClassifier()
    compiled = torch.compile(copy.deepcopy(plain))  # constructed only, never run
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    recipe = dict(include=["embedding"], exclude=["encoder.layers.1.linear*"],
                  layer_rates={"encoder.layers.0.self_attn": 0.3, "head.weight": 0.25})  # fmt: skip
    a = MagnitudePruner(plain, 0.2, **recipe)
    b = MagnitudePruner(compiled, 0.2, **recipe)
    assert list(a.targets) == list(b.targets) and a.rates == b.rates
    assert b.output_layer == "head" and not any("_orig_mod" in n for n in b.targets)
    assert b.model is compiled
    originals = dict(compiled._orig_mod.named_parameters())
    assert all(b.targets[n] is originals[n] for n in b.targets)
    for _ in range(3):
        ma, mb = a.prune(), b.prune()
        assert ma.keys() == mb.keys()
        assert all(torch.equal(ma[n], mb[n]) for n in ma)
    assert_masked(b)
    for n, p in originals.items():  # the underlying module is what got pruned
        assert torch.equal(p, dict(plain.named_parameters())[n]), n
    assert [r["name"] for r in prunable(compiled)] == [n for n, _ in plain.named_parameters()]
    assert MagnitudePruner(compiled, 0.2, output_layer="_orig_mod.head").output_layer == "head"
    # state dicts load across the two
    fresh = MagnitudePruner(copy.deepcopy(plain), 0.2, **recipe)
    fresh.load_state_dict(b.state_dict())
    assert all(torch.equal(fresh.masks[n], b.masks[n]) for n in b.masks)


def test_compiled_submodule_names():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0] = torch.compile(model[0])
    pruner = MagnitudePruner(model, 0.2)
    assert list(pruner.targets) == ["0.weight", "2.weight"] and pruner.output_layer == "2"


# -------------------------------------------------------------------------------------------
# 6. bad arguments


def test_bad_include_exclude_and_output_layer():
    model = LSTMClassifier()
    with pytest.raises(TypeError, match=r"include\[0\].*class, not an instance"):
        MagnitudePruner(model, 0.2, include=[nn.Embedding(3, 3)])
    with pytest.raises(TypeError, match=r"include\[1\].*class int"):
        MagnitudePruner(model, 0.2, include=["embedding", int])
    with pytest.raises(TypeError, match=r"exclude\[0\].*float"):
        MagnitudePruner(model, 0.2, exclude=[0.5])
    with pytest.raises(TypeError, match="include must be a list"):
        MagnitudePruner(model, 0.2, include=3)
    with pytest.raises(ValueError, match=r"include: \['Embedding', 'lstm\*x'\].*type keys"):
        MagnitudePruner(model, 0.2, include=["Embedding", "lstm*x"])
    with pytest.raises(TypeError, match="output_layer"):
        MagnitudePruner(model, 0.2, output_layer=model.head)
    with pytest.raises(ValueError, match=r"output_layer 'fc'.*'emb', 'lstm', 'head'"):
        MagnitudePruner(model, 0.2, output_layer="fc")
    for bad in (dict(include=[3]), dict(layer_rates={"lstm.nothing": 0.2})):
        with pytest.raises((TypeError, ValueError)):
            prunable(model, **bad)
    # a single name or class is taken as one entry, not iterated
    assert "emb.weight" in MagnitudePruner(model, 0.2, include="emb").targets
    assert "emb.weight" in MagnitudePruner(model, 0.2, include=nn.Embedding).targets


def test_type_keys():
    assert set(DEFAULT_INCLUDE) == {"linear", "conv", "attention", "rnn"}
    assert set(LAYER_TYPES) == set(DEFAULT_INCLUDE) | {"embedding", "norm"}
