"""Op-level tests of torch.ops.lottery_ext.*: torch.library.opcheck, torch.compile, agreement of
the compiled core with the pure-PyTorch reference, and thread-count independence."""

from __future__ import annotations

import shutil

import pytest
import torch

import lottery_ext
from conftest import TOL
from lottery_ext import _ops

pytestmark = pytest.mark.skipif(
    not lottery_ext.build_info()["native"], reason="compiled core not loaded"
)

# torch's default four plus the static-shape AOT check; none needed restricting.
OPCHECK_TESTS = (
    "test_aot_dispatch_static",
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)
SMALL_SHAPES = [(4, 5), (7,), (2, 3, 2), (1,), (0, 3)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, g):
    return torch.randn(shape, generator=g).to(dtype)


def _rand(shape, dtype, g):
    return torch.rand(shape, generator=g).to(dtype)


def _masks(shapes, g, with_masks: bool, every: int = 3):
    """Bool masks (about 30% pruned); with_masks: every `every`-th tensor gets None."""
    if not with_masks:
        return [None] * len(shapes)
    out = []
    for i, s in enumerate(shapes):
        out.append(None if i % every == 1 else torch.rand(s, generator=g) > 0.3)
    return out


def sgd_args(shapes, dtype=torch.float32, with_masks=True, seed=0, momentum=0.9, **hp):
    g = _gen(seed)
    kw = dict(
        params=[_randn(s, dtype, g) for s in shapes],
        grads=[_randn(s, dtype, g) for s in shapes],
        momentum_buffers=[_randn(s, dtype, g) for s in shapes] if momentum != 0 else [],
        masks=_masks(shapes, g, with_masks),
        first=[i % 2 == 0 for i in range(len(shapes))],
        lr=0.1,
        momentum=momentum,
        dampening=0.1,
        weight_decay=0.01,
        nesterov=False,
        maximize=False,
    )
    kw.update(hp)
    return kw


def adam_args(shapes, dtype=torch.float32, with_masks=True, seed=0, amsgrad=False, **hp):
    g = _gen(seed)
    v = [_rand(s, dtype, g) for s in shapes]
    kw = dict(
        params=[_randn(s, dtype, g) for s in shapes],
        grads=[_randn(s, dtype, g) for s in shapes],
        exp_avgs=[_randn(s, dtype, g) * 0.1 for s in shapes],
        exp_avg_sqs=v,
        max_exp_avg_sqs=[x + _rand(x.shape, dtype, g) for x in v] if amsgrad else [],
        masks=_masks(shapes, g, with_masks),
        steps=[torch.tensor(float(3 * i % 7)) for i in range(len(shapes))],
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        amsgrad=amsgrad,
        maximize=False,
        decoupled=False,
    )
    kw.update(hp)
    return kw


def mask_args(shapes, dtype=torch.float32, seed=0):
    g = _gen(seed)
    return dict(
        tensors=[_randn(s, dtype, g) for s in shapes],
        masks=[torch.rand(s, generator=g) > 0.3 for s in shapes],
    )


def clone_args(kw: dict) -> dict:
    return {
        k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v]
        if isinstance(v, list)
        else v
        for k, v in kw.items()
    }


def split(kw: dict) -> tuple[tuple, dict]:
    """(positional arguments, keyword-only hyper-parameters) of a call, for opcheck."""
    kwargs = {k: v for k, v in kw.items() if not isinstance(v, list)}
    return tuple(v for v in kw.values() if isinstance(v, list)), kwargs


MUTATED = {
    "sgd_step": ("params", "momentum_buffers"),
    "adam_step": ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"),
    "apply_mask": ("tensors",),
}


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck


@pytest.mark.parametrize("with_masks", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, dampening=0.0, nesterov=True, maximize=True),
        dict(momentum=0.0, weight_decay=0.0),
    ],
    ids=["momentum", "nesterov", "plain"],
)
def test_opcheck_sgd_step(with_masks, hp):
    kw = sgd_args(SMALL_SHAPES, with_masks=with_masks, **hp)
    torch.library.opcheck(
        torch.ops.lottery_ext.sgd_step_.default, *split(kw), test_utils=OPCHECK_TESTS
    )


