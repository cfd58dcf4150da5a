"""The networks of the lottery-ticket experiments and their initialisation schemes.

``build_model(name, input_shape=..., num_classes=...)`` builds one of :data:`MODELS`; every
model takes ``(B, *input_shape)`` and its output layer is its last ``nn.Linear``, always
named ``fc`` (what ``MagnitudePruner`` treats as the output layer by default).
``init_weights(model, scheme)`` / ``init_fn(scheme)`` apply "glorot_normal" (the paper's
LeNet and Conv-2/4/6), "kaiming_normal" (ResNet-20, VGG-19) or PyTorch's "default".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = ["INIT_SCHEMES", "MODELS", "build_model", "init_fn", "init_weights"]

MODELS: dict[str, str] = {
    "mlp": "fully connected ReLU network, input flattened; hidden sizes from `hidden` "
    "(default 300,100)",
    "lenet300": "LeNet-300-100 (the paper's MNIST network): mlp with hidden 300,100",
    "conv2": "Conv-2 (paper Fig. 2): conv 64,64, pool, FC 256,256, output",
    "conv4": "Conv-4 (paper Fig. 2): conv 64,64, pool, 128,128, pool, FC 256,256, output",
    "conv6": "Conv-6 (paper Fig. 2): conv 64,64, pool, 128,128, pool, 256,256, pool, "
    "FC 256,256, output",
    "resnet20": "CIFAR ResNet-20 (He et al. 2016): 16/32/64 channels, 3 basic blocks per "
    "stage, BN, 1x1 projection shortcuts",
    "vgg19": "CIFAR VGG-19 with BatchNorm (open_lth cifar_vgg_19 style), global average pool, "
    "one FC layer",
}

INIT_SCHEMES: dict[str, str] = {
    "glorot_normal": "xavier_normal_ on Linear/Conv weights, biases 0 (paper: LeNet, Conv-2/4/6)",
    "kaiming_normal": "kaiming_normal_ (fan_in, ReLU gain) on Linear/Conv weights, biases 0, "
    "BatchNorm weight 1 bias 0 (ResNet-20, VGG-19)",
    "default": "each module's own reset_parameters() (PyTorch's default initialisation)",
}

_CONV_WIDTHS = {
    "conv2": (64, 64),
    "conv4": (64, 64, 128, 128),
    "conv6": (64, 64, 128, 128, 256, 256),
}

_VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class MLP(nn.Module):
    """Flatten, then Linear + ReLU (+ dropout) per hidden size, then the output ``fc``."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        self.fc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = _dropout(dropout)
        self.fc = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.fc_layers:
            x = self.dropout(F.relu(layer(x)))
        return self.fc(x)


