"""lottery_ext.distributed: one unit across processes (DDP and FSDP2), on CPU with the gloo
backend and 2 processes per test.

The processes come from a forkserver that has imported torch, torch.distributed.tensor (and
torch._dynamo, which the first DTensor op would import) once: each test then starts its two
ranks in well under a second instead of ~10 s of imports. A failing rank's traceback is
re-raised here; a rank stuck in a collective times out after 60 s instead of hanging.

(a) a DDP-trained unit equals a single-process one (same global batches, same masks) and
resumes from rank 0's checkpoint; (b) FSDP2: MagnitudePruner's masks over the shards equal the
single-process masks exactly, and the masked step on the shards keeps pruned weights at zero
and matches single-process; (c) the global threshold over 2 shards equals the single-process
one exactly, ties included; (d) a mask differing on one rank is caught on every rank.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from lottery_ext import MagnitudePruner, MaskedAdam, MaskedSGD, kth_smallest_magnitude
from lottery_ext import distributed as D
from lottery_ext.experiments.data import Dataset
from lottery_ext.experiments.models import build_model
from lottery_ext.experiments.presets import RunConfig
from lottery_ext.experiments.training import Level, make_optimizer
from lottery_ext.pruning.threshold import prune_smallest, prune_smallest_each

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with the gloo backend",
    ),
]

WORLD = 2
_PRELOAD = ["torch", "torch.distributed.tensor", "torch._dynamo", "lottery_ext"]


def _entry(rank: int, fn, world: int, init: str, args: tuple) -> None:
    """One rank: a gloo process group, then fn(rank, world, *args)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, tmp_path, *args, world: int = WORLD) -> None:
    """fn(rank, world, *args) in `world` processes; an exception in any is raised here."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":  # takes effect when the server starts (the first test)
        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    init = (tmp_path / "filestore").as_uri()  # a FileStore: no port to find
    tmp.start_processes(_entry, args=(fn, world, init, args), nprocs=world, join=True,
                        start_method=method)  # fmt: skip


# -- a tiny task ---------------------------------------------------------------------------------


def _data(n: int = 96) -> Dataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n + 64, 20, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
    return Dataset("synthetic", x[:n], y[:n], x[n : n + 32], y[n : n + 32], x[n + 32 :],
                   y[n + 32 :], num_classes=4, input_shape=(20,))  # fmt: skip


def _cfg(optimizer: str, **kw) -> RunConfig:
    args = dict(preset="test", dataset="synthetic", model="mlp", init="default",
                optimizer=optimizer, lr=1e-2 if optimizer == "adam" else 5e-2, batch_size=16,
                iterations=30, rounds=1, trials=1, hidden=[32, 16],
                momentum=0.9 if optimizer == "momentum" else 0.0, eval_every=10,
                checkpoint_every=1000)  # fmt: skip
    return RunConfig(**{**args, **kw})


def _model_and_masks(cfg: RunConfig):
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(20,), num_classes=4, hidden=cfg.hidden)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=g) > 0.4
             for n, p in model.named_parameters() if n.endswith("weight")}  # fmt: skip
    return model, masks


UNIT = {"trial": 0, "control": "ticket", "level": 1}


def _level(cfg, data, shard=None, ckpt=None, resume=None, masks_for_ranks=None):
    """Train one unit: single-process (shard None) or this rank's part under DDP."""
    model, masks = _model_and_masks(cfg)
    if masks_for_ranks is not None:
        masks = masks_for_ranks(masks)
    opt = make_optimizer(cfg, model)
    named = dict(model.named_parameters())
    if shard is not None:
        D.broadcast_masks(masks)  # rank 0's everywhere (they are equal here already)
        D.check_same_masks(masks)
    for n, m in masks.items():
        opt.set_mask(named[n], m)
    trained = D.ddp_wrap(model) if shard is not None else model
    lvl = Level(cfg, data, trained, opt, UNIT, ckpt, shard=shard)
    if resume is not None:
        lvl.load_state_dict(resume)
    lvl.run()
    return model, masks, lvl


# -- (a) DDP ---------------------------------------------------------------------------------------


