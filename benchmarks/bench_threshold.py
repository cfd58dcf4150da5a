"""Exact k-th smallest magnitude vs torch.kthvalue / topk / sort / quantile / numpy.partition,
per tensor and global over a list (no concatenation); peak extra memory of each.

pytest benchmarks/bench_threshold.py --benchmark-only
python -m benchmarks.bench_threshold          # interleaved ratio table + memory (the figures)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lottery_ext as lx
from benchmarks import shapes
from benchmarks.harness import interleaved, peak_extra_bytes

OURS = "lottery_ext kth_smallest_magnitude"


def single(n: int) -> dict:
    """name -> fn computing the k-th smallest |x| (k = 20% of n) of one float32 tensor."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = max(1, n // 5)
    fns = {
        OURS: lambda: lx.kth_smallest_magnitude(x, k),
        "torch.kthvalue(x.abs())": lambda: torch.kthvalue(x.abs(), k).values.item(),
        "torch.topk(x.abs(), largest=False)": lambda: (
            torch.topk(x.abs(), k, largest=False).values.max().item()
        ),
        "torch.sort(x.abs())": lambda: torch.sort(x.abs()).values[k - 1].item(),
        "numpy.partition(abs)": lambda: float(np.partition(np.abs(x.numpy()), k - 1)[k - 1]),
    }
    if n <= 16_777_216:  # torch.quantile refuses larger inputs
        q = (k - 1) / (n - 1)
        fns["torch.quantile(x.abs(), nearest)"] = lambda: torch.quantile(
            x.abs(), q, interpolation="nearest"
        ).item()
    return fns


def global_list(shape_list) -> dict:
    """The global threshold over many tensors: ours walks the list, torch concatenates."""
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in shape_list]
    n = sum(t.numel() for t in ts)
    k = n // 5
    return {
        OURS: lambda: lx.kth_smallest_magnitude(ts, k),
        "torch.cat + kthvalue": lambda: torch.kthvalue(
            torch.cat([t.flatten().abs() for t in ts]), k
        ).values.item(),
        "numpy concatenate + partition": lambda: float(
            np.partition(np.abs(np.concatenate([t.numpy().ravel() for t in ts])), k - 1)[k - 1]
        ),
    }


def resnet50_x4() -> list[tuple[int, ...]]:
    """~102M elements in 161 tensors: ResNet-50's shapes with every size doubled twice."""
    return [(4 * s[0],) + s[1:] for s in shapes.resnet50()]


@pytest.mark.parametrize("n", [4_300_000, 25_000_000, 100_000_000])
@pytest.mark.parametrize(
    "impl", [OURS, "torch.kthvalue(x.abs())", "torch.topk(x.abs(), largest=False)",
             "numpy.partition(abs)"],
)  # fmt: skip
def test_kth_single(benchmark, smoke, probe_gbps, n, impl):
    size = 1000 if smoke else n
    fn = single(size)[impl]
    benchmark.group = f"kth smallest |x|, n={n:,}"
    benchmark.extra_info.update(op="kth smallest |x|", size=f"{n:,}", n=size, impl=impl,
                                candidate=impl == OURS, bytes=2 * 4 * size,
                                probe_gbps=probe_gbps)  # fmt: skip
    benchmark.pedantic(fn, rounds=3 if smoke else 5, warmup_rounds=1)


@pytest.mark.parametrize("impl", [OURS, "torch.cat + kthvalue", "numpy concatenate + partition"])
def test_kth_global(benchmark, smoke, probe_gbps, impl):
    shape_list = [(3, 5), (7,)] if smoke else resnet50_x4()
    fn = global_list(shape_list)[impl]
    n = sum(math.prod(s) for s in shape_list)
    benchmark.group = "global kth smallest |x| over 161 tensors (~102M)"
    benchmark.extra_info.update(op="global kth smallest |x|", size="161 tensors", n=n,
                                impl=impl, candidate=impl == OURS, bytes=2 * 4 * n,
                                probe_gbps=probe_gbps)  # fmt: skip
    benchmark.pedantic(fn, rounds=3 if smoke else 3, warmup_rounds=1)


