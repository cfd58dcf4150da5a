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
from lottery_ext.optim._masked import local_shard

EAGER = "lottery_ext.ops (eager: checks + kernel table)"
STEP = "optimizer .step()"
PREVIOUS = "optimizer .step(), previous design (per-parameter checks, then the launcher)"
PATHS = [EAGER, "torch.ops.lottery_ext (dispatcher)", "launcher only (no checks)", STEP, PREVIOUS]
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
    out[STEP] = opt.step
    if _native.core is not None:
        out[PREVIOUS] = _previous_step(kind, shape_list, g)
    return out


def _previous_step(kind: str, shape_list, g: torch.Generator):
    """The optimizer step as it was before the ops had one contract (2026-12-06, 59a0c51):
    each parameter's tensors checked by the optimizer (``_kernel_inputs``), then the launcher
    called without the op's checks; a ``step`` method, so torch's optimizer wrapper (hooks,
    profiler record) runs around it as around ``MaskedAdam.step``. The baseline of the
    per-step overhead."""
    params = [torch.randn(s, generator=g).requires_grad_() for s in shape_list]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    masks = {p: torch.rand(p.shape, generator=g) < 0.2 for p in params if p.dim() > 1}
    if kind == "adam":
        opt = _PreviousAdam(params, lr=1e-3, masks=masks)
    else:
        opt = _PreviousSGD(params, lr=1e-2, momentum=0.9, masks=masks)
    lx.MaskedAdam.step(opt) if kind == "adam" else lx.MaskedSGD.step(opt)  # state allocated
    return opt.step


def _previous_lists(opt, group, keys: tuple[str, ...], adam: bool) -> list[dict]:
    """The previous design's gathering loop, as it was: per parameter, its checks
    (``_kernel_inputs``), its (device, dtype) call and its local shard."""
    calls: dict[tuple | None, dict] = {}
    extra = ("exp_avgs", "exp_avg_sqs", "steps") if adam else ("momentum_buffers", "first")
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        state = opt.state[p]
        if not isinstance(state, dict):
            raise TypeError("optimizer state is not a dict")
        if adam:
            opt._init_state(p, state, False, False)
            opt._normalize_step(p, state)  # (the previous design checked it here, per step)
        g, bufs, mask, native = opt._kernel_inputs(p, g, state, keys)
        key = (p.device, p.dtype) if native else None
        c = calls.get(key)
        if c is None:
            c = calls[key] = {k: [] for k in ("params", "grads", "masks", *extra)}
        c["params"].append(local_shard(p))
        c["grads"].append(g)
        c["masks"].append(mask)
        if adam:
            c["exp_avgs"].append(bufs[0])
            c["exp_avg_sqs"].append(bufs[1])
            c["steps"].append(state["step"])
        else:
            c["momentum_buffers"].append(bufs[0])
            c["first"].append(p in opt._restart)
    return list(calls.values())


class _PreviousAdam(lx.MaskedAdam):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), wd, eps = group["betas"], group["weight_decay"], group["eps"]
            lx._validate.finite(lr=group["lr"], beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
            hyper = dict(lr=group["lr"], beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                         amsgrad=False, maximize=False, decoupled=False)  # fmt: skip
            for lists in _previous_lists(self, group, ("exp_avg", "exp_avg_sq"), True):
                _ops.adam_step.launch(_native.core.cpu, {**lists, "max_exp_avg_sqs": [], **hyper},
                                      _ops._where(torch.device("cpu")))  # fmt: skip


class _PreviousSGD(lx.MaskedSGD):
    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            lx._validate.finite(lr=lr, momentum=mom, dampening=0.0, weight_decay=0.0)
            hyper = dict(lr=lr, momentum=mom, dampening=0.0, weight_decay=0.0, nesterov=False,
                         maximize=False)  # fmt: skip
            for lists in _previous_lists(self, group, ("momentum_buffer",), False):
                _ops.sgd_step.launch(_native.core.cpu, {**lists, **hyper},
                                     _ops._where(torch.device("cpu")))  # fmt: skip


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


def report(kind: str, model: str, rounds: int | None = None) -> list[dict]:
    """Interleaved medians (no cache flush: the per-call overhead is the question);
    ratio = time / the eager entry point's."""
    shape_list = MODELS[model]()
    rounds = rounds or (301 if model == "lenet300" else 41)  # LeNet's calls are ~0.2 ms
    t = interleaved(candidates(kind, shape_list), rounds=rounds, flush=False)
    prev = t.get(PREVIOUS)
    return [
        dict(kind=kind, model=model, n=sum(math.prod(s) for s in shape_list), path=k,
             us=sec * 1e6, ratio=sec / t[EAGER],
             vs_previous=sec / prev if k == STEP and prev else None)
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
                vs = (
                    f" (**{r['vs_previous']:.3f}x** the previous design)"
                    if r["vs_previous"]
                    else ""
                )
                print(
                    f"| {kind} | {model} ({tensors}) | {r['path']} | {r['us']:.1f} | "
                    f"{r['ratio']:.2f}x{vs} |"
                )


if __name__ == "__main__":
    main()