def _ddp_matches_single(rank, world, optimizer):
    cfg, data = _cfg(optimizer), _data()
    ref, masks, ref_lvl = _level(cfg, data)
    got, _, lvl = _level(cfg, data, shard=(rank, world))
    D.check_same_tensors(dict(got.named_parameters()), "weights")  # replicas bitwise equal
    for (name, p), q in zip(got.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=name)
        if name in masks:
            assert not p[~masks[name]].any(), f"{name}: a pruned weight is not zero"
    assert len(lvl.history) == len(ref_lvl.history) == 3
    for h, r in zip(lvl.history, ref_lvl.history):  # evaluated on the unwrapped model
        assert h["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_ddp_unit_matches_single_process(tmp_path, optimizer):
    """30 iterations of a masked MLP (MaskedAdam / MaskedSGD with momentum), global batch 16
    as 2 x 8 rows: the same weights as one process within float32 rounding."""
    run_ranks(_ddp_matches_single, tmp_path, optimizer)


def _ddp_resume(rank, world, path):
    cfg, data = _cfg("adam", iterations=20, checkpoint_every=10), _data()
    ckpt = (lambda sd: torch.save(sd, path)) if D.is_writer() else None  # rank 0 writes
    whole, _, _ = _level(cfg, data, shard=(rank, world), ckpt=ckpt)
    D.barrier()  # the checkpoint is on disk before anyone reads it
    state = torch.load(path, weights_only=True)  # every rank loads the same file
    assert state["iteration"] == 10 and not any(k.startswith("module.") for k in state["model"])
    resumed, _, _ = _level(cfg, data, shard=(rank, world), resume=state)
    for (name, p), q in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(p, q), f"{name}: the resumed unit differs from the uninterrupted one"


def test_ddp_unit_resumes_from_rank0_checkpoint(tmp_path):
    """Only rank 0 writes the checkpoint; both ranks resume from it and end bitwise where an
    uninterrupted DDP unit ends. The checkpoint's model keys have no DDP prefix."""
    run_ranks(_ddp_resume, tmp_path, str(tmp_path / "unit.pt"))


def test_batch_size_not_divisible_by_world_is_refused():
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by the world size 4"):
        D.shard_rows(10, (0, 4))
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        D.shard_rows(8, (2, 2))
    with pytest.raises(ValueError, match="batch_size=10 is not divisible"):
        Level(_cfg("adam", batch_size=10), _data(), None, None, UNIT, None, shard=(0, 4))
    assert D.shard_rows(12, (1, 3)) == slice(4, 8)


def test_shard_batch_takes_each_ranks_rows_of_every_tensor():
    x, y = torch.arange(24.0).reshape(8, 3), torch.arange(8)
    rows = D.shard_rows(8, (1, 2))
    xs, ys = D.shard_batch((x, y), rows, 8)
    assert torch.equal(xs, x[4:]) and torch.equal(ys, y[4:])
    out = D.shard_batch({"x": x, "names": list("abcdefgh"), "k": 3}, rows, 8)
    assert out["names"] == list("efgh") and out["k"] == 3 and torch.equal(out["x"], x[4:])
    with pytest.raises(ValueError, match="global batch size 8"):
        D.shard_batch(torch.zeros(5), rows, 8)


def test_single_process_helpers_without_a_process_group():
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_writer()
    D.barrier()  # a no-op
    model = torch.nn.Linear(2, 2)
    assert D.unwrap(model) is model
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.check_same_masks({"w": torch.ones(2, dtype=torch.bool)})


def test_level_with_a_whole_shard_is_the_single_process_level():
    """shard=(0, 1) takes every row: the same weights, bit for bit."""
    cfg, data = _cfg("adam", iterations=5), _data()
    a, _, _ = _level(cfg, data)
    model, masks = _model_and_masks(cfg)
    opt = make_optimizer(cfg, model)
    for n, p in model.named_parameters():
        if n in masks:
            opt.set_mask(p, masks[n])
    Level(cfg, data, model, opt, UNIT, None, shard=(0, 1)).run()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), a.parameters()))


