"""How big a search is and roughly how long it takes here: the units and iterations it
trains, a training step timed on random data of the preset's shape (``lottery-ext presets``),
and the time that implies. ``progress`` measures the real thing while a search runs."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .controls import REGISTRY
from .presets import RunConfig
from .schedule import Unit, units

# Per data set: input shape, classes, training and test examples (as ``data.load_dataset``
# builds them; checked by tests/test_estimate.py).
DATA_SHAPES = {
    "mnist1d": ((40,), 10, 4000, 1000),
    "mnist": ((1, 28, 28), 10, 60000, 10000),
    "fashion-mnist": ((1, 28, 28), 10, 60000, 10000),
    "cifar10": ((3, 32, 32), 10, 50000, 10000),
}


def unit_iterations(cfg: RunConfig, unit: Unit) -> int:
    """Iterations `unit` trains: all of them, or from k on for a unit rewound to θk."""
    trial, control, level = unit
    late = cfg.rewind_iteration > 0 and level > 0 and REGISTRY[control].late_rewind
    return cfg.iterations - (cfg.rewind_iteration if late else 0)


def search_iterations(cfg: RunConfig) -> int:
    return sum(unit_iterations(cfg, u) for u in units(cfg))


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 05 min', '2 d 4 h'."""
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 90 * 60:
        return f"{round(s / 60)} min"
    h, m = divmod(round(s / 60), 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h} h"


def format_step(seconds: float) -> str:
    """'3.2 ms', '480 ms', '1.53 s'."""
    return f"{1000 * seconds:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def eval_examples(cfg: RunConfig) -> int:
    """Examples one evaluation runs through (validation and test split)."""
    from .data import _DEFAULT_VAL

    _, _, n_train, n_test = DATA_SHAPES[cfg.dataset]
    if cfg.val_size is not None:
        return cfg.val_size + n_test
    # load_dataset's defaults: 10% of mnist1d's training set, else its table
    return (n_train // 10 if cfg.dataset == "mnist1d" else _DEFAULT_VAL[cfg.dataset]) + n_test


def rough_seconds(cfg: RunConfig, step_seconds: float) -> float:
    """The whole search: every unit's training steps, plus its evaluations (a forward pass
    costs about a third of a training step per example) and its final training-set pass."""
    per_example = step_seconds / (3 * cfg.batch_size)
    n_train = DATA_SHAPES[cfg.dataset][2]
    total = 0.0
    for u in units(cfg):
        its = unit_iterations(cfg, u)
        evals = -(-its // cfg.eval_every)
        total += its * step_seconds + (evals * eval_examples(cfg) + n_train) * per_example
    return total


def measure_step(cfg: RunConfig, min_seconds: float = 0.5, max_steps: int = 8) -> float:
    """Seconds per training step of `cfg`'s model and optimizer on a random batch: one step
    to warm up, then at least two timed ones (until `min_seconds` or `max_steps`); the
    fastest, as the one least disturbed by whatever else the machine is doing."""
    from .models import build_model
    from .training import optimizer_for

    shape, classes, _, _ = DATA_SHAPES[cfg.dataset]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hidden = tuple(cfg.hidden) if cfg.hidden else None
        model = build_model(cfg.model, input_shape=shape, num_classes=classes,
                            dropout=cfg.dropout, hidden=hidden)  # fmt: skip
        opt = optimizer_for(cfg, model.parameters())
        x = torch.randn(cfg.batch_size, *shape)
        y = torch.randint(0, classes, (cfg.batch_size,))
        times: list[float] = []
        t_start = time.perf_counter()
        for _ in range(max_steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            if len(times) >= 3 and time.perf_counter() - t_start >= min_seconds:
                break
        return min(times[1:])


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lottery_ext" / "step_times.json"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|{torch.get_num_threads()} threads|torch {torch.__version__}"


def cached_step_seconds(cfg: RunConfig) -> float:
    """``measure_step`` remembered per recipe and machine (threads, torch) in the user's
    cache directory, so that listing the presets is instant after the first time. A cache
    that cannot be read or written is ignored."""
    key = json.dumps([_machine(), cfg.model, cfg.dataset, cfg.optimizer, cfg.batch_size,
                      cfg.hidden, cfg.dropout])  # fmt: skip
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    value = cache.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    seconds = measure_step(cfg)
    cache[key] = seconds
    try:
        from .rundir import atomic_write_bytes

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(cache, indent=1).encode())
    except OSError:
        pass
    return seconds


def preset_size(cfg: RunConfig, timed: bool = True) -> str:
    """One line: weights, units, iterations and (`timed`) a rough time on this machine."""
    from .models import build_model

    shape, classes, _, _ = DATA_SHAPES[cfg.dataset]
    hidden = tuple(cfg.hidden) if cfg.hidden else None
    with torch.device("meta"):  # counted, never allocated
        model = build_model(cfg.model, input_shape=shape, num_classes=classes,
                            dropout=cfg.dropout, hidden=hidden)  # fmt: skip
    weights = sum(p.numel() for p in model.parameters())
    its = search_iterations(cfg)
    line = f"size: {weights:,} weights; {len(units(cfg))} units, {its / 1e6:.3g} M iterations"
    if timed:
        step = cached_step_seconds(cfg)
        line += (f"; about {format_duration(rough_seconds(cfg, step))} in one process here "
                 f"({format_step(step)} per step, {torch.get_num_threads()} threads)")  # fmt: skip
    return line
