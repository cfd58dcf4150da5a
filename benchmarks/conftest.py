"""Benchmarks run at full size with `pytest benchmarks --benchmark-only`; in a plain
`pytest` run (CI) they are a smoke test at tiny sizes."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.lottery_smoke = not config.getoption("benchmark_only", False)


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    return request.config.lottery_smoke