@pytest.mark.parametrize("with_masks", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["l2", "decoupled"])
def test_opcheck_adam_step(with_masks, amsgrad, decoupled):
    kw = adam_args(SMALL_SHAPES, with_masks=with_masks, amsgrad=amsgrad, decoupled=decoupled)
    torch.library.opcheck(
        torch.ops.lottery_ext.adam_step_.default, *split(kw), test_utils=OPCHECK_TESTS
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_opcheck_apply_mask(dtype):
    kw = mask_args(SMALL_SHAPES, dtype)
    torch.library.opcheck(
        torch.ops.lottery_ext.apply_mask_.default, *split(kw), test_utils=OPCHECK_TESTS
    )


def test_custom_ops_mutate_in_place_like_the_python_api():
    # the registered op and the python entry point are the same update
    for name, make in [
        ("sgd_step", lambda: sgd_args(SMALL_SHAPES)),
        ("adam_step", lambda: adam_args(SMALL_SHAPES, amsgrad=True)),
        ("apply_mask", lambda: mask_args(SMALL_SHAPES)),
    ]:
        a, b = make(), make()
        getattr(lottery_ext.ops, name)(**a)
        getattr(torch.ops.lottery_ext, name + "_")(**b)
        changed = False
        for key in MUTATED[name]:
            for x, y, orig in zip(a[key], b[key], make()[key]):
                assert torch.equal(x, y), (name, key)
                changed |= not torch.equal(x, orig)
        assert changed, name


@pytest.mark.parametrize("op", _ops.OPS, ids=lambda op: op.__name__)
def test_every_op_is_registered_with_its_kernels(op):
    # one table: the kernels torch.ops dispatches to are the ones eager calls pick
    overload = getattr(torch.ops.lottery_ext, op.name + "_").default
    assert overload is op.overload
    for device_type in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(overload.name(), device_type)
    if lottery_ext._native.core is not None:
        assert op.kernel(torch.device("cpu")) is op.kernels["cpu"]
        with _ops.reference_backend():
            assert op.kernel(torch.device("cpu")) == op._reference
    assert op.kernel(torch.device("meta")) == op._reference


def test_hyper_parameters_are_keyword_only():
    kw = adam_args(SMALL_SHAPES)
    args, hyper = split(kw)
    with pytest.raises(
        TypeError, match=r"adam_step\(\) takes 7 positional arguments .* by keyword"
    ):
        lottery_ext.ops.adam_step(*args, *hyper.values())
    with pytest.raises(TypeError, match="missing required argument.*lr"):
        lottery_ext.ops.adam_step(*args)
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        lottery_ext.ops.adam_step(*args, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="multiple values for argument 'params'"):
        lottery_ext.ops.adam_step(*args, params=args[0], lr=0.1)
    import inspect

    sig = inspect.signature(lottery_ext.ops.adam_step)
    assert sig.parameters["lr"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig.parameters["beta2"].default == 0.999
    # the registered op still takes them by position (inductor's generated code does)
    a, b = adam_args(SMALL_SHAPES), adam_args(SMALL_SHAPES)
    torch.ops.lottery_ext.adam_step_(*a.values())
    lottery_ext.ops.adam_step(*split(b)[0], **split(b)[1])
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))


def test_hyper_parameters_cross_as_named_objects():
    core = lottery_ext._native.core
    if core is None:
        pytest.skip("compiled core not loaded")
    args = core.AdamArgs(**{**_ops.adam_step.defaults, "lr": 0.5})
    assert (args.lr, args.beta1, args.beta2, args.eps) == (0.5, 0.9, 0.999, 1e-8)
    assert "AdamArgs(lr=0.5" in repr(args)
    with pytest.raises(TypeError):
        core.AdamArgs(0.5, 0.9, 0.999, 1e-8, 0.0, False, False, False)  # keyword-only
    with pytest.raises(TypeError):
        core.SgdArgs(lr=0.1)  # every field named: none silently defaulted
    sgd = core.SgdArgs(**{**_ops.sgd_step.defaults, "lr": 1.0})
    assert set(_ops.sgd_step.keywords) == {k for k in dir(sgd) if not k.startswith("_")}


def test_cpu_launcher_leaves_unmasked_tensors_alone():
    # a null mask means "unmasked" on the CPU as on CUDA (it used to be dereferenced)
    core = lottery_ext._native.core
    if core is None:
        pytest.skip("compiled core not loaded")
    a, b = torch.randn(1000), torch.randn(1000)
    before, m = a.clone(), torch.rand(1000) < 0.5
    core.cpu.apply_mask(0, [a.data_ptr(), b.data_ptr()], [0, m.data_ptr()], [1000, 1000],
                        2, -1, 0)  # fmt: skip
    assert torch.equal(a, before) and torch.equal(b == 0, ~m | (b == 0))


