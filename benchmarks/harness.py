"""Side-by-side timing: this machine's memory bandwidth swings ~2x from minute to minute, so
candidates and baselines are timed interleaved, round-robin, each round after a cache flush,
and only ratios within one run are reported."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

_FLUSH: list[torch.Tensor] = []


def flush_caches(nbytes: int = 1 << 30) -> None:
    """Touch `nbytes` of unrelated memory so the next kernel starts from DRAM, not L3."""
    if not _FLUSH:
        _FLUSH.append(torch.ones(nbytes // 4))
    _FLUSH[0].add_(1.0)


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 2, flush: bool = True
) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (rotating the order)."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            if flush:
                flush_caches()
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bandwidth_probe(n: int = 64 << 20) -> float:
    """GB/s of an in-place `a += s*b` over arrays far larger than the LLC (12 bytes/element:
    read a, b; write a), measured now, in this process, with torch's threads."""
    a, b = torch.ones(n), torch.ones(n)
    t = interleaved({"probe": lambda: a.add_(b, alpha=0.5)}, rounds=7, warmup=1)["probe"]
    return 12 * n / t / 1e9


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory `fn` adds on top of what is already allocated (Linux: resets the
    VmHWM high-water mark through /proc/self/clear_refs). None where that is unavailable."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kib("VmRSS")
        fn()
        peak = _proc_status_kib("VmHWM")
    except OSError:
        return None
    return max(0, peak - base) * 1024
