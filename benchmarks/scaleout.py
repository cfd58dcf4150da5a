"""Scaling the search beyond this machine, on paper: the DAG of units of a preset, its
critical path, and the makespan of the driver's scheduling (ready units, tickets first) for
1, 4, 16, 64 workers from measured unit times; plus Ray's per-task overhead measured here.

    python benchmarks/scaleout.py [--preset lenet300-mnist] [--trials 5] [--rounds 20]
        [--unit-seconds S]     # measured time of one unit (default: measure a short unit)
        [--ray]                # also measure Ray's per-task overhead on a local instance
"""

from __future__ import annotations

import argparse
import heapq
import time

from lottery_ext.experiments.estimate import format_duration, measure_step, unit_iterations
from lottery_ext.experiments.presets import PRESETS, RunConfig
from lottery_ext.experiments.schedule import needs, units


def makespan(cfg: RunConfig, workers: int, seconds: dict, overhead: float = 0.0) -> float:
    """List scheduling as the driver does it with workers: whenever a worker is free, the
    first ready unit (tickets before controls, then serial order) starts."""
    order = units(cfg)
    rank = {u: (u.control != "ticket", i) for i, u in enumerate(order)}
    done_at: dict = {}
    running: list = []  # (finish time, unit)
    pending = set(order)
    now = 0.0
    while pending or running:
        ready = sorted((u for u in pending if all(n in done_at for n in needs(u))), key=rank.get)
        while ready and len(running) < workers:
            u = ready.pop(0)
            pending.remove(u)
            heapq.heappush(running, (now + seconds[u] + overhead, u))
        now, u = heapq.heappop(running)
        done_at[u] = now
    return now


def critical_path(cfg: RunConfig, seconds: dict) -> float:
    longest: dict = {}
    for u in units(cfg):  # serial order is a topological order
        longest[u] = seconds[u] + max((longest[n] for n in needs(u)), default=0.0)
    return max(longest.values())


def ray_overhead(n: int = 200) -> float:
    """Seconds per trivial Ray task, submitted and collected in a batch on a local instance."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        noop = ray.remote(num_cpus=1)(lambda: None)
        ray.get([noop.remote() for _ in range(10)])  # workers up
        t0 = time.perf_counter()
        ray.get([noop.remote() for _ in range(n)])
        return (time.perf_counter() - t0) / n * 2  # two tasks run at once on 2 CPUs
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lenet300-mnist")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--unit-seconds", type=float,
                    help="seconds of one full unit (default: timed step x iterations)")  # fmt: skip
    ap.add_argument("--ray", action="store_true")
    args = ap.parse_args()
    cfg = RunConfig.from_preset(PRESETS[args.preset], trials=args.trials, rounds=args.rounds)
    if args.unit_seconds is None:
        step = measure_step(cfg)
        per_it = step * 1.3  # evaluation every 100 iterations adds about 30% (measured LeNet)
        print(f"measured {1000 * step:.3g} ms per training step")
    else:
        per_it = args.unit_seconds / cfg.iterations
    seconds = {u: unit_iterations(cfg, u) * per_it for u in units(cfg)}
    total, path = sum(seconds.values()), critical_path(cfg, seconds)
    overhead = ray_overhead() if args.ray else 0.0
    print(
        f"{args.preset}: {len(seconds)} units, {format_duration(total)} in one process; "
        f"critical path {format_duration(path)} (bound on the speed-up: {total / path:.1f}x)"
    )
    if args.ray:
        print(f"Ray per-task overhead measured here: {1000 * overhead:.2f} ms")
    print(
        f"{'workers':>8} {'makespan':>12} {'speed-up':>9} {'ideal':>6}"
        + (f" {'with Ray overhead':>18}" if args.ray else "")
    )
    for w in (1, 4, 16, 64):
        m = makespan(cfg, w, seconds)
        line = f"{w:>8} {format_duration(m):>12} {total / m:>8.2f}x {min(w, total / path):>5.1f}x"
        if args.ray:
            line += f" {total / makespan(cfg, w, seconds, overhead):>17.2f}x"
        print(line)


if __name__ == "__main__":
    main()
