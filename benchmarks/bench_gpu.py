"""GPU benchmarks (a CUDA build of lottery_ext on a CUDA device): the masked Adam step and the
exact k-th smallest magnitude, against torch, and the achieved bandwidth against a
device-to-device copy measured in the same run.

python -m benchmarks.bench_gpu            # markdown table (the figures)
python -m benchmarks.bench_gpu --quick    # small sizes, a few rounds (smoke)

Timing: CUDA events around each call on the current stream, candidates interleaved round-robin
(rotating order), the L2 cache flushed before every call, the median of the rounds reported.
Only ratios within one run are compared.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import pytest
import torch

import lottery_ext as lx
from benchmarks import shapes

OURS_ADAM = "lottery_ext MaskedAdam.step"
OURS_KTH = "lottery_ext kth_smallest_magnitude"
NO_MASK = "lottery_ext MaskedAdam.step (no masks)"
FUSED = "torch Adam(fused=True) (no mask)"
FUSED_MUL = "torch Adam(fused=True) + _foreach_mul_(float masks)"
# bytes moved per float32 element and step: read p, g, m, v, write p, m, v (28), + the bool mask
# (29); torch's masking pass reads p and the float mask and writes p again (+12)
ADAM_BYTES = {OURS_ADAM: 29, NO_MASK: 28, FUSED: 28, FUSED_MUL: 40}


def has_cuda() -> bool:
    return torch.cuda.is_available() and bool(lx.build_info().get("cuda"))


# -------------------------------------------------------------------------------------------
# timing


_FLUSH: list[torch.Tensor] = []


def flush_l2() -> None:
    """Overwrite 256 MB (H100 L2: 50 MB) so the next kernel reads from HBM."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(64 << 20, dtype=torch.float32, device="cuda"))
    _FLUSH[0].fill_(1.0)


def gpu_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per call of each function: CUDA events on the current stream,
    round-robin with a rotating order, L2 flushed before each call."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    torch.cuda.synchronize()
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            flush_l2()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fns[k]()
            end.record()
            events[k].append((start, end))
    torch.cuda.synchronize()
    return {
        k: statistics.median(s.elapsed_time(e) for s, e in ev) / 1e3 for k, ev in events.items()
    }


def copy_bandwidth(nbytes: int = 2 << 30, rounds: int = 20) -> float:
    """GB/s of a device-to-device copy (`dst.copy_(src)`: read + write, 2 * nbytes moved)."""
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = gpu_interleaved({"copy": lambda: dst.copy_(src)}, rounds=rounds)["copy"]
    return 2 * nbytes / t / 1e9


# -------------------------------------------------------------------------------------------
# candidates