class ConvNet(nn.Module):
    """Conv-2/4/6: 3x3 convs (padding 1) + ReLU, 2x2 max-pool after every two convs, then
    FC layers + ReLU (+ dropout) and the output ``fc``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        widths: Sequence[int],
        hidden: Sequence[int],
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        chans = [c, *widths]
        self.conv_layers = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(chans[:-1], chans[1:])
        )
        pools = len(widths) // 2
        h, w = h >> pools, w >> pools
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for {pools} 2x2 max-pools")
        sizes = [widths[-1] * h * w, *hidden]
        self.fc_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = _dropout(dropout)
        self.fc = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for i, conv in enumerate(self.conv_layers):
            x = F.relu(conv(x))
            if i % 2 == 1:
                x = F.max_pool2d(x, 2)
        x = x.flatten(1)
        for layer in self.fc_layers:
            x = self.dropout(F.relu(layer(x)))
        return self.fc(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when the shape
    changes), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-(6n+2), n blocks per stage; n=3 is ResNet-20."""

    def __init__(self, in_channels: int, num_classes: int, n: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks = []
        in_ch = 16
        for stage, out_ch in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ConvBN(nn.Module):
    """conv 3x3 (padding 1, with bias as in open_lth) + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGGCIFAR(nn.Module):
    """VGG with BatchNorm for CIFAR: the cfg's conv/max-pool stack, global average pool to
    the last width, one output ``fc``."""

    def __init__(
        self, input_shape: tuple[int, int, int], cfg: Sequence[int | str], num_classes: int
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            else:
                layers.append(ConvBN(c, int(v)))
                c = int(v)
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for the VGG max-pools")
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} needs an image input_shape (C, H, W), got {tuple(input_shape)}"
        )
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    dropout: float = 0.0,
    hidden: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build model `name` (see :data:`MODELS`) for inputs ``(B, *input_shape)``.

    `dropout` (0 <= p < 1) follows each hidden fully-connected ReLU of "mlp", "lenet300"
    and "conv2/4/6" (refused for "resnet20" / "vgg19", which have none). `hidden` sets the
    hidden fully-connected sizes of "mlp" (default (300, 100)) and "conv2/4/6" (default
    (256, 256)). Parameters keep PyTorch's default initialisation: call
    :func:`init_weights` for the experiment's scheme."""
    key = str(name).strip().lower().replace("_", "-").replace("-", "")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise ValueError(f"input_shape must be a non-empty tuple, got {input_shape!r}")
    if any(int(s) != s or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must hold positive integers, got {input_shape!r}")
    input_shape = tuple(int(s) for s in input_shape)
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    dropout = float(dropout)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if hidden is not None:
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive, got {hidden}")

    if key in ("resnet20", "vgg19"):
        if dropout > 0:
            raise ValueError(f"model {key!r} has no hidden FC layers: dropout must be 0")
        if hidden is not None:
            raise ValueError(f"model {key!r} takes no `hidden` sizes")
    if key == "lenet300" and hidden not in (None, (300, 100)):
        raise ValueError("lenet300 is fixed at hidden (300, 100); use 'mlp' for other sizes")

    if key in ("mlp", "lenet300"):
        in_features = math.prod(input_shape)
        return MLP(in_features, hidden if hidden is not None else (300, 100), num_classes, dropout)
    if key in _CONV_WIDTHS:
        return ConvNet(
            _image_shape(key, input_shape),
            _CONV_WIDTHS[key],
            hidden if hidden is not None else (256, 256),
            num_classes,
            dropout,
        )
    if key == "resnet20":
        return ResNetCIFAR(_image_shape(key, input_shape)[0], num_classes, n=3)
    return VGGCIFAR(_image_shape(key, input_shape), _VGG19_CFG, num_classes)


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _glorot(m: nn.Module) -> None:
    if isinstance(m, _WEIGHTED):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, _NORMS):
        m.reset_parameters()  # weight 1, bias 0 (and fresh running statistics)


def _kaiming(m: nn.Module) -> None:
    if isinstance(m, _WEIGHTED):
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, _NORMS):
        m.reset_parameters()


def _default(m: nn.Module) -> None:
    reset = getattr(m, "reset_parameters", None)
    if callable(reset):
        reset()


_INIT_FNS: dict[str, Callable[[nn.Module], None]] = {
    "glorot_normal": _glorot,
    "kaiming_normal": _kaiming,
    "default": _default,
}


def init_fn(scheme: str) -> Callable[[nn.Module], None]:
    """The per-module initialiser of `scheme`, for ``model.apply(init_fn(scheme))`` (e.g.
    ``lottery_ext.reinitialize(model, masks, seed, init_fn=init_fn(scheme))``). Draws from
    torch's global RNG, so ``torch.manual_seed`` makes it reproducible."""
    key = str(scheme).strip().lower()
    if key not in _INIT_FNS:
        raise ValueError(f"unknown init scheme {scheme!r}; valid schemes: {', '.join(_INIT_FNS)}")
    return _INIT_FNS[key]


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str) -> None:
    """Initialise every Linear / Conv / BatchNorm of `model` in place with `scheme`."""
    model.apply(init_fn(scheme))
