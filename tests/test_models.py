"""lottery_ext.experiments.models: architectures (parameter counts, shapes, output layer),
initialisation schemes and dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lottery_ext.experiments.models import MODELS, build_model, init_fn, init_weights

CIFAR, MNIST, MNIST1D = (3, 32, 32), (1, 28, 28), (40,)

# (model, input shape) -> exact parameter count (weights + biases + BatchNorm affine).
PARAM_COUNTS = {
    ("lenet300", MNIST): 266_610,  # 784-300-100-10
    ("mlp", MNIST): 266_610,
    ("mlp", MNIST1D): 40 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10,
    ("conv2", CIFAR): 4_301_642,
    ("conv4", CIFAR): 2_425_930,
    ("conv6", CIFAR): 2_262_602,
    ("resnet20", CIFAR): 272_474,
    ("vgg19", CIFAR): 20_040_522,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("key", list(PARAM_COUNTS), ids=lambda k: f"{k[0]}-{len(k[1])}d")
def test_param_counts(key):
    name, shape = key
    model = build_model(name, input_shape=shape, num_classes=10)
    assert n_params(model) == PARAM_COUNTS[key]


def test_conv_layer_structure():
    # Paper, Figure 2: 3x3 convs with the listed widths, then FC 256, 256, 10.
    widths = {"conv2": [64, 64], "conv4": [64, 64, 128, 128], "conv6": [64, 64, 128, 128, 256, 256]}
    flat = {"conv2": 64 * 16 * 16, "conv4": 128 * 8 * 8, "conv6": 256 * 4 * 4}
    for name, ws in widths.items():
        model = build_model(name, input_shape=CIFAR, num_classes=10)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == ws
        assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
        fcs = [m for _, m in linears(model)]
        assert [(f.in_features, f.out_features) for f in fcs] == [
            (flat[name], 256),
            (256, 256),
            (256, 10),
        ]


def test_resnet20_structure():
    model = build_model("resnet20", input_shape=CIFAR, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    one = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(three) == 19 and len(one) == 2  # 1 + 3 stages x 3 blocks x 2, 2 projections
    assert [c.out_channels for c in three] == [16] * 7 + [32] * 6 + [64] * 6
    assert [c.stride for c in one] == [(2, 2), (2, 2)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert [(f.in_features, f.out_features) for _, f in linears(model)] == [(64, 10)]


def test_vgg19_structure():
    model = build_model("vgg19", input_shape=CIFAR, num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert [(f.in_features, f.out_features) for _, f in linears(model)] == [(512, 10)]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("mlp", MNIST1D),
        ("mlp", MNIST),
        ("lenet300", MNIST),
        ("conv2", MNIST),
        ("conv4", MNIST),
        ("conv6", MNIST),
        ("conv2", CIFAR),
        ("conv4", CIFAR),
        ("conv6", CIFAR),
        ("resnet20", CIFAR),
        ("vgg19", CIFAR),
    ],
)
def test_forward_shapes_and_output_layer(name, shape):
    model = build_model(name, input_shape=shape, num_classes=7)
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    last_name, last = linears(model)[-1]
    assert last_name == "fc" and last.out_features == 7
    # The last nn.Linear is really the output: replacing it changes the logits accordingly.
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.arange(7.0))
    model.eval()
    torch.testing.assert_close(model(x), torch.arange(7.0).expand(3, 7))


def test_mlp_hidden_sizes_and_flatten():
    model = build_model("mlp", input_shape=(2, 5), num_classes=3, hidden=(8, 6, 4))
    assert [(f.in_features, f.out_features) for _, f in linears(model)] == [
        (10, 8),
        (8, 6),
        (6, 4),
        (4, 3),
    ]
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(model(x), model(x.reshape(4, 10)))
    no_hidden = build_model("mlp", input_shape=(5,), num_classes=3, hidden=())
    assert [(f.in_features, f.out_features) for _, f in linears(no_hidden)] == [(5, 3)]


def test_conv_hidden_override():
    model = build_model("conv2", input_shape=MNIST, num_classes=10, hidden=(32,))
    assert [(f.in_features, f.out_features) for _, f in linears(model)] == [
        (64 * 14 * 14, 32),
        (32, 10),
    ]


def test_bad_arguments():
    with pytest.raises(ValueError, match="mlp.*lenet300.*conv2.*conv4.*conv6.*resnet20.*vgg19"):
        build_model("resnet50", input_shape=CIFAR, num_classes=10)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model("conv2", input_shape=MNIST1D, num_classes=10)
    with pytest.raises(ValueError, match="dropout"):
        build_model("mlp", input_shape=MNIST1D, num_classes=10, dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet20", input_shape=CIFAR, num_classes=10, dropout=0.5)
    with pytest.raises(ValueError, match="hidden"):
        build_model("vgg19", input_shape=CIFAR, num_classes=10, hidden=(10,))
    with pytest.raises(ValueError, match="lenet300"):
        build_model("lenet300", input_shape=MNIST, num_classes=10, hidden=(50,))
    with pytest.raises(ValueError, match="too small"):
        build_model("vgg19", input_shape=(3, 16, 16), num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", input_shape=MNIST1D, num_classes=0)


def test_models_registry_matches_builder():
    assert set(MODELS) == {"mlp", "lenet300", "conv2", "conv4", "conv6", "resnet20", "vgg19"}
    assert all(isinstance(v, str) and v and "\n" not in v for v in MODELS.values())


# -- initialisation ----------------------------------------------------------------------------


def test_glorot_normal():
    model = build_model("conv2", input_shape=CIFAR, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    init_weights(model, "glorot_normal")
    big = model.fc_layers[0]  # 16384 -> 256: 4.2M samples
    expect = math.sqrt(2.0 / (big.in_features + big.out_features))
    assert abs(big.weight.std().item() / expect - 1) < 0.05
    assert abs(big.weight.mean().item()) < expect * 0.01
    conv = model.conv_layers[1]  # fan_in = fan_out = 64 * 9
    expect_conv = math.sqrt(2.0 / (2 * 64 * 9))
    assert abs(conv.weight.std().item() / expect_conv - 1) < 0.05
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert torch.count_nonzero(m.bias) == 0
            assert not torch.any(m.weight == 3.0)
    # Normal, not uniform: some weights beyond the uniform bound sqrt(3) * std.
    assert (big.weight.abs() > math.sqrt(3) * expect * 1.05).any()


def test_kaiming_normal():
    model = build_model("vgg19", input_shape=CIFAR, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    init_weights(model, "kaiming_normal")
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]  # 512 -> 512, 3x3
    expect = math.sqrt(2.0 / (512 * 9))
    assert abs(conv.weight.std().item() / expect - 1) < 0.05
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
    fc = model.fc
    assert abs(fc.weight.std().item() / math.sqrt(2.0 / 512) - 1) < 0.1


def test_kaiming_normal_resets_batchnorm_statistics():
    model = build_model("resnet20", input_shape=CIFAR, num_classes=10)
    model.train()
    model(torch.randn(8, *CIFAR) * 5 + 2)  # moves the running statistics
    bn = model.bn
    assert not torch.all(bn.running_mean == 0)
    init_weights(model, "kaiming_normal")
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)


def test_default_init_is_pytorch_reset():
    model = build_model("lenet300", input_shape=MNIST, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    init_weights(model, "default")
    for _, lin in linears(model):
        bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform_(a=sqrt(5)) bound
        w = lin.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1  # uniform std
        assert torch.count_nonzero(lin.bias) > 0


def test_init_fn_with_apply_is_deterministic():
    fn = init_fn("glorot_normal")
    model = build_model("conv2", input_shape=MNIST, num_classes=10)
    torch.manual_seed(123)
    model.apply(fn)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    model.apply(fn)
    assert not torch.equal(first["fc.weight"], model.fc.weight)
    torch.manual_seed(123)
    model.apply(fn)
    for k, v in model.state_dict().items():
        assert torch.equal(first[k], v), k
    # init_weights(model, s) is model.apply(init_fn(s)).
    torch.manual_seed(123)
    init_weights(model, "glorot_normal")
    assert torch.equal(first["fc_layers.0.weight"], model.fc_layers[0].weight)


@pytest.mark.parametrize("scheme", ["glorot_normal", "kaiming_normal", "default"])
def test_init_fn_every_scheme_changes_weights(scheme):
    model = build_model("resnet20", input_shape=CIFAR, num_classes=10)
    before = [p.clone() for p in model.parameters() if p.dim() > 1]
    model.apply(init_fn(scheme))
    after = [p for p in model.parameters() if p.dim() > 1]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_unknown_scheme():
    with pytest.raises(ValueError, match="glorot_normal.*kaiming_normal.*default"):
        init_fn("orthogonal")
    with pytest.raises(ValueError, match="glorot_normal"):
        init_weights(nn.Linear(2, 2), "xavier")


# -- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape", [("mlp", MNIST1D), ("lenet300", MNIST), ("conv2", MNIST)])
def test_dropout_train_vs_eval(name, shape):
    model = build_model(name, input_shape=shape, num_classes=10, dropout=0.5)
    plain = build_model(name, input_shape=shape, num_classes=10)
    plain.load_state_dict(model.state_dict())  # same parameter names: dropout has none
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) >= 1
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    x = torch.randn(16, *shape)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # random masks in train mode
    assert not torch.allclose(a, plain(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    torch.testing.assert_close(model(x), plain(x))  # identity in eval mode
