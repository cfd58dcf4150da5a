"""How the package was built and loaded: build_info(), the pure-PyTorch fallback when the
compiled core is disabled, sharing torch's OpenMP runtime, and the build's CUDA switch
(LOTTERY_EXT_CUDA, cmake/cuda.cmake and cmake/cuda_probe.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

import lottery_ext
from lottery_ext import _native


def test_build_info_keys_and_types():
    info = lottery_ext.build_info()
    for key in ("native", "cuda", "cuda_version", "compiler", "threads"):
        assert key in info, key
    assert type(info["native"]) is bool
    assert type(info["cuda"]) is bool
    assert info["cuda_version"] is None or isinstance(info["cuda_version"], str)
    if info["cuda"]:
        major, minor = info["cuda_version"].split(".")
        assert major.isdigit() and minor.isdigit()
    else:
        assert info["cuda_version"] is None
    assert info["threads"] == torch.get_num_threads()
    assert info["version"] == lottery_ext.__version__
    assert info["torch"] == torch.__version__


def test_build_info_native_in_this_install():
    info = lottery_ext.build_info()
    assert info["native"] is True, info["native_error"]
    assert info["native_error"] is None
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["compiler"].split()[0] in ("gcc", "clang", "unknown")
    assert isinstance(info["cpu_flags"], str)


def test_build_info_threads_follow_torch():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert lottery_ext.build_info()["threads"] == 1
        torch.set_num_threads(3)
        assert lottery_ext.build_info()["threads"] == 3
    finally:
        torch.set_num_threads(n)


def test_compiled_module_is_loaded_from_the_package():
    core = _native.core
    assert core is not None
    assert core.__name__ == "lottery_ext._core"
    origin = Path(core.__file__).resolve()
    package_dirs = {Path(p).resolve() for p in lottery_ext.__path__}
    assert origin.parent in package_dirs, (origin, package_dirs)
    assert sys.modules["lottery_ext._core"] is core


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import lottery_ext
        from lottery_ext import _ops

    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    info = lottery_ext.build_info()

    torch.manual_seed(0)
    w0 = torch.randn(6, 5)
    grads = [torch.randn(6, 5) for _ in range(4)]
    mask = torch.rand(6, 5) > 0.4

    p = torch.nn.Parameter(w0.clone())
    opt = lottery_ext.MaskedAdam([p], lr=0.05, masks={p: mask})
    q = torch.nn.Parameter(w0.clone())
    ref = torch.optim.Adam([q], lr=0.05)
    for g in grads:
        p.grad = g.clone()
        q.grad = g * mask
        opt.step()
        ref.step()

    st = opt.state[p]
    print(json.dumps({
        "native": info["native"],
        "native_error": info["native_error"],
        "uses_native": _ops.uses_native(torch.device("cpu")),
        "runtime_warnings": [str(w.message) for w in runtime],
        "pruned_zero": all(
            bool((t[~mask] == 0).all()) for t in (p.detach(), st["exp_avg"], st["exp_avg_sq"])
        ),
        "max_diff_kept": float((p.detach() - q.detach())[mask].abs().max()),
        "moved": float((p.detach() - w0)[mask].abs().max()),
        "step": float(st["step"]),
    }))
    """
)


def test_fallback_without_native_core(tmp_path):
    env = dict(os.environ, LOTTERY_EXT_DISABLE_NATIVE="1")
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", FALLBACK_SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["native"] is False
    assert out["uses_native"] is False
    assert "LOTTERY_EXT_DISABLE_NATIVE" in out["native_error"]
    warned = out["runtime_warnings"]
    assert len(warned) == 1, warned
    assert "reference path" in warned[0] and "compiled core not loaded" in warned[0]
    assert out["pruned_zero"] is True
    assert out["moved"] > 1e-3  # the surviving entries did train
    assert out["max_diff_kept"] <= 1e-6
    assert out["step"] == 4.0