# -- (b) FSDP2 -------------------------------------------------------------------------------------


def _fsdp(model, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for layer in [*model.fc_layers, model.fc]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp_masks_and_step(rank, world):
    from torch.distributed.tensor import DTensor

    # odd sizes (uneven shards), weights from a tiny set of values (many ties, +-0)
    torch.manual_seed(0)
    ref = build_model("mlp", input_shape=(20,), num_classes=5, hidden=[33, 17])
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randint(-4, 5, p.shape) * 0.25)
    sharded = _fsdp(copy.deepcopy(ref), world)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    recipes = [dict(rate=0.3), dict(rate=0.45, scope="global"),
               dict(rate=0.2, scope="global", output_in_global=True)]  # fmt: skip
    for recipe in recipes:
        want = MagnitudePruner(ref, **recipe).compute_masks()
        got = MagnitudePruner(sharded, **recipe).compute_masks()
        assert all(isinstance(m, DTensor) for m in got.values())
        whole = D.gather_masks(got)  # what rank 0 would save
        for name, m in want.items():
            assert torch.equal(whole[name], m), f"{recipe}: masks of {name} differ"
        # the random-mask control and iterative random pruning draw the same positions
        want_r = MagnitudePruner(ref, **recipe).random_masks(seed=3)
        got_r = MagnitudePruner(sharded, **recipe).random_masks(seed=3)
        assert all(torch.equal(got_r[n], m) for n, m in want_r.items()), recipe
        # a second round from these masks, and from whole (plain) masks given to the pruner
        want2 = MagnitudePruner(ref, **recipe).compute_masks(want)
        got2 = MagnitudePruner(sharded, **recipe).compute_masks(want)
        assert all(torch.equal(got2[n].full_tensor(), m) for n, m in want2.items()), recipe

    want_r = MagnitudePruner(ref, rate=0.3).prune_randomly(seed=4)  # (zeroes weights: last)
    got_r = D.gather_masks(MagnitudePruner(sharded, rate=0.3).prune_randomly(seed=4))
    assert all(torch.equal(got_r[n], m) for n, m in want_r.items())

    # the masked step on the shards: random weights, one round of pruning, 8 steps
    x, y = torch.randn(16, 20, generator=torch.Generator().manual_seed(3)), torch.arange(16) % 5
    rows = D.shard_rows(16, (rank, world))
    for opt_cls, kw in ((MaskedAdam, dict(lr=1e-2, weight_decay=1e-3)),
                        (MaskedSGD, dict(lr=5e-2, momentum=0.9))):  # fmt: skip
        torch.manual_seed(1)
        ref = build_model("mlp", input_shape=(20,), num_classes=5, hidden=[33, 17])
        sharded = _fsdp(copy.deepcopy(ref), world)
        pr_ref, pr_sh = MagnitudePruner(ref, rate=0.5), MagnitudePruner(sharded, rate=0.5)
        opt_ref, opt_sh = opt_cls(ref.parameters(), **kw), opt_cls(sharded.parameters(), **kw)
        pr_ref.attach(opt_ref)
        pr_sh.attach(opt_sh)
        pr_ref.prune()
        masks = pr_sh.prune()
        assert pr_sh.density() == pr_ref.density()
        for _ in range(8):
            for model, opt, xb, yb in ((ref, opt_ref, x, y), (sharded, opt_sh, x[rows], y[rows])):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()
        named = dict(sharded.named_parameters())
        for name, q in ref.named_parameters():
            p = named[name]
            if name in masks:  # exactly zero where pruned, on the local shard itself
                assert not p.to_local()[~masks[name].to_local()].any(), name
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=2e-5, atol=2e-6,
                                       msg=f"{opt_cls.__name__}: {name}")  # fmt: skip
        # an optimizer round trip keeps the sharded masks and state
        opt_sh.load_state_dict(opt_sh.state_dict())
        assert all(isinstance(m, DTensor) for m in opt_sh.masks.values())

    # ops that need memory of their own refuse a DTensor with a clear error (not a crash)
    from lottery_ext import ops

    w = next(sharded.parameters())
    with pytest.raises(TypeError, match="DTensor .* no memory of its own"):
        ops.apply_mask([w.detach()], [torch.ones(w.shape, dtype=torch.bool)])


