"""The IMP experiment: per trial, train the dense net, prune, rewind, repeat; at every level
also train the controls (same mask with a random re-init; a random mask of the same
per-layer counts). Resumable at any moment from atomic checkpoints.

Run directory:
  config.json       every setting + library/torch versions (a rerun must match to resume),
                    and the data's input shape and class count (to rebuild the model)
  results.jsonl     one object per (trial, control, level): the figures of the paper
  curves.jsonl      per-eval validation/test curves of each (trial, control, level)
  state/trial{t}_theta.pt   {"theta0": θ0, "theta_k": θk or None} (Snapshot state dicts)
  state/trial{t}_masks{L}.pt  name -> bool mask of trial t's ticket at level L >= 1
  state/unit.pt     the unit in progress: model, optimizer, data order, history (resume)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import MagnitudePruner, MaskedAdam, MaskedAdamW, MaskedSGD, __version__
from ..pruning.rewind import Snapshot, reinitialize, rewind, snapshot
from ..pruning.threshold import prune_smallest
from .data import Batches, Dataset, augment_cifar, load_dataset
from .models import build_model, init_fn, init_weights
from .presets import RunConfig

CONTROLS = ("ticket", "reinit", "random_prune")


# ---- files ------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file. A torn last line (a write cut short by a kill) is skipped;
    a bad line elsewhere is an error."""
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({exc})") from exc
    return rows


