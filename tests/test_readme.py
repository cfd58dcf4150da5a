"""The README's commands and snippets stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_cmd = ci[-1].strip()
    assert "pytest" in test_cmd
    assert test_cmd in README.splitlines(), "the README's test command must be .ci/run's last line"


PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippets_run(index):
    exec(compile(PYTHON_BLOCKS[index], f"README python block {index}", "exec"), {})