# ---------------------------------------------------------------------------------------------
# torch.compile


def _adam_fn(ps, gs, ms, vs, vmaxs, masks, steps):
    torch.ops.lottery_ext.adam_step_(
        ps, gs, ms, vs, vmaxs, masks, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
        weight_decay=0.01, amsgrad=True, maximize=False, decoupled=False,
    )  # fmt: skip
    return ps[0].sum()


def _inductor_available() -> str | None:
    """None if inductor's C++ toolchain looks usable, else why not."""
    try:
        from torch._inductor import cpp_builder

        cxx = cpp_builder.get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - any failure means: no toolchain
        return f"no C++ compiler for inductor: {exc}"
    if shutil.which(cxx) is None and shutil.which(cxx.split()[0]) is None:
        return f"inductor's C++ compiler {cxx!r} not found"
    return None


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_adam_step_matches_eager(backend):
    if backend == "inductor" and (why := _inductor_available()):
        pytest.skip(why)
    shapes = [(4, 5), (7,), (2, 3, 2), (33,)]
    eager = adam_args(shapes, amsgrad=True)
    compiled = clone_args(eager)
    args = lambda kw: (  # noqa: E731
        kw["params"],
        kw["grads"],
        kw["exp_avgs"],
        kw["exp_avg_sqs"],
        kw["max_exp_avg_sqs"],
        kw["masks"],
        kw["steps"],
    )
    torch._dynamo.reset()
    fn = torch.compile(_adam_fn, backend=backend, fullgraph=True)
    try:
        outs = [fn(*args(compiled)) for _ in range(3)]
    except Exception as exc:
        from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

        cause = exc
        while cause is not None:
            if isinstance(cause, (CppCompileError, InvalidCxxCompiler)):
                pytest.skip(f"inductor cannot compile C++ here: {type(cause).__name__}")
            cause = cause.__cause__
        raise
    finally:
        torch._dynamo.reset()
    refs = [_adam_fn(*args(eager)) for _ in range(3)]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for key in MUTATED["adam_step"]:
        for x, y in zip(compiled[key], eager[key]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=key)
    assert [float(s) for s in compiled["steps"]] == [
        float(s) + 3 for s in adam_args(shapes)["steps"]
    ]
    for p, m in zip(compiled["params"], compiled["masks"]):
        if m is not None:
            assert (p[~m] == 0).all()


# ---------------------------------------------------------------------------------------------
# compiled core vs reference

# total > 2 * 32768 (csrc/cpu/parallel.h kMinPerThread): several threads, ranges crossing
# tensor boundaries, tiny and empty tensors in between.
MANY = [(1000,), (0,), (17, 3), (5000,), (1,), (40000,), (63,), (64, 65), (30011,), (2, 0)] + [
    (97 * (i + 1),) for i in range(30)
]
SIZES = {
    "n0": [(0,)],
    "n1": [(1,)],
    "n63": [(63,)],
    "n64": [(64,)],
    "n65": [(65,)],
    "n100003": [(100_003,)],
    "many": MANY,
}
assert sum(torch.Size(s).numel() for s in MANY) > 2 * 32768


@pytest.fixture(params=list(SIZES))
def shapes(request):
    return SIZES[request.param]


def run_native_and_reference(op: str, kw: dict, nsteps: int) -> tuple[dict, dict]:
    native, ref = clone_args(kw), clone_args(kw)
    fn = getattr(lottery_ext.ops, op)
    for k in range(nsteps):
        for a in (native, ref):
            if "first" in a:
                a["first"] = [f and k == 0 for f in kw["first"]]
        fn(**native)
        with _ops.reference_backend():
            assert not _ops.uses_native(torch.device("cpu"))
            fn(**ref)
    assert _ops.uses_native(torch.device("cpu"))
    return native, ref


def check_masked_zeros(op: str, out: dict) -> None:
    masks = out["masks"]
    for key in MUTATED[op]:
        if key == "steps":
            continue
        for t, m in zip(out[key], masks):
            if m is not None:
                assert (t[~m] == 0).all(), key


def compare(op: str, native: dict, ref: dict, dtype, exact=False) -> None:
    for key in MUTATED[op]:
        for i, (x, y) in enumerate(zip(native[key], ref[key])):
            assert x.dtype == y.dtype and x.shape == y.shape
            if exact or key == "steps":
                assert torch.equal(x, y), (key, i)
            else:
                where = f"{key}[{i}]"
                torch.testing.assert_close(x, y, **TOL[dtype], msg=lambda m, w=where: f"{w}: {m}")


