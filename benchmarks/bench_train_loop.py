"""Iterations/second of one LeNet-300-100 level (batch 60, MNIST-shaped data, ~51% of the
weights left): the runner's own training loop (lottery_ext.experiments.runner.Level with
MaskedAdam) vs the same loop written with torch.nn.utils.prune + torch.optim.Adam, and vs an
open_lth-style loop (torch.optim.Adam, `param.data *= mask` before every forward).

pytest benchmarks/bench_train_loop.py --benchmark-only
python -m benchmarks.bench_train_loop          # interleaved ratio table (the figures)
"""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import lottery_ext as lx
from benchmarks.harness import interleaved
from lottery_ext.experiments.data import Batches, Dataset
from lottery_ext.experiments.models import build_model, init_weights
from lottery_ext.experiments.presets import PRESETS, RunConfig
from lottery_ext.experiments.runner import Level

OURS = "lottery_ext runner loop (MaskedAdam)"
BATCH = 60


def make_data(n_train: int = 6000) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n_train,), generator=g)
    tiny = x[:10], y[:10]
    return Dataset("synthetic-mnist", x, y, *tiny, *tiny, num_classes=10, input_shape=(1, 28, 28))


def make_model_and_masks(rounds: int = 3):
    torch.manual_seed(0)
    model = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    init_weights(model, "glorot_normal")
    pruner = lx.MagnitudePruner(model, 0.2)
    for _ in range(rounds):  # 51.3% of the weights left, as at level 3 of the paper's LeNet run
        pruner.prune()
    return model, pruner.masks


def loops(iterations: int) -> dict:
    """name -> fn running `iterations` training iterations of one level."""
    data = make_data()
    out = {}

    # ours: the runner's Level, evaluating only at the end (on 10 examples)
    model, masks = make_model_and_masks()
    cfg = RunConfig.from_preset(PRESETS["lenet300-mnist"], iterations=iterations,
                                eval_every=iterations, checkpoint_every=10**9)  # fmt: skip
    tmp = TemporaryDirectory()
    out["_tmp"] = tmp  # keep alive

    def ours():
        opt = lx.MaskedAdam(model.parameters(), lr=1.2e-3)
        named = dict(model.named_parameters())
        for name, m in masks.items():
            opt.set_mask(named[name], m)
        unit = {"trial": 0, "control": "ticket", "level": 3}
        Level(cfg, data, model, opt, unit, Path(tmp.name) / "unit.pt").run()

    out[OURS] = ours

    # torch.nn.utils.prune: weight = weight_orig * mask in a forward pre-hook, plain Adam
    model_p, masks_p = make_model_and_masks()
    for name, module in model_p.named_modules():
        if f"{name}.weight" in masks_p:
            torch_prune.custom_from_mask(module, "weight", masks_p[f"{name}.weight"])
    opt_p = torch.optim.Adam(model_p.parameters(), lr=1.2e-3)

    def torch_prune_loop():
        batches = Batches(len(data.y_train), BATCH, seed=0)
        for _ in range(iterations):
            idx = batches.next()
            opt_p.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model_p(data.x_train[idx]), data.y_train[idx]).backward()
            opt_p.step()

    out["torch.nn.utils.prune + torch.optim.Adam"] = torch_prune_loop

    # open_lth style: float masks multiplied into the weights before every forward
    model_o, masks_o = make_model_and_masks()
    pairs = [(p, masks_o[n].float()) for n, p in model_o.named_parameters() if n in masks_o]
    opt_o = torch.optim.Adam(model_o.parameters(), lr=1.2e-3)

    def open_lth_loop():
        batches = Batches(len(data.y_train), BATCH, seed=0)
        for _ in range(iterations):
            idx = batches.next()
            for p, m in pairs:
                p.data *= m
            opt_o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model_o(data.x_train[idx]), data.y_train[idx]).backward()
            opt_o.step()

    out["open_lth style (param.data *= mask) + Adam"] = open_lth_loop
    return out


@pytest.mark.parametrize(
    "impl", [OURS, "torch.nn.utils.prune + torch.optim.Adam",
             "open_lth style (param.data *= mask) + Adam"],
)  # fmt: skip
def test_train_loop(benchmark, smoke, impl):
    iterations = 5 if smoke else 500
    fn = loops(iterations)[impl]
    benchmark.group = f"LeNet-300-100 level, batch {BATCH}, {iterations} iterations"
    benchmark.extra_info.update(op=f"LeNet-300-100 training, {iterations} iterations",
                                size="lenet300", n=iterations, impl=impl,
                                candidate=impl == OURS)  # fmt: skip
    benchmark.pedantic(fn, rounds=2 if smoke else 7, warmup_rounds=1)


def main() -> None:
    iterations = 500
    fns = {k: v for k, v in loops(iterations).items() if not k.startswith("_")}
    t = interleaved(fns, rounds=7, warmup=1, flush=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {iterations} iterations")
    print("| loop | iterations/s | speed-up of lottery_ext |")
    print("| --- | ---: | ---: |")
    for name, sec in t.items():
        print(f"| {name} | {iterations / sec:.0f} | {sec / t[OURS]:.2f}x |")


if __name__ == "__main__":
    main()