class RunDir:
    """The run directory: config identity, the append-only results, checkpoints."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.state = self.path / "state"
        self.results = self.path / "results.jsonl"
        self.curves = self.path / "curves.jsonl"

    def open(self, cfg: RunConfig, data: dict | None = None) -> None:
        """Create the directory, or check that it holds a run of the same configuration.
        `data` (input_shape, num_classes) is recorded beside the configuration so that an
        exported ticket can rebuild its model."""
        self.state.mkdir(parents=True, exist_ok=True)
        cfg_path = self.path / "config.json"
        ours = cfg.to_dict()
        if cfg_path.exists():
            theirs = json.loads(cfg_path.read_text()).get("config", {})
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if diff:
                detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:6])
                raise ValueError(
                    f"{self.path} holds a run with a different configuration ({detail}); "
                    "rerun with the same settings to resume it, or choose another --out"
                )
        else:
            meta = {
                "config": ours,
                "lottery_ext": __version__,
                "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if data is not None:
                meta["data"] = data
            atomic_write_bytes(cfg_path, (json.dumps(meta, indent=2) + "\n").encode())
        self._repair()

    def _repair(self) -> None:
        """After a kill: drop a torn last line of results.jsonl, and curves of units whose
        result never landed (curves are written first, results define what is done)."""
        if self.results.exists():
            raw = self.results.read_bytes()
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(self.results, raw[: raw.rfind(b"\n") + 1])
        done = {unit_key(r) for r in read_jsonl(self.results)}
        if self.curves.exists():
            raw = self.curves.read_bytes()
            lines = [ln for ln in raw.splitlines() if ln.strip()]
            keep = []
            for ln in lines:
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if unit_key(row) in done:
                    keep.append(ln)
            fixed = b"".join(ln + b"\n" for ln in keep)
            if fixed != raw:
                atomic_write_bytes(self.curves, fixed)

    def done(self) -> dict[tuple, dict]:
        return {unit_key(r): r for r in read_jsonl(self.results)}

    def append(self, result: dict, curve: dict) -> None:
        for path, row in ((self.curves, curve), (self.results, result)):
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())


def unit_key(row: dict) -> tuple:
    return (row["trial"], row["control"], row["level"])


def default_out_dir(cfg: RunConfig) -> Path:
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return Path("runs") / f"{cfg.preset}-{digest}"


# ---- pieces of a level -----------------------------------------------------------------------


def seed_for(cfg: RunConfig, *parts) -> int:
    """A seed per (trial, purpose, level...), stable across runs and Python versions."""
    text = ":".join(str(p) for p in (cfg.seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def make_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adam":
        return MaskedAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return MaskedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.optimizer == "momentum" else 0.0
    return MaskedSGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: RunConfig, it: int) -> float:
    """Linear warmup over `warmup` iterations, then x0.1 at each milestone."""
    lr = cfg.lr * min(1.0, (it + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    return lr * 0.1 ** sum(it >= m for m in cfg.milestones)


def pruner_recipe(cfg: RunConfig) -> dict:
    """The MagnitudePruner options of a run (also what ``find --dry-run`` shows)."""
    layer_rates = {"conv": cfg.conv_rate} if cfg.conv_rate is not None else None
    return dict(rate=cfg.rate, output_rate=cfg.output_rate, layer_rates=layer_rates,
                scope=cfg.scope)  # fmt: skip


def make_pruner(cfg: RunConfig, model: nn.Module) -> MagnitudePruner:
    return MagnitudePruner(model, **pruner_recipe(cfg))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> tuple:
    """(mean cross-entropy, accuracy) in eval mode; (nan, nan) for an empty split."""
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train(was_training)
    return loss / len(y), correct / len(y)


def weights_remaining(pruner: MagnitudePruner, masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(p.numel() for p in pruner.targets.values())
    return kept / total


def random_masks(
    cfg: RunConfig, ticket_masks: dict[str, torch.Tensor], trial: int, level: int
) -> dict[str, torch.Tensor]:
    """The random-mask control: each tensor keeps as many weights as the ticket, at random."""
    gen = torch.Generator().manual_seed(seed_for(cfg, trial, "random_prune", level))
    out = {}
    for name, m in ticket_masks.items():
        scores = torch.rand(m.shape, generator=gen)
        out[name] = prune_smallest(scores, m.numel() - int(m.sum()))[0].to(m.device)
    return out


# ---- one level of one control: train with early-stopping bookkeeping --------------------------


class Level:
    """Trains `model` (already initialised and masked) for cfg.iterations, evaluating every
    cfg.eval_every iterations; checkpoints to `ckpt_path` every cfg.checkpoint_every."""

    def __init__(
        self,
        cfg: RunConfig,
        data: Dataset,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        unit: dict,
        ckpt_path: Path,
        start_iteration: int = 0,
        on_iteration: Callable[[int], None] | None = None,
    ):
        self.cfg, self.data, self.model, self.opt = cfg, data, model, optimizer
        self.unit, self.ckpt_path = unit, ckpt_path
        self.it = start_iteration
        self.history: list[dict] = []
        self.seconds = 0.0
        seed = seed_for(cfg, unit["trial"], unit["control"], unit["level"])
        self.batches = Batches(len(data.y_train), cfg.batch_size, seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1)
        self.on_iteration = on_iteration
        torch.manual_seed(seed + 2)  # dropout draws from the global generator

    def state_dict(self) -> dict:
        return {
            "unit": [self.unit["trial"], self.unit["control"], self.unit["level"]],
            "iteration": self.it,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "batches": self.batches.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "seconds": self.seconds,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.it = int(sd["iteration"])
        self.model.load_state_dict(sd["model"])
        self.opt.load_state_dict(sd["optimizer"])
        self.batches.load_state_dict(sd["batches"])
        self.aug_gen.set_state(sd["aug_gen"])
        torch.set_rng_state(sd["torch_rng"])
        self.history = list(sd["history"])
        self.seconds = float(sd["seconds"])

    def evaluate_now(self) -> None:
        d = self.data
        val_loss, val_acc = evaluate(self.model, d.x_val, d.y_val)
        test_loss, test_acc = evaluate(self.model, d.x_test, d.y_test)
        self.history.append(dict(iteration=self.it, val_loss=val_loss, val_accuracy=val_acc,
                                 test_loss=test_loss, test_accuracy=test_acc))  # fmt: skip

    def run(self, progress=None) -> None:
        cfg, d, model, opt = self.cfg, self.data, self.model, self.opt
        model.train()
        t0 = time.perf_counter()
        loss_fn = nn.functional.cross_entropy
        while self.it < cfg.iterations:
            lr = lr_at(cfg, self.it)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = self.batches.next()
            xb, yb = d.x_train[idx], d.y_train[idx]
            if cfg.augment:
                xb = augment_cifar(xb, self.aug_gen)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
            self.it += 1
            if self.on_iteration is not None:
                self.on_iteration(self.it)
            if self.it % cfg.eval_every == 0 or self.it == cfg.iterations:
                self.evaluate_now()
            if progress is not None:
                progress.update(1)
            if self.it % cfg.checkpoint_every == 0 and self.it < cfg.iterations:
                self.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                atomic_torch_save(self.state_dict(), self.ckpt_path)
        self.seconds += time.perf_counter() - t0

    def result(self, weights_left: float) -> tuple[dict, dict]:
        d = self.data
        finite = [h for h in self.history if not math.isnan(h["val_loss"])]
        best = min(finite, key=lambda h: h["val_loss"]) if finite else self.history[-1]
        _, train_acc = evaluate(self.model, d.x_train, d.y_train)
        final = self.history[-1]
        result = dict(
            **self.unit,
            weights_remaining=weights_left,
            early_stop_iteration=best["iteration"],
            test_accuracy_at_early_stop=best["test_accuracy"],
            val_loss_at_early_stop=best["val_loss"],
            val_accuracy_at_early_stop=best["val_accuracy"],
            final_test_accuracy=final["test_accuracy"],
            final_train_accuracy=train_acc,
            train_test_gap=train_acc - final["test_accuracy"],
            iterations=self.cfg.iterations,
            seconds=round(self.seconds, 3),
        )
        curve = dict(**self.unit, history=self.history)
        return result, curve


# ---- the experiment ---------------------------------------------------------------------------


class Experiment:
    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, data_dir=None, progress=True,
                 log: Callable[[str], None] = print):  # fmt: skip
        self.cfg, self.data_dir, self.progress, self.log = cfg, data_dir, progress, log
        self.run_dir = RunDir(out_dir)

    def _model(self) -> nn.Module:
        d, cfg = self.data, self.cfg
        model = build_model(cfg.model, input_shape=d.input_shape, num_classes=d.num_classes,
                            dropout=cfg.dropout, hidden=cfg.hidden)  # fmt: skip
        return model.to(self.device)

    def _units(self) -> list[tuple[int, str, int]]:
        cfg = self.cfg
        units = []
        for t in range(cfg.trials):
            for level in range(cfg.rounds + 1):
                units.append((t, "ticket", level))
                if level > 0:
                    units += [(t, c, level) for c in CONTROLS[1:] if c in cfg.controls]
        return units

    def run(self) -> Path:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        # data first: a wrong --data-dir must not leave a run directory behind
        data = load_dataset(cfg.dataset, self.data_dir, val_size=cfg.val_size, seed=cfg.seed)
        self.data = data.to(self.device)
        self.run_dir.open(cfg, {"input_shape": list(data.input_shape),
                                "num_classes": int(data.num_classes)})  # fmt: skip
        done = self.run_dir.done()
        units = self._units()
        todo = [u for u in units if u not in done]
        if not todo:
            (self.run_dir.state / "unit.pt").unlink(missing_ok=True)  # a kill after the last result
            self.log(f"{self.run_dir.path}: all {len(units)} levels already done")
            return self.run_dir.path
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="levels",
                   disable=not self.progress, unit="level")  # fmt: skip
        for trial in range(cfg.trials):
            trial_units = [u for u in todo if u[0] == trial]
            if trial_units:
                self._run_trial(trial, trial_units, bar)
        bar.close()
        return self.run_dir.path

    # -- one trial -----------------------------------------------------------------------------

    def _trial_files(self, trial: int) -> tuple[Path, Callable[[int], Path]]:
        s = self.run_dir.state
        return s / f"trial{trial}_theta.pt", lambda level: s / f"trial{trial}_masks{level}.pt"

    def _run_trial(self, trial: int, todo: list[tuple], bar) -> None:
        cfg = self.cfg
        theta_path, masks_path = self._trial_files(trial)
        model = self._model()
        pruner = make_pruner(cfg, model)
        if theta_path.exists():
            saved = load_checkpoint(theta_path)
            theta0 = Snapshot.from_state_dict(saved["theta0"])
            theta_k = Snapshot.from_state_dict(saved["theta_k"]) if saved["theta_k"] else None
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_for(cfg, trial, "init"))
                init_weights(model, cfg.init)
            theta0, theta_k = snapshot(model), None
            if cfg.rewind_iteration == 0:
                self._save_theta(theta_path, theta0, None)
        for trial_, control, level in todo:
            assert trial_ == trial
            if level == 0:
                masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in pruner.targets.items()}
            else:
                masks = {
                    n: m.to(self.device) for n, m in load_checkpoint(masks_path(level)).items()
                }
            if control == "random_prune":
                masks = random_masks(cfg, masks, trial, level)
            # tickets and random masks of later levels rewind to θk; the dense level starts at θ0
            late = theta_k is not None and control != "reinit" and level > 0
            start = theta_k if late else theta0
            capture_k = control == "ticket" and level == 0 and cfg.rewind_iteration > 0
            self._train_unit(trial, control, level, model, pruner, masks, start, theta0,
                             capture_k, theta_path, masks_path, bar)  # fmt: skip
            if capture_k:
                theta_k = Snapshot.from_state_dict(load_checkpoint(theta_path)["theta_k"])

    def _save_theta(self, path: Path, theta0: Snapshot, theta_k: Snapshot | None) -> None:
        atomic_torch_save({"theta0": theta0.state_dict(),
                           "theta_k": theta_k.state_dict() if theta_k else None}, path)  # fmt: skip

    def _train_unit(self, trial, control, level, model, pruner, masks, start, theta0, capture_k,
                    theta_path, masks_path, bar) -> None:  # fmt: skip
        cfg = self.cfg
        unit = {"trial": trial, "control": control, "level": level}
        ckpt = self.run_dir.state / "unit.pt"
        opt = make_optimizer(cfg, model)
        # Initialise: the ticket and the random mask rewind to θ0 (or θk), which also hands
        # the masks to the optimizer in the same pass; reinit draws fresh weights.
        if control == "reinit":
            reinitialize(model, masks, seed=seed_for(cfg, trial, "reinit", level),
                         init_fn=init_fn(cfg.init), optimizer=opt)  # fmt: skip
        else:
            rewind(model, start, masks, opt)
        start_it = cfg.rewind_iteration if (start is not theta0 and level > 0) else 0

        def capture(it: int) -> None:
            if capture_k and it == cfg.rewind_iteration:
                self._save_theta(theta_path, theta0, snapshot(model, iteration=it))

        lvl = Level(cfg, self.data, model, opt, unit, ckpt, start_it, on_iteration=capture)
        if ckpt.exists():
            sd = load_checkpoint(ckpt)
            if sd["unit"] == [trial, control, level]:
                lvl.load_state_dict(sd)
        from tqdm.auto import tqdm

        inner = tqdm(total=cfg.iterations, initial=lvl.it, leave=False, disable=not self.progress,
                     desc=f"trial {trial} {control} L{level}")  # fmt: skip
        lvl.run(inner)
        inner.close()
        result, curve = lvl.result(weights_remaining(pruner, masks))
        if control == "ticket":
            # Prune now: the next level's masks, and how far kept vs to-be-pruned weights moved.
            pruner.load_state_dict({"masks": masks, "rounds": level})
            next_masks = pruner.compute_masks()
            result.update(self._movement(model, theta0, masks, next_masks))
            if level < cfg.rounds:
                atomic_torch_save(
                    {n: m.cpu() for n, m in next_masks.items()}, masks_path(level + 1)
                )
        self.run_dir.append(result, curve)
        if ckpt.exists():
            ckpt.unlink()
        bar.update(1)
        bar.write(
            f"trial {trial} {control:12s} level {level:2d}: "
            f"{100 * result['weights_remaining']:6.2f}% weights, early stop @ "
            f"{result['early_stop_iteration']:>6d}, test acc "
            f"{100 * result['test_accuracy_at_early_stop']:.2f}%"
        )

    @staticmethod
    @torch.no_grad()
    def _movement(model, theta0: Snapshot, masks, next_masks) -> dict:
        """Mean |w_T - w_0| of the weights the next round keeps vs those it prunes."""
        named = dict(model.named_parameters())
        kept = pruned = 0.0
        n_kept = n_pruned = 0
        for name, m in masks.items():
            move = (named[name].detach() - theta0[name].to(named[name].device)).abs()
            k, p = next_masks[name], m & ~next_masks[name]
            kept += float(move[k].sum())
            n_kept += int(k.sum())
            pruned += float(move[p].sum())
            n_pruned += int(p.sum())
        return {
            "mean_move_kept_next": kept / n_kept if n_kept else None,
            "mean_move_pruned_next": pruned / n_pruned if n_pruned else None,
        }