def _params(shape_list, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ps = [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in shape_list]
    for p in ps:
        p.grad = torch.randn(p.shape, device="cuda", generator=g)
    return ps


def adam_candidates(shape_list, density: float = 0.2) -> dict[str, Callable[[], object]]:
    """name -> one Adam step; each candidate owns its parameters, gradients and state."""
    g = torch.Generator(device="cuda").manual_seed(1)
    masks = [torch.rand(s, device="cuda", generator=g) < density for s in shape_list]
    fmasks = [m.float() for m in masks]
    out: dict[str, Callable[[], object]] = {}

    p = _params(shape_list, 0)
    ours = lx.MaskedAdam(p, lr=1e-3, masks=dict(zip(p, masks)))
    out[OURS_ADAM] = ours.step

    p = _params(shape_list, 0)
    ours_nomask = lx.MaskedAdam(p, lr=1e-3)
    out[NO_MASK] = ours_nomask.step

    p = _params(shape_list, 0)
    fused = torch.optim.Adam(p, lr=1e-3, fused=True)
    out[FUSED] = fused.step

    p = _params(shape_list, 0)
    fused_m = torch.optim.Adam(p, lr=1e-3, fused=True)
    pd = [q.detach() for q in p]

    def fused_then_foreach_mul():
        fused_m.step()
        torch._foreach_mul_(pd, fmasks)

    out[FUSED_MUL] = fused_then_foreach_mul
    return out


def kth_candidates(n: int) -> dict[str, Callable[[], object]]:
    """name -> the k-th smallest |x| (k = 20% of n) of one float32 CUDA tensor, as a float."""
    x = torch.randn(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    k = max(1, n // 5)
    return {
        OURS_KTH: lambda: lx.kth_smallest_magnitude(x, k),
        "torch.kthvalue(x.abs())": lambda: torch.kthvalue(x.abs(), k).values.item(),
        "torch.topk(x.abs(), largest=False, sorted=False)": lambda: (
            torch.topk(x.abs(), k, largest=False, sorted=False).values.max().item()
        ),
    }


def kth_list_candidates(shape_list) -> dict[str, Callable[[], object]]:
    """The global threshold over a model's tensors: ours walks the list, torch concatenates."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ts = [torch.randn(s, device="cuda", generator=g) for s in shape_list]
    k = sum(t.numel() for t in ts) // 5
    return {
        OURS_KTH: lambda: lx.kth_smallest_magnitude(ts, k),
        "torch.cat + kthvalue": lambda: torch.kthvalue(
            torch.cat([t.flatten().abs() for t in ts]), k
        ).values.item(),
        "lottery_ext prune_smallest (masks)": lambda: lx.prune_smallest(ts, k),
    }


def radix_passes(dtype: torch.dtype) -> int | None:
    """Histogram passes of one GPU selection (each reads every element once), if known."""
    from lottery_ext.pruning import threshold

    fn = getattr(threshold, "passes", None)
    return len(fn(dtype, torch.device("cuda"))) if fn is not None else None


# -------------------------------------------------------------------------------------------
# report


def scaled(shape_list, factor: int):
    return [s for _ in range(factor) for s in shape_list]


def rows(quick: bool) -> list[dict]:
    rounds = 5 if quick else 20
    out: list[dict] = []
    r50 = [(7, 5), (3,), (100, 33)] if quick else shapes.resnet50()
    adam_cases = [("tiny (--quick)" if quick else "resnet50 (25.6M)", r50)]
    if not quick:
        adam_cases.append(("4x resnet50 (102M)", scaled(r50, 4)))
    for label, sl in adam_cases:
        n = sum(math.prod(s) for s in sl)
        t = gpu_interleaved(adam_candidates(sl), rounds=rounds)
        base = t[OURS_ADAM]
        for name, sec in t.items():
            gbps = ADAM_BYTES[name] * n / sec / 1e9
            out.append(
                dict(
                    op="Adam step, 20% density",
                    size=label,
                    impl=name,
                    sec=sec,
                    ratio=sec / base,
                    gbps=gbps,
                )
            )
        torch.cuda.empty_cache()

    passes = radix_passes(torch.float32)
    for n in [1 << 16] if quick else [25_000_000, 100_000_000]:
        t = gpu_interleaved(kth_candidates(n), rounds=rounds)
        base = t[OURS_KTH]
        for name, sec in t.items():
            gbps = passes * 4 * n / sec / 1e9 if name == OURS_KTH and passes else None
            out.append(
                dict(
                    op="k-th smallest |x|, k = n/5",
                    size=f"{n:,} float32",
                    impl=name,
                    sec=sec,
                    ratio=sec / base,
                    gbps=gbps,
                )
            )
        torch.cuda.empty_cache()

    t = gpu_interleaved(kth_list_candidates(r50), rounds=rounds)
    base = t[OURS_KTH]
    for name, sec in t.items():
        out.append(
            dict(
                op="global k-th smallest |w| over a model",
                size="resnet50 list",
                impl=name,
                sec=sec,
                ratio=sec / base,
                gbps=None,
            )
        )
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke)")
    args = parser.parse_args(argv)
    if not has_cuda():
        raise SystemExit("bench_gpu needs a CUDA device and lottery_ext built with CUDA")
    info = lx.build_info()
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}); lottery_ext CUDA {info['cuda_version']}, "
        f"archs {info['cuda_architectures']}"
    )
    copy_gbps = copy_bandwidth(256 << 20 if args.quick else 2 << 30, rounds=5 if args.quick else 20)
    print(f"device-to-device copy (dst.copy_(src), read + write): {copy_gbps:.0f} GB/s\n")
    print("| op | size | implementation | ms | time / lottery_ext | GB/s (% of copy) |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows(args.quick):
        bw = f"{r['gbps']:.0f} ({100 * r['gbps'] / copy_gbps:.0f}%)" if r["gbps"] else ""
        print(
            f"| {r['op']} | {r['size']} | {r['impl']} | {r['sec'] * 1e3:.3f} | "
            f"{r['ratio']:.2f}x | {bw} |"
        )


@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device and a CUDA build")
def test_bench_gpu_smoke(capsys):
    """`python -m benchmarks.bench_gpu --quick` runs end to end and prints the table."""
    main(["--quick"])
    text = capsys.readouterr().out
    assert OURS_ADAM in text and OURS_KTH in text and "GB/s" in text


if __name__ == "__main__":
    main()
