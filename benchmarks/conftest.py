"""Benchmarks run at full size with `pytest benchmarks --benchmark-only`; in a plain
`pytest` run (CI) they are a smoke test at tiny sizes: each benchmarked function runs once
(pytest-benchmark's --benchmark-disable), so no timing tables are printed. `--benchmark-enable`
times the smoke sizes and prints their tables anyway."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.lottery_smoke = not config.getoption("benchmark_only", False)
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads the option.
    if config.lottery_smoke and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return request.config.lottery_smoke


@pytest.fixture(scope="session")
def probe_gbps(smoke) -> float:
    """Memory bandwidth of this run (in-place a += s*b), stored with every benchmark so the
    report can state GB/s as a fraction of it."""
    from benchmarks.harness import bandwidth_probe

    return bandwidth_probe(1 << 16 if smoke else 64 << 20)
