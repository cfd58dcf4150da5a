"""How the package was built and loaded: build_info(), the pure-PyTorch fallback when the
compiled core is disabled, and sharing torch's OpenMP runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
