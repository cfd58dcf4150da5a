"""Scaling figure: time vs N (log-log), 0.1M to 100M elements in one tensor, for the masked
Adam step and the exact threshold against their best baselines, interleaved per size.

python -m benchmarks.scaling [OUT.png]       # default benchmarks/scaling.png
"""

from __future__ import annotations

import sys

import numpy as np
import torch

import lottery_ext as lx
from benchmarks.harness import interleaved

SIZES = [100_000, 300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000]


def adam_fns(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(n, generator=g) < 0.2
    fmask = mask.float()

    def param():
        p = torch.randn(n, generator=g).requires_grad_()
        p.grad = torch.randn(n, generator=g)
        return p

    a, b, c = param(), param(), param()
    ours = lx.MaskedAdam([a], masks={a: mask})
    fused = torch.optim.Adam([b], fused=True)
    fused_m = torch.optim.Adam([c], fused=True)

    def fused_mul():
        fused_m.step()
        torch._foreach_mul_([c.detach()], [fmask])

    return {"masked Adam (lottery_ext)": ours.step, "Adam fused + _foreach_mul_": fused_mul,
            "Adam fused, no mask": fused.step}  # fmt: skip


def kth_fns(n: int) -> dict:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    k = n // 5
    xa = x.numpy()
    return {
        "kth |x| (lottery_ext)": lambda: lx.kth_smallest_magnitude(x, k),
        "numpy.partition(|x|)": lambda: np.partition(np.abs(xa), k - 1)[k - 1],
        "torch.kthvalue(|x|)": lambda: torch.kthvalue(x.abs(), k),
    }


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/scaling.png"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [(axes[0], adam_fns, "masked Adam step (20% density)"),
              (axes[1], kth_fns, "exact k-th smallest |x| (k = 20% of N)")]  # fmt: skip
    for ax, make, title in panels:
        series: dict[str, list[float]] = {}
        for n in SIZES:
            fns = make(n)
            rounds = 7 if n < 30_000_000 else 3
            for name, sec in interleaved(fns, rounds=rounds, warmup=1).items():
                series.setdefault(name, []).append(sec * 1e3)
            print(n, {k: f"{v[-1]:.2f} ms" for k, v in series.items()}, flush=True)
            del fns
        for name, ms in series.items():
            ax.loglog(SIZES, ms, marker="o", label=name)
        ax.set_xlabel("elements N")
        ax.set_ylabel("time per call (ms)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
