"""Masked optimizer step vs the ways people mask with torch.optim today.

pytest benchmarks/bench_optim.py --benchmark-only      # pytest-benchmark, one case at a time
python -m benchmarks.bench_optim                       # interleaved ratio table (the figures)
"""

from __future__ import annotations

import math

import pytest
import torch

import lottery_ext as lx
from benchmarks import shapes
from benchmarks.harness import bandwidth_probe, interleaved

# bytes per element and step (float32 params, bool masks)
BYTES = {"adam": 29, "adam_nomask": 28, "sgd": 21, "sgd_nomask": 20}
OURS = "lottery_ext masked"


def make_params(shape_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shape_list]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def make_masks(shape_list, density, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) < density for s in shape_list]


def candidates(kind: str, shape_list, density: float) -> dict:
    """name -> zero-arg step function; each owns its own parameters (no shared caches)."""
    masks = make_masks(shape_list, density)
    fmasks = [m.float() for m in masks]
    out = {}
    p = make_params(shape_list)
    if kind == "adam":
        ours = lx.MaskedAdam(p, lr=1e-3, masks=dict(zip(p, masks)))
        torch_cls, kw = torch.optim.Adam, dict(lr=1e-3)
    else:
        ours = lx.MaskedSGD(p, lr=1e-2, momentum=0.9, masks=dict(zip(p, masks)))
        torch_cls, kw = torch.optim.SGD, dict(lr=1e-2, momentum=0.9)
    out[OURS] = ours.step

    p = make_params(shape_list)
    fused = torch_cls(p, fused=True, **kw)
    out["torch fused (no mask)"] = fused.step

    p = make_params(shape_list)
    fused_m = torch_cls(p, fused=True, **kw)
    pd = [q.detach() for q in p]

    def fused_then_foreach_mul():
        fused_m.step()
        torch._foreach_mul_(pd, fmasks)

    out["torch fused + _foreach_mul_(float masks)"] = fused_then_foreach_mul

    p = make_params(shape_list)
    default = torch_cls(p, **kw)

    def default_then_bool_mul():
        default.step()
        for q, m in zip(p, masks):
            q.detach().mul_(m)

    out["torch default + mul_(bool mask)"] = default_then_bool_mul
    return out


CASES = shapes.MODELS
IMPLS = [
    "lottery_ext masked",
    "torch fused (no mask)",
    "torch fused + _foreach_mul_(float masks)",
    "torch default + mul_(bool mask)",
]


@pytest.mark.parametrize("model", list(CASES))
@pytest.mark.parametrize("density", [1.0, 0.2, 0.02])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_step(benchmark, smoke, probe_gbps, model, density, kind, impl):
    if kind == "sgd" and density != 0.2:
        pytest.skip("SGD is measured at 20% density only")
    shape_list = [(7, 5), (3,)] if smoke else CASES[model]()
    fn = candidates(kind, shape_list, density=density)[impl]
    n = sum(math.prod(s) for s in shape_list)
    benchmark.group = f"{kind} step {model} density {density}"
    benchmark.extra_info.update(op=f"{kind} step, density {density:g}", size=model, n=n,
                                impl=impl, candidate=impl == OURS, bytes=BYTES[kind] * n,
                                probe_gbps=probe_gbps)  # fmt: skip
    benchmark.pedantic(fn, rounds=3 if smoke else 10, warmup_rounds=1)


def report(kind: str, model: str, density: float, rounds: int = 15) -> list[dict]:
    """Interleaved medians of every candidate; ratio = candidate time / lottery_ext time."""
    shape_list = CASES[model]()
    n = sum(math.prod(s) for s in shape_list)
    t = interleaved(candidates(kind, shape_list, density), rounds=rounds)
    ours = t["lottery_ext masked"]
    return [
        dict(op=f"{kind} step", model=model, n=n, density=density, impl=name, ms=sec * 1e3,
             ratio=sec / ours, gbps=BYTES[kind] * n / sec / 1e9 if name == OURS else None)
        for name, sec in t.items()
    ]  # fmt: skip


def main() -> None:
    info = lx.build_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {info['cpu_flags']}")
    probe = bandwidth_probe()
    print(f"bandwidth probe (a += s*b, 12 B/elem): {probe:.1f} GB/s")
    print("| op | model | implementation | ms | time / lottery_ext | GB/s (% of probe) |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    cases = [("adam", m, 0.2) for m in ("resnet50", "flat25m", "conv2", "lenet300")]
    cases += [("adam", "resnet50", d) for d in (1.0, 0.02)]
    cases += [("sgd", m, 0.2) for m in ("resnet50", "lenet300")]
    for kind, model, density in cases:
        for r in report(kind, model, density):
            bw = f"{r['gbps']:.1f} ({100 * r['gbps'] / probe:.0f}%)" if r["gbps"] else ""
            print(
                f"| {r['op']}, {int(100 * density)}% | {r['model']} | {r['impl']} | "
                f"{r['ms']:.3f} | {r['ratio']:.2f}x | {bw} |"
            )


if __name__ == "__main__":
    main()