def test_fsdp2_masks_and_masked_step_match_single_process(tmp_path):
    """An MLP sharded with fully_shard over 2 CPU ranks: MagnitudePruner's masks (per layer,
    global, global with the output layer) equal the single-process masks exactly on weights
    full of ties; MaskedAdam and MaskedSGD step on the local shards, pruned weights stay
    exactly zero and the weights match single-process training within float32 rounding."""
    run_ranks(_fsdp_masks_and_step, tmp_path)


# -- (c) the exact global threshold over shards ------------------------------------------------


def _tiny_set_tensors(dtype):
    """Tensors of values from a tiny set (ties everywhere, -0.0 and +0.0), odd row counts
    (one with a single row: an empty shard under torch.chunk), and masks."""
    g = torch.Generator().manual_seed(7)
    values = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0])
    shapes = [(7, 5), (9,), (1, 6), (4, 3, 2)]
    tensors = [values[torch.randint(0, len(values), s, generator=g)].to(dtype) for s in shapes]
    masks = [torch.rand(s, generator=g) > 0.3 for s in shapes]
    return tensors, masks


def _check_thresholds(rank, world):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        full, full_masks = _tiny_set_tensors(dtype)
        dts = [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in full]
        dms = [distribute_tensor(m, mesh, [Shard(0)], src_data_rank=None) for m in full_masks]
        # plain local shards too: contiguous row blocks in rank order (tensor_split)
        plain = [t.tensor_split(world)[rank].contiguous() for t in full]
        plain_masks = [m.tensor_split(world)[rank].contiguous() for m in full_masks]
        for masks, dmasks, pmasks in ((None, None, None), (full_masks, dms, plain_masks)):
            total = sum(t.numel() if m is None else int(m.sum())
                        for t, m in zip(full, masks or [None] * len(full)))  # fmt: skip
            for k in sorted({0, 1, 2, 7, total // 3, total // 2, total - 1, total, total + 1}):
                try:
                    want = kth_smallest_magnitude(full, k, masks)
                except ValueError as e:
                    want = type(e)
                for inputs, m in ((dts, dmasks), (plain, pmasks), (dts, masks)):
                    try:
                        got = (kth_smallest_magnitude(inputs, k, m) if inputs is dts
                               else D.sharded_kth_smallest_magnitude(inputs, k, m))  # fmt: skip
                    except ValueError as e:
                        got = type(e)
                    assert got == want, (dtype, k, got, want)
                if k > total:
                    continue
                want_masks = prune_smallest(full, k, masks)
                got = prune_smallest(dts, k, dmasks)
                for w, g_ in zip(want_masks, got):
                    assert torch.equal(g_.full_tensor(), w), (dtype, k, "DTensor")
                got = D.sharded_prune_smallest(plain, k, pmasks)
                for w, g_ in zip(want_masks, got):
                    assert torch.equal(g_, w.tensor_split(world)[rank]), (dtype, k, "plain")
            # per tensor: every count from 0 to all of a tensor's candidates
            cands = [t.numel() if m is None else int(m.sum())
                     for t, m in zip(full, masks or [None] * len(full))]  # fmt: skip
            for frac in (0.0, 0.3, 0.5, 1.0):
                counts = [round(frac * c) for c in cands]
                want_masks = prune_smallest_each(full, counts, masks)
                got = prune_smallest_each(dts, counts, dmasks)
                assert all(torch.equal(g_.full_tensor(), w) for w, g_ in zip(want_masks, got))
                got = D.sharded_prune_smallest_each(plain, counts, pmasks)
                assert all(torch.equal(g_, w.tensor_split(world)[rank])
                           for w, g_ in zip(want_masks, got)), (dtype, frac)  # fmt: skip
    # a call that differs between ranks fails on every rank instead of hanging
    with pytest.raises(ValueError, match="the ranks disagree on count"):
        D.sharded_prune_smallest(plain, 3 + rank)
    bad_mask = [torch.ones(2, dtype=torch.bool)] if rank == 1 else None  # wrong on rank 1 only
    with pytest.raises(ValueError, match=r"(rank 1 refused its inputs: )?mask for t.*\(2,\)"):
        D.sharded_prune_smallest([torch.ones(3)], 1, bad_mask, names=["t"])


def test_sharded_threshold_equals_single_process_exactly(tmp_path):
    """kth_smallest_magnitude / prune_smallest / prune_smallest_each over 2 shards (DTensors
    and plain local shards) equal the single-process results exactly, on tensors drawn from
    8 values (ties everywhere), float32/float64/bfloat16, with and without masks, for k from
    0 to the number of candidates (and one past it: the same error on every rank)."""
    run_ranks(_check_thresholds, tmp_path)


# -- (d) masks the same on every rank ------------------------------------------------------------


def _divergence(rank, world):
    masks = {"fc1.weight": torch.ones(4, 5, dtype=torch.bool),
             "fc.weight": torch.ones(3, 4, dtype=torch.bool)}  # fmt: skip
    D.check_same_masks(masks)
    if rank == 1:
        masks["fc.weight"][2, 1] = False  # one bit flipped on one rank
    with pytest.raises(RuntimeError, match=r"masks differ across ranks: 'fc.weight' on rank\(s\) "
                                           r"\[1\] differs from rank 0's"):  # fmt: skip
        D.check_same_masks(masks)
    D.broadcast_masks(masks)  # rank 0's everywhere again
    assert masks["fc.weight"].all()
    D.check_same_masks(masks)
    # masks for other tensors on one rank: named, on every rank
    other = {"fc1.weight": masks["fc1.weight"]} if rank == 1 else masks
    with pytest.raises(ValueError, match=r"rank 1 has masks for other tensors .*'fc.weight'"):
        D.broadcast_masks(other)
    with pytest.raises(TypeError, match="not torch.bool"):
        D.check_same_masks({"w": torch.ones(3)})


def test_mask_divergence_is_detected_on_every_rank(tmp_path):
    """One rank flips one bit: check_same_masks raises on both ranks, naming the parameter and
    the rank; broadcast_masks restores rank 0's masks; mismatched names are named."""
    run_ranks(_divergence, tmp_path)


def test_find_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m lottery_ext find`: each unit trains with DDP on both
    ranks (rows of every global batch), rank 0 writes; the figures match one process."""
    import json
    import subprocess
    import sys

    args = ["find", "--rounds", "1", "--trials", "1", "--iterations", "40", "--eval-every",
            "20", "--checkpoint-every", "20", "--threads", "1", "--no-plots",
            "--no-progress"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                          "2", "-m", "lottery_ext", *args, "--out", str(ddp)], env=env,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("trial 0 ticket       level  0") == 1  # rank 0 speaks, alone
    run = subprocess.run([sys.executable, "-m", "lottery_ext", *args, "--out", str(one)],
                         env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]

    def rows(path):
        return [json.loads(ln) for ln in (path / "results.jsonl").read_text().splitlines()]

    a, b = rows(ddp), rows(one)
    assert [(r["control"], r["level"]) for r in a] == [(r["control"], r["level"]) for r in b]
    for x, y in zip(a, b):
        assert x["weights_remaining"] == y["weights_remaining"]
        assert x["val_loss_at_early_stop"] == pytest.approx(y["val_loss_at_early_stop"], rel=1e-4)
    assert sorted(p.name for p in (ddp / "state").iterdir()) == ["trial0_masks1.pt",
                                                                 "trial0_theta.pt"]  # fmt: skip


def test_torchrun_refuses_what_ddp_cannot_split(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                          "2", "-m", "lottery_ext", "find", "--batch-size", "99",
                          "--out", str(tmp_path / "x")], env=env, capture_output=True,
                         text=True, timeout=240)  # fmt: skip
    # each rank says it in one line (torchrun then reports the failed ranks its own way)
    assert run.returncode != 0 and "error: batch_size=99 is not divisible by" in run.stderr
    assert "lottery_ext/experiments" not in run.stderr and not (tmp_path / "x").exists()
