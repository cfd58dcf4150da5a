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
    code = PYTHON_BLOCKS[index]
    if "init_process_group" in code:
        # a process group of its own: in this process, a DDP reducer freed after the group
        # can deadlock gloo's teardown against the GIL (torch), and the group would outlive
        # the snippet
        import subprocess
        import sys

        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        return
    exec(compile(code, f"README python block {index}", "exec"), {})


@pytest.mark.slow
def test_default_run_reproduces_the_readme_table(tmp_path, capsys):
    """`lottery-ext find` on its default (about 2 minutes here): the table rows the README
    prints come out again, to the digit (the same seed gives the same results)."""
    import torch

    from lottery_ext.cli import main

    block = README.split("its table ends with", 1)[1].split("```", 2)[1]
    rows = [ln for ln in block.splitlines() if ln.strip() and ln.strip()[0].isdigit()]
    assert len(rows) >= 3
    threads = torch.get_num_threads()
    try:
        assert main(["find", "--out", str(tmp_path / "run"), "--no-progress", "--no-plots"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    for row in rows:
        assert row in printed, row
