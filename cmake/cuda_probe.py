"""Decide LOTTERY_EXT_CUDA=AUTO: are the CUDA kernels worth compiling here?

Run by cmake/cuda.cmake with the build's Python; prints two lines: ``ON`` or ``OFF``, then
the reason (shown in CMake's status line). The rule:

1. torch is installed where this package is being installed: build the kernels if and only
   if that torch has CUDA (``torch.version.cuda`` is set). A CPU or ROCm torch cannot hand
   the kernels a CUDA tensor.
2. torch is not installed yet (``pip install torch .`` builds this package before it installs
   torch): build them if and only if this machine has an NVIDIA driver.

torch is looked up without importing it (importing takes seconds and may initialise CUDA):
its ``torch/version.py`` is read, first on ``sys.path``, then in the interpreter's own
site-packages, which pip's isolated build environment hides from ``sys.path`` but is where the
package will be installed. Only the standard library is used (no torch, no packaging).
"""

from __future__ import annotations

import ctypes
import importlib.util
import runpy
import sysconfig
from pathlib import Path


def torch_version_file(search_paths: list[str] | None = None) -> Path | None:
    """torch/version.py of the torch this build would see, or None if torch is not installed.

    ``search_paths`` (tests) replaces the real lookup."""
    if search_paths is None:
        try:
            spec = importlib.util.find_spec("torch")  # does not import torch
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).with_name("version.py")
            if candidate.is_file():
                return candidate
        paths = sysconfig.get_paths()
        search_paths = [paths["purelib"], paths["platlib"]]
    for site_dir in search_paths:
        candidate = Path(site_dir) / "torch" / "version.py"
        if candidate.is_file():
            return candidate
    return None


def read_torch(version_file: Path) -> tuple[str, str | None]:
    """(torch version, CUDA version or None) from torch/version.py, a file of plain
    assignments written by torch's build."""
    ns = runpy.run_path(str(version_file))
    return str(ns.get("__version__", "?")), ns.get("cuda") or None


def nvidia_driver() -> str | None:
    """Where an NVIDIA driver was found, or None: the kernel module's /proc file (Linux, GPU
    containers included), else the driver library itself (WSL2 has no /proc file). The CUDA
    toolkit's stub is libcuda.so, not libcuda.so.1, so nvcc alone does not count."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        return str(proc)
    try:
        ctypes.CDLL("libcuda.so.1")  # loading it makes no CUDA call
    except OSError:
        return None
    return "libcuda.so.1"


def decide(torch: tuple[str, str | None] | None, driver: str | None) -> tuple[bool, str]:
    """(build the kernels?, why). ``torch`` is (version, cuda version or None), or None when
    torch is not installed; ``driver`` where an NVIDIA driver was found, or None."""
    if torch is not None:
        version, cuda = torch
        if cuda:
            return True, f"torch {version} has CUDA {cuda}"
        why = f"torch {version} has no CUDA"
        if driver:
            why += f" (an NVIDIA driver is present, {driver}: install a CUDA build of torch)"
        return False, why
    if driver:
        return True, f"torch is not installed yet and an NVIDIA driver was found ({driver})"
    return False, "torch is not installed yet and no NVIDIA driver was found"


def main() -> None:
    # An unreadable version.py raises: cuda.cmake then says the probe failed and builds no
    # kernels (LOTTERY_EXT_CUDA=ON still does).
    version_file = torch_version_file()
    on, why = decide(read_torch(version_file) if version_file else None, nvidia_driver())
    print("ON" if on else "OFF")
    print(why)


if __name__ == "__main__":
    main()