def mask_construction(shape_list) -> dict:
    """One magnitude-pruning round at 20% over a model's weights: exact-count masks."""
    from torch import nn
    from torch.nn.utils import prune

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in shape_list]
    layers = nn.ModuleList(nn.Module() for _ in ts)
    for mod, t in zip(layers, ts):
        mod.weight = nn.Parameter(t.clone())
    n = sum(t.numel() for t in ts)

    def torch_global():
        for mod, t in zip(layers, ts):  # fresh (unpruned) modules each call
            if hasattr(mod, "weight_orig"):
                prune.remove(mod, "weight")
            mod.weight.data.copy_(t)
        prune.global_unstructured(
            [(m, "weight") for m in layers],
            pruning_method=prune.L1Unstructured,
            amount=round(0.2 * n),
        )

    def torch_layer():
        for mod, t in zip(layers, ts):
            if hasattr(mod, "weight_orig"):
                prune.remove(mod, "weight")
            mod.weight.data.copy_(t)
            prune.l1_unstructured(mod, "weight", amount=round(0.2 * t.numel()))

    return {
        "lottery_ext prune_smallest (global)": lambda: lx.prune_smallest(ts, round(0.2 * n)),
        "lottery_ext prune_smallest (per layer)": lambda: [
            lx.prune_smallest(t, round(0.2 * t.numel())) for t in ts],
        "torch prune.global_unstructured (L1)": torch_global,
        "torch prune.l1_unstructured (per layer)": torch_layer,
    }  # fmt: skip


@pytest.mark.parametrize(
    "impl", ["lottery_ext prune_smallest (global)", "lottery_ext prune_smallest (per layer)",
             "torch prune.global_unstructured (L1)", "torch prune.l1_unstructured (per layer)"],
)  # fmt: skip
def test_mask_construction(benchmark, smoke, probe_gbps, impl):
    shape_list = [(7, 5), (3, 4)] if smoke else shapes.resnet50()
    fn = mask_construction(shape_list)[impl]
    n = sum(math.prod(s) for s in shape_list)
    benchmark.group = "one pruning round (20%) over ResNet-50 shapes"
    benchmark.extra_info.update(op="pruning round masks", size="resnet50", n=n, impl=impl,
                                candidate=impl.startswith("lottery_ext"), bytes=3 * 5 * n,
                                probe_gbps=probe_gbps)  # fmt: skip
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


def test_results_agree(smoke):
    """Every candidate computes the same value (guards the benchmark itself)."""
    for fns in (single(1001 if smoke else 100_003), global_list([(3, 5), (7,), (40, 9)])):
        values = {name: fn() for name, fn in fns.items()}
        assert len(set(values.values())) == 1, values


def main() -> None:
    print(f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads")
    print("| op | n | implementation | ms | time / lottery_ext | peak extra memory |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    cases = [("kth, one tensor", n, single(n)) for n in (4_300_000, 25_000_000, 100_000_000)]
    g = resnet50_x4()
    cases.append(("kth, global over 161 tensors", sum(math.prod(s) for s in g), global_list(g)))
    r50 = shapes.resnet50()
    cases.append(("pruning round 20%, ResNet-50 shapes", sum(math.prod(s) for s in r50),
                  mask_construction(r50)))  # fmt: skip
    for label, n, fns in cases:
        t = interleaved(fns, rounds=5 if n < 50_000_000 else 3, warmup=1)
        mem = {name: peak_extra_bytes(fn) for name, fn in fns.items()}
        ours = t[next(name for name in t if name.startswith("lottery_ext"))]
        for name, sec in t.items():
            mb = f"{mem[name] / 2**20:.0f} MiB" if mem[name] is not None else "n/a"
            print(f"| {label} | {n:,} | {name} | {sec * 1e3:.1f} | {sec / ours:.1f}x | {mb} |")
        del fns


if __name__ == "__main__":
    main()