def test_native_disable_env_zero_keeps_native(tmp_path):
    env = dict(os.environ, LOTTERY_EXT_DISABLE_NATIVE="0")
    code = (
        "import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
        "import lottery_ext; assert lottery_ext.build_info()['native'] is True; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _gomp_paths(maps: str) -> set[str]:
    paths = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "libgomp" in os.path.basename(fields[5]):
            paths.add(os.path.realpath(fields[5].strip()))
    return paths


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux only")
def test_one_openmp_runtime_shared_with_torch(tmp_path):
    # A fresh process: exactly torch + lottery_ext, nothing else the test session loaded.
    code = (
        "import json, torch\n"
        "before = open('/proc/self/maps').read()\n"
        "import lottery_ext\n"
        "assert lottery_ext.build_info()['native']\n"
        "import torch.nn\n"
        "print(json.dumps([before, open('/proc/self/maps').read()]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    torch_gomp = _gomp_paths(before)
    if not torch_gomp:
        pytest.skip("torch does not load libgomp here")
    assert _gomp_paths(after) == torch_gomp
    assert len(_gomp_paths(after)) == 1
    assert any("_core" in line and "lottery_ext" in line for line in after.splitlines())


def test_cuda_tensors_without_cuda_kernels_say_how_to_rebuild(monkeypatch):
    from lottery_ext import _native, _ops

    monkeypatch.setattr(_native, "cuda", False)
    with pytest.raises(RuntimeError, match=r"LOTTERY_EXT_CUDA=ON pip install"):
        _ops.uses_native(torch.device("cuda", 0))
    # the pure-PyTorch path stays available for such tensors
    with _ops.reference_backend():
        assert not _ops.uses_native(torch.device("cuda", 0))


def test_build_info_cuda_matches_the_compiled_module():
    from lottery_ext import _native

    info = lottery_ext.build_info()
    assert info["cuda"] is _native.cuda
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_architectures"]
        assert _native.cuda_max_histogram_bits >= 11  # the GPU radix passes use 11-bit digits


# --- The CUDA switch: LOTTERY_EXT_CUDA = AUTO | ON | OFF (cmake/cuda.cmake) ------------------
# Configure-only runs of a stub project that includes just cmake/cuda.cmake: no compiler, no
# pybind11 (not installed in the test venv), a fraction of a second unless nvcc is probed.

CMAKE_DIR = Path(__file__).resolve().parents[1] / "cmake"
needs_source = pytest.mark.skipif(
    not (CMAKE_DIR / "cuda.cmake").is_file(), reason="needs the source tree's cmake/"
)


def _cmake() -> str | None:
    """cmake >= 3.24 (the project's minimum), or None."""
    exe = shutil.which("cmake")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    return exe if m and (int(m[1]), int(m[2])) >= (3, 24) else None


needs_cmake = pytest.mark.skipif(_cmake() is None, reason="needs cmake >= 3.24 on PATH")


def _probe():
    spec = importlib.util.spec_from_file_location("cuda_probe", CMAKE_DIR / "cuda_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configure_cuda_switch(tmp_path, *args: str, **env: str) -> tuple[int, str]:
    """(exit code, output with CMake's line wrapping undone) of a configure of a stub project
    that includes cmake/cuda.cmake. ``env`` is added to an environment without LOTTERY_EXT_*."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.24)\n"
        "project(cuda_switch LANGUAGES NONE)\n"
        f'list(APPEND CMAKE_MODULE_PATH "{CMAKE_DIR.as_posix()}")\n'
        "include(cuda)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOTTERY_EXT_")}
    proc = subprocess.run(
        [_cmake(), "-S", src, "-B", tmp_path / "build", f"-DPython_EXECUTABLE={sys.executable}",
         *args],
        capture_output=True, text=True, env={**clean, **env}, timeout=300,
    )  # fmt: skip
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


def _status(out: str) -> str:
    """The one status line cuda.cmake prints, e.g. 'CUDA kernels OFF: LOTTERY_EXT_CUDA=OFF'."""
    lines = re.findall(r"-- lottery_ext: (CUDA kernels .*?)(?= -- |$)", out)
    assert len(lines) == 1, out
    return lines[0]


@needs_source
@needs_cmake
def test_cuda_off_never_looks_for_nvcc(tmp_path):
    rc, out = configure_cuda_switch(tmp_path, "-DLOTTERY_EXT_CUDA=OFF")
    assert rc == 0, out
    assert _status(out) == "CUDA kernels OFF: LOTTERY_EXT_CUDA=OFF"
    assert "Looking for a CUDA compiler" not in out


@needs_source
@needs_cmake
@pytest.mark.parametrize("how", ["-DLOTTERY_EXT_CUDA=AUTO", "unset"])
def test_cuda_auto_follows_the_installed_torch(tmp_path, how):
    """AUTO (the default) builds the kernels only for a torch with CUDA: this torch decides,
    as the probe reads it from torch/version.py without importing torch."""
    rc, out = configure_cuda_switch(tmp_path, *([how] if how != "unset" else []))
    assert rc == 0, out
    if torch.version.cuda is None:
        status = _status(out)
        assert status.startswith(f"CUDA kernels OFF: torch {torch.__version__} has no CUDA"), out
        assert status.endswith("; set LOTTERY_EXT_CUDA=ON to build them anyway"), out
        assert "Looking for a CUDA compiler" not in out  # nvcc not even probed: fast
    elif shutil.which("nvcc") or os.environ.get("CUDACXX"):
        assert _status(out).startswith(f"CUDA kernels ON: torch {torch.__version__} has CUDA "), out
    else:  # kernels this torch could use, but nothing to compile them: a warning
        assert "CUDA kernels OFF" in out and "but no CUDA compiler was found" in out, out


@needs_source
@needs_cmake
def test_cuda_auto_with_a_broken_torch_builds_no_kernels_and_says_why(tmp_path):
    broken = tmp_path / "broken"
    (broken / "torch").mkdir(parents=True)
    (broken / "torch" / "__init__.py").write_text("")
    (broken / "torch" / "version.py").write_text("raise RuntimeError('half-installed')\n")
    rc, out = configure_cuda_switch(tmp_path, PYTHONPATH=str(broken))
    assert rc == 0, out
    assert _status(out) == (
        "CUDA kernels OFF: cmake/cuda_probe.py failed (1: RuntimeError: half-installed); "
        "set LOTTERY_EXT_CUDA=ON to build them anyway"
    )


@needs_source
@needs_cmake
def test_cuda_switch_from_the_environment_any_case(tmp_path):
    rc, out = configure_cuda_switch(tmp_path, LOTTERY_EXT_CUDA="off")
    assert rc == 0, out
    assert _status(out) == "CUDA kernels OFF: LOTTERY_EXT_CUDA=OFF"


@needs_source
@needs_cmake
def test_cuda_switch_refuses_other_values(tmp_path):
    rc, out = configure_cuda_switch(tmp_path, "-DLOTTERY_EXT_CUDA=yes")
    assert rc != 0
    assert "LOTTERY_EXT_CUDA must be AUTO, ON or OFF, not 'YES'" in out


@needs_source
@needs_cmake
def test_cuda_on_without_a_compiler_fails_and_says_how_to_fix(tmp_path):
    rc, out = configure_cuda_switch(
        tmp_path, "-DLOTTERY_EXT_CUDA=ON", CUDACXX=str(tmp_path / "no-such-nvcc")
    )
    assert rc != 0
    assert "LOTTERY_EXT_CUDA=ON but no CUDA compiler was found" in out
    assert "set CUDACXX=/path/to/nvcc" in out and "LOTTERY_EXT_CUDA=OFF pip install ." in out


@needs_source
@needs_cmake
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH (no GPU needed)")
def test_cuda_on_enables_cuda_with_nvcc(tmp_path):
    # ~10 s on 2 cores: CMake's checks of nvcc (no GPU needed)
    rc, out = configure_cuda_switch(tmp_path, "-DLOTTERY_EXT_CUDA=ON")
    assert rc == 0, out
    status = _status(out)
    assert status.startswith("CUDA kernels ON: LOTTERY_EXT_CUDA=ON (nvcc "), status
    assert "archs 80-real;86-real;89-real;90" in status


@needs_source
@needs_cmake
def test_project_configure_prints_the_cuda_decision_once(tmp_path):
    """The real CMakeLists.txt (Python found before cmake/cuda.cmake runs it); configure only."""
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 is a build requirement only")
    proc = subprocess.run(
        [_cmake(), "-S", CMAKE_DIR.parent, "-B", tmp_path / "build", "-DLOTTERY_EXT_CUDA=AUTO",
         f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, out
    assert _status(out).startswith("CUDA kernels "), out


@needs_source
@pytest.mark.parametrize(
    "torch_seen, driver, on, why",
    [
        (("2.5.1+cu124", "12.4"), None, True, "torch 2.5.1+cu124 has CUDA 12.4"),
        (("2.13.0+cpu", None), None, False, "torch 2.13.0+cpu has no CUDA"),
        (("2.13.0+cpu", None), "/proc/driver/nvidia/version", False,
         "torch 2.13.0+cpu has no CUDA (an NVIDIA driver is present, "
         "/proc/driver/nvidia/version: install a CUDA build of torch)"),
        (None, "libcuda.so.1", True,
         "torch is not installed yet and an NVIDIA driver was found (libcuda.so.1)"),
        (None, None, False, "torch is not installed yet and no NVIDIA driver was found"),
    ],
)  # fmt: skip
def test_cuda_probe_rule(torch_seen, driver, on, why):
    """The installed torch decides; only without one (``pip install torch .`` builds this
    package before it installs torch) does an NVIDIA driver."""
    assert _probe().decide(torch_seen, driver) == (on, why)


@needs_source
def test_cuda_probe_reads_torch_version_file_without_importing_torch(tmp_path):
    probe = _probe()
    site = tmp_path / "site-packages"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "version.py").write_text(
        "from typing import Optional\n__version__ = '2.5.1+cu124'\n"
        "cuda: Optional[str] = '12.4'\nhip: Optional[str] = None\n"
    )
    found = probe.torch_version_file([str(tmp_path / "empty"), str(site)])
    assert found == site / "torch" / "version.py"
    assert probe.read_torch(found) == ("2.5.1+cu124", "12.4")
    assert probe.torch_version_file([str(tmp_path / "empty")]) is None


@needs_source
def test_cuda_probe_finds_torch_hidden_by_an_isolated_build(tmp_path):
    """pip's isolated build environment takes this interpreter's site-packages off sys.path;
    the probe still finds the torch installed there (where this package will be installed)."""
    site_dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    torch_dir = Path(torch.__file__).resolve().parent.parent
    if not any(torch_dir == Path(d).resolve() for d in site_dirs):
        pytest.skip("torch is not installed in this interpreter's site-packages")
    code = (
        "import runpy, sys, sysconfig\n"
        "hidden = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}\n"
        "sys.path[:] = [p for p in sys.path if p not in hidden]\n"
        "import importlib.util; assert importlib.util.find_spec('torch') is None\n"
        f"runpy.run_path({str(CMAKE_DIR / 'cuda_probe.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    decision, why = proc.stdout.splitlines()
    assert why.startswith(f"torch {torch.__version__} has "), why
    assert decision == ("ON" if torch.version.cuda else "OFF")
