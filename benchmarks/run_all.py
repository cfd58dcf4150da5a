"""Run every interleaved benchmark and write benchmarks/RESULTS.md (the figures the README
quotes) plus benchmarks/scaling.png. Takes ~15 minutes on 2 cores; run it on a quiet machine.

python -m benchmarks.run_all
"""

from __future__ import annotations

import contextlib
import io
import platform
import subprocess
import time
from pathlib import Path

import torch

import lottery_ext as lx

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} vCPU"
    except (OSError, subprocess.CalledProcessError, KeyError):
        return platform.processor() or platform.machine()


def capture(fn) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue().rstrip()


def kept_sections(path: Path) -> list[str]:
    """The hand-written sections of the previous RESULTS.md (a title ending in "(issue N),
    <date>": figures measured by other means, e.g. farm-bench), kept after the tables."""
    if not path.exists():
        return []
    out, keep = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            keep = "(issue " in line
        if keep:
            out.append(line)
    return out + [""] if out else []


def main() -> None:
    from benchmarks import (
        bench_dispatch,
        bench_optim,
        bench_rewind,
        bench_threshold,
        bench_train_loop,
        scaling,
    )

    t0 = time.time()
    info = lx.build_info()
    sections = [
        "# Benchmark results",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()}; torch {torch.__version__}; "
        f"{torch.get_num_threads()} threads; lottery_ext {info['version']} built with "
        f"{info['compiler']} ({info['cpu_flags']}). Every table is one run of "
        "`python -m benchmarks.run_all`: candidates and baselines interleaved round-robin with "
        "a cache flush before each call; medians. This machine's bandwidth swings ~2x from "
        "minute to minute: compare ratios within a table, not absolute times across tables.",
    ]
    for title, mod in (
        ("Masked optimizer step", bench_optim),
        ("Exact k-th smallest magnitude and pruning masks", bench_threshold),
        ("Rewind + optimizer state reset", bench_rewind),
        ("LeNet-300-100 training loop", bench_train_loop),
        ("Call paths into the ops (per call, no cache flush)", bench_dispatch),
    ):
        print(f"== {title}", flush=True)
        text = capture(mod.main)
        print(text, flush=True)
        sections += ["", f"## {title}", "", text]
    print("== scaling", flush=True)
    scaling_text = capture(lambda: scaling.main())
    sections += ["", "## Scaling (time vs N, log-log)", "", "![scaling](scaling.png)", "",
                 "```", scaling_text, "```"]  # fmt: skip
    sections += ["", f"(total benchmark time {(time.time() - t0) / 60:.1f} min)", ""]
    sections += kept_sections(HERE / "RESULTS.md")
    (HERE / "RESULTS.md").write_text("\n".join(sections))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
