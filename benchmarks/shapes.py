"""Parameter shapes of the models the benchmarks use (no torchvision needed)."""

from __future__ import annotations


def resnet50() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50 parameters: 161 tensors, 25,557,032 elements."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
            inplanes = 4 * width
    shapes += [(1000, 2048), (1000,)]
    return shapes


def lenet300() -> list[tuple[int, ...]]:
    """LeNet-300-100 on MNIST: 266,610 elements."""
    return [(300, 784), (300,), (100, 300), (100,), (10, 100), (10,)]


def conv2() -> list[tuple[int, ...]]:
    """Conv-2 of the paper (CIFAR-10): 4,301,642 elements."""
    return [(64, 3, 3, 3), (64,), (64, 64, 3, 3), (64,), (256, 16384), (256,), (256, 256), (256,),
            (10, 256), (10,)]  # fmt: skip


def flat25m() -> list[tuple[int, ...]]:
    """One flat tensor of 25M elements."""
    return [(25_000_000,)]


MODELS = {"lenet300": lenet300, "conv2": conv2, "resnet50": resnet50, "flat25m": flat25m}
