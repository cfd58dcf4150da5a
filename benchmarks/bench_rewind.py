"""Rewind (survivors back to θ0, pruned to 0) + Adam state reset vs the torch recipes.

pytest benchmarks/bench_rewind.py --benchmark-only
python -m benchmarks.bench_rewind              # interleaved ratio table (the figures)
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lottery_ext as lx
from benchmarks import shapes
from benchmarks.harness import bandwidth_probe, interleaved

OURS = "lottery_ext.rewind (model + MaskedAdam)"
BYTES = 17  # read snapshot (4) + mask (1); write param, exp_avg, exp_avg_sq (3 x 4)


def setup(shape_list, density=0.2):
    """A model of the given parameter shapes, its θ0, masks, and an Adam-like state."""
    g = torch.Generator().manual_seed(0)
    model = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g)) for s in shape_list])
    snap = lx.snapshot(model)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters()}
    opt = lx.MaskedAdam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return model, snap, masks, opt


def candidates(shape_list) -> dict:
    fns = {}
    model, snap, masks, opt = setup(shape_list)
    fns[OURS] = lambda: lx.rewind(model, snap, masks, opt)

    def torch_recipe(kind):
        model, snap, masks, opt = setup(shape_list)
        params = [p.detach() for p in model.parameters()]
        snaps = [snap[n] for n, _ in model.named_parameters()]
        ms = [masks[n] for n, _ in model.named_parameters()]
        bufs = [opt.state[p][k] for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]
        steps = [opt.state[p]["step"] for p in model.parameters()]
        zero = torch.zeros(())

        def run():
            for p, s, m in zip(params, snaps, ms):
                if kind == "copy_mul":
                    p.copy_(s).mul_(m)
                elif kind == "mul_out":
                    torch.mul(s, m, out=p)
                else:
                    torch.where(m, s, zero, out=p)
            torch._foreach_zero_(bufs)
            torch._foreach_zero_(steps)

        return run

    fns["copy_ + mul_(bool) + _foreach_zero_"] = torch_recipe("copy_mul")
    fns["torch.mul(out=) + _foreach_zero_"] = torch_recipe("mul_out")
    fns["torch.where(out=) + _foreach_zero_"] = torch_recipe("where")
    return fns


@pytest.mark.parametrize(
    "impl", [OURS, "copy_ + mul_(bool) + _foreach_zero_", "torch.mul(out=) + _foreach_zero_",
             "torch.where(out=) + _foreach_zero_"],
)  # fmt: skip
def test_rewind(benchmark, smoke, probe_gbps, impl):
    shape_list = [(7, 5), (3,)] if smoke else shapes.resnet50()
    fn = candidates(shape_list)[impl]
    n = sum(math.prod(s) for s in shape_list)
    benchmark.group = "rewind + Adam state reset, ResNet-50 shapes (25.6M)"
    benchmark.extra_info.update(op="rewind + Adam state reset", size="resnet50", n=n, impl=impl,
                                candidate=impl == OURS, bytes=BYTES * n,
                                probe_gbps=probe_gbps)  # fmt: skip
    benchmark.pedantic(fn, rounds=3 if smoke else 15, warmup_rounds=1)


def main() -> None:
    shape_list = shapes.resnet50()
    n = sum(math.prod(s) for s in shape_list)
    probe = bandwidth_probe()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; probe {probe:.1f} GB/s")
    t = interleaved(candidates(shape_list), rounds=15)
    print("| op | n | implementation | ms | time / lottery_ext | GB/s (% of probe) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name, sec in t.items():
        bw = f"{BYTES * n / sec / 1e9:.1f} ({100 * BYTES * n / sec / 1e9 / probe:.0f}%)"
        print(f"| rewind + state reset | {n:,} | {name} | {sec * 1e3:.2f} "
              f"| {sec / t[OURS]:.2f}x | {bw if name == OURS else ''} |")  # fmt: skip


if __name__ == "__main__":
    main()