def assert_updated(op: str, out: dict, before: dict) -> None:
    """The op did write something (guards against comparing two untouched copies)."""
    if sum(p.numel() for p in before[MUTATED[op][0]]) == 0:
        return
    assert any(
        not torch.equal(x, y)
        for key in MUTATED[op]
        if key != "steps"
        for x, y in zip(out[key], before[key])
    )


# (masks, hyper-parameters): "masked" lists also hold None for every third tensor
SGD_CASES = {
    "momentum-masked": (True, dict(momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "nesterov-maximize-masked": (True, dict(dampening=0.0, nesterov=True, maximize=True)),
    "plain-unmasked": (False, dict(momentum=0.0, weight_decay=0.0)),
    "momentum-unmasked": (False, dict(momentum=0.9, dampening=0.0, weight_decay=0.0)),
}
ADAM_CASES = {
    "adam-masked": (True, dict(amsgrad=False)),
    "amsgrad-maximize-masked": (True, dict(amsgrad=True, maximize=True)),
    "adamw-unmasked": (False, dict(decoupled=True, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_native_matches_reference(dtype, shapes, case):
    with_masks, hp = SGD_CASES[case]
    kw = sgd_args(shapes, dtype, with_masks=with_masks, **hp)
    native, ref = run_native_and_reference("sgd_step", kw, nsteps=2)
    compare("sgd_step", native, ref, dtype)
    check_masked_zeros("sgd_step", native)
    check_masked_zeros("sgd_step", ref)
    assert_updated("sgd_step", native, kw)


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_native_matches_reference(dtype, shapes, case):
    with_masks, hp = ADAM_CASES[case]
    kw = adam_args(shapes, dtype, with_masks=with_masks, **hp)
    native, ref = run_native_and_reference("adam_step", kw, nsteps=2)
    compare("adam_step", native, ref, dtype)
    check_masked_zeros("adam_step", native)
    check_masked_zeros("adam_step", ref)
    assert [float(s) for s in native["steps"]] == [float(s) + 2 for s in kw["steps"]]
    assert_updated("adam_step", native, kw)


def test_apply_mask_native_matches_reference(dtype, shapes):
    kw = mask_args(shapes, dtype)
    native, ref = run_native_and_reference("apply_mask", kw, nsteps=1)
    compare("apply_mask", native, ref, dtype, exact=True)
    for t, m, orig in zip(native["tensors"], kw["masks"], kw["tensors"]):
        assert (t[~m] == 0).all()
        assert torch.equal(t[m], orig[m])


def test_apply_mask_keeps_signed_zero_and_nan():
    # exact: masked-in values are copied bit for bit, pruned ones become +0
    t = torch.tensor([-0.0, float("nan"), float("inf"), 1.5, float("nan"), -2.0])
    m = torch.tensor([True, True, True, False, False, False])
    out = t.clone()
    lottery_ext.ops.apply_mask([out], [m])
    assert torch.equal(out.view(torch.int32)[3:], torch.zeros(3, dtype=torch.int32))
    assert torch.equal(out.view(torch.int32)[:3], t.view(torch.int32)[:3])


# ---------------------------------------------------------------------------------------------
# thread count


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


THREAD_SHAPES = MANY + [(100_003,), (70_000,)]


@pytest.mark.parametrize("op", ["sgd_step", "adam_step", "apply_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_thread_count_does_not_change_results(op, dtype, restore_threads):
    make = {
        "sgd_step": lambda: sgd_args(THREAD_SHAPES, dtype),
        "adam_step": lambda: adam_args(THREAD_SHAPES, dtype, amsgrad=True),
        "apply_mask": lambda: mask_args(THREAD_SHAPES, dtype),
    }[op]
    fn = getattr(lottery_ext.ops, op)
    results = {}
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        assert lottery_ext.build_info()["threads"] == threads
        kw = make()
        for _ in range(2):
            fn(**kw)
        results[threads] = kw
    for threads in (2, 3, 4):
        for key in MUTATED[op]:
            for i, (x, y) in enumerate(zip(results[1][key], results[threads][key])):
                assert torch.equal(x, y), (threads, key, i)
    # and the update did happen
    assert not torch.equal(results[1][MUTATED[op][0]][0], make()[MUTATED[op][0]][0])
