"""Loads the compiled core (``lottery_ext._core``) once, or records why it could not.

If the extension is missing or broken the package still imports: it warns once and every op
runs on the pure-PyTorch reference (``_reference.py``). ``LOTTERY_EXT_DISABLE_NATIVE=1``
forces that path (used by the tests of the fallback).
"""

from __future__ import annotations

import os
import warnings

core = None
load_error: str | None = None

if os.environ.get("LOTTERY_EXT_DISABLE_NATIVE", "") not in ("", "0"):
    load_error = "disabled by LOTTERY_EXT_DISABLE_NATIVE"
else:
    try:
        from . import _core as core  # noqa: F811
    except ImportError as exc:  # pragma: no cover - exercised via a subprocess test
        load_error = f"{type(exc).__name__}: {exc}"

# CUDA kernels compiled in (LOTTERY_EXT_CUDA=ON, or AUTO: see cmake/cuda.cmake)
cuda = core is not None and bool(core.build_config()["cuda"])
# widest radix digit the GPU histogram takes (shared-memory histograms)
cuda_max_histogram_bits = core.build_config().get("cuda_max_histogram_bits", 0) if cuda else 0

if core is None:
    warnings.warn(
        f"lottery_ext: compiled core not loaded ({load_error}); "
        "running on the pure-PyTorch reference path (slower). Reinstall with `pip install .`.",
        RuntimeWarning,
        stacklevel=2,
    )
