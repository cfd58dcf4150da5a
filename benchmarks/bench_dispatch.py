"""What a call costs on each path into the same kernel: the eager entry point
(``lottery_ext.ops.adam_step``: checks, then the kernel from the op's table), torch's
dispatcher (``torch.ops.lottery_ext.adam_step_``: what torch.compile graphs call), and the
bare launcher (marshalling and the C++ call, no checks: the floor), at LeNet-300-100 and
ResNet-50 sizes; plus the whole ``MaskedAdam.step()`` / ``MaskedSGD.step()``.

pytest benchmarks/bench_dispatch.py --benchmark-only   # pytest-benchmark, one case at a time
python -m benchmarks.bench_dispatch                    # interleaved ratio table (the figures)
"""

from __future__ import annotations

import math

import pytest
import torch

import lottery_ext as lx
from benchmarks import shapes
from benchmarks.harness import interleaved
from lottery_ext import _native, _ops

EAGER = "lottery_ext.ops (eager: checks + kernel table)"
PATHS = [
    EAGER,
    "torch.ops.lottery_ext (dispatcher)",
    "launcher only (no checks)",
    "optimizer .step()",
]
MODELS = {"lenet300": shapes.lenet300, "resnet50": shapes.resnet50}


def candidates(kind: str, shape_list) -> dict:
    """path -> zero-arg function; one set of tensors per path (each path mutates its own)."""
    g = torch.Generator().manual_seed(0)

    def call_args():
        params = [torch.randn(s, generator=g) for s in shape_list]
        grads = [torch.randn(s, generator=g) for s in shape_list]
        masks = [torch.rand(s, generator=g) < 0.2 if len(s) > 1 else None for s in shape_list]
        if kind == "adam":
            zeros = [torch.zeros(s) for s in shape_list]
            lists = (params, grads, zeros, [torch.zeros(s) for s in shape_list], [], masks,
                     [torch.tensor(0.0) for _ in shape_list])  # fmt: skip
            return lists, dict(lr=1e-3)
        first = [False] * len(shape_list)
        bufs = [torch.zeros(s) for s in shape_list]
        return (params, grads, bufs, masks, first), dict(lr=1e-2, momentum=0.9)

    op = _ops.adam_step if kind == "adam" else _ops.sgd_step
    overload = op.overload
    out = {}
    lists, hyper = call_args()
    out[EAGER] = lambda: op(*lists, **hyper)
    lists2, hyper2 = call_args()
    out["torch.ops.lottery_ext (dispatcher)"] = lambda: overload(*lists2, **hyper2)
    if _native.core is not None:
        lists3, hyper3 = call_args()
        bound = op.bind(lists3, hyper3)
        where = _ops._where(torch.device("cpu"))
        out["launcher only (no checks)"] = lambda: op.launch(_native.core.cpu, bound, where)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shape_list]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    masks = {p: torch.rand(p.shape, generator=g) < 0.2 for p in params if p.dim() > 1}
    if kind == "adam":
        opt = lx.MaskedAdam(params, lr=1e-3, masks=masks)
    else:
        opt = lx.MaskedSGD(params, lr=1e-2, momentum=0.9, masks=masks)
    out["optimizer .step()"] = opt.step
    return out


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("path", PATHS)
def test_dispatch(benchmark, smoke, model, kind, path):
    shape_list = [(7, 5), (3,)] if smoke else MODELS[model]()
    fns = candidates(kind, shape_list)
    if path not in fns:
        pytest.skip("compiled core not loaded")
    benchmark.group = f"{kind} call path {model}"
    benchmark.extra_info.update(n=sum(math.prod(s) for s in shape_list), path=path)
    benchmark.pedantic(fns[path], rounds=3 if smoke else 20, warmup_rounds=1)


def report(kind: str, model: str, rounds: int = 41) -> list[dict]:
    """Interleaved medians (no cache flush: the per-call overhead is the question);
    ratio = time / the eager entry point's."""
    shape_list = MODELS[model]()
    t = interleaved(candidates(kind, shape_list), rounds=rounds, flush=False)
    return [
        dict(kind=kind, model=model, n=sum(math.prod(s) for s in shape_list), path=k,
             us=sec * 1e6, ratio=sec / t[EAGER])
        for k, sec in t.items()
    ]  # fmt: skip


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| step | model (tensors) | path | us per call | time / eager |")
    print("| --- | --- | --- | ---: | ---: |")
    for kind in ("adam", "sgd"):
        for model in MODELS:
            for r in report(kind, model):
                tensors = len(MODELS[model]())
                print(
                    f"| {kind} | {model} ({tensors}) | {r['path']} | {r['us']:.1f} | "
                    f"{r['ratio']:.2f}x |"
                )


if __name__ == "__main__":
    main()
