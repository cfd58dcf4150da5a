"""The ops, each defined once: its schema, its kernels, its validation. Registered as
``torch.ops.lottery_ext.<name>_`` and callable as ``lottery_ext.ops.<name>``.

Each op has three kernels, and every one of them first runs the op's checks
(``_validate.<name>``; a few attribute reads when the inputs are plain contiguous tensors):
- ``"cpu"``: the compiled CPU launcher (``_core.cpu.<name>``);
- ``"cuda"``: the compiled CUDA launcher (``_core.cuda.<name>``), on the caller's stream; with a
  build without CUDA kernels it raises, saying how to rebuild;
- the default kernel (any other device, a package without its compiled core, or inside
  ``reference_backend()``): the pure-PyTorch reference (``_reference``).
The cpu/cuda kernels are registered with ``torch.library.register_kernel`` and the default as
the op's own function, so ``torch.compile`` and ``torch.ops`` calls reach the same kernels.
Eager calls (``lottery_ext.ops.<name>``: the optimizers, the pruner, rewind) pick the kernel
from the same table without the dispatcher, whose boxing of tensor lists costs about 30 us
per call of six parameters (a fifth of a LeNet-300-100 Adam step; README, "One op contract").

Hyper-parameters are keyword-only (as in ``torch.optim.adam``'s functional form) and cross
into the core as one named object (``_core.SgdArgs``, ``_core.AdamArgs``) built from the
schema's own names: the schema strings below are the only Python spelling of them.

``torch.ops.lottery_ext.kth_smallest_magnitude`` is registered beside its kernel, in
``pruning/threshold.py`` (it is built on these ops).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch

from . import _native, _reference, _validate
from ._radix import DTYPE_CODES

Tensor = torch.Tensor
_force_reference = False


@contextlib.contextmanager
def reference_backend() -> Iterator[None]:
    """Run every op on the pure-PyTorch reference inside this block (tests, debugging)."""
    global _force_reference
    old, _force_reference = _force_reference, True
    try:
        yield
    finally:
        _force_reference = old


def _no_cuda_kernels(*_args, **_kwargs) -> None:
    raise RuntimeError(
        "lottery_ext was built without CUDA kernels but got CUDA tensors. Rebuild with a "
        "CUDA compiler on PATH: `LOTTERY_EXT_CUDA=ON pip install --no-build-isolation "
        "--force-reinstall .` (or run on the pure-PyTorch path inside "
        "`lottery_ext.ops.reference_backend()`)"
    )


def uses_native(device: torch.device) -> bool:
    """Whether ops on `device` run on compiled kernels (else on ``_reference``): what the
    kernel table says. CUDA tensors with a build without CUDA kernels raise (rather than
    silently running the slow reference), saying how to rebuild."""
    kernel = apply_mask.kernel(device)
    if kernel is _no_cuda_kernels:
        _no_cuda_kernels()
    return kernel != apply_mask._reference


def _where(device: torch.device) -> tuple[int, int, int]:
    """(threads, device index, stream) of a launch: the CPU's torch thread count; on CUDA
    the tensors' device and the caller's current stream on it."""
    if device.type == "cpu":
        return torch.get_num_threads(), -1, 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 0, index, torch.cuda.current_stream(index).cuda_stream


def _ptrs(tensors: Sequence[Tensor | None]) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


def _numels(tensors: Sequence[Tensor]) -> list[int]:
    return [t.numel() for t in tensors]


def _bump(*lists: Sequence[Tensor | None]) -> None:
    """Tell autograd that the native kernels wrote these tensors, as torch's in-place ops
    do: a tensor saved for backward and changed since then raises torch's "modified by an
    inplace operation" error instead of being used stale."""
    torch.autograd.graph.increment_version([t for ts in lists for t in ts if t is not None])


def group_by_device_dtype(
    tensors: Sequence[Tensor], extra: Sequence[object] | None = None
) -> list[list[int]]:
    """Indices of `tensors` by (device, dtype) (and ``extra[i]`` when given), in first-seen
    order: one native call per group, since a call takes one device and one dtype."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype) if extra is None else (t.device, t.dtype, extra[i])
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _nothing(*_args, **_kwargs) -> None:
    """Fake kernel of every op here: they write their inputs in place and return nothing."""


class Op:
    """One op: its schema (the single place its arguments are spelled), its checks and its
    kernels. ``Op.__call__`` is the eager entry point (``lottery_ext.ops.<name>``)."""

    def __init__(
        self,
        name: str,
        schema: str,
        check: Callable[[dict], None],
        launch: Callable[[object, dict, tuple[int, int, int]], None],
        reference: Callable[[dict], None],
        doc: str,
        python_name: str | None = None,
    ) -> None:
        self.name = name
        self.__name__ = self.__qualname__ = python_name or name  # lottery_ext.ops.<__name__>
        self.validate, self.launch, self.reference = check, launch, reference
        arguments = torch._C.parse_schema(f"lottery_ext::{name}_{schema}").arguments
        self.positional = [a.name for a in arguments if not a.kwarg_only]
        self.keywords = [a.name for a in arguments if a.kwarg_only]
        self.defaults = {
            a.name: a.default_value for a in arguments if a.kwarg_only and a.has_default_value()
        }
        self.required = [n for n in self.positional + self.keywords if n not in self.defaults]
        self.names = frozenset(self.positional + self.keywords)
        self._last_args = None  # core_args' cache
        self.floats = [a.name for a in arguments if a.kwarg_only and str(a.type) == "float"]
        mutated = [a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write]
        # the kernels, by device type: what the dispatcher and eager calls both pick from
        self.kernels: dict[str, Callable[[dict, torch.device], None] | None] = {}
        if _native.core is not None:
            self.kernels["cpu"] = self._native(_native.core.cpu)
            self.kernels["cuda"] = self._native(_native.core.cuda) if _native.cuda else None
        # Registered without the "*": inductor's generated code passes every argument of a
        # mutating custom op positionally (torch 2.13). Keyword-only is enforced in Python.
        self.opdef = torch.library.custom_op(
            f"lottery_ext::{name}_", self._dispatched, mutates_args=mutated,
            schema=schema.replace("*, ", ""),
        )  # fmt: skip
        self.opdef.register_fake(_nothing)
        for device_type in ("cpu", "cuda"):
            self.opdef.register_kernel(device_type)(self._dispatched)
        self.overload = getattr(torch.ops.lottery_ext, f"{name}_").default
        self.__doc__ = doc
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in self.positional]
            + [
                inspect.Parameter(
                    n, inspect.Parameter.KEYWORD_ONLY, default=self.defaults.get(n, inspect._empty)
                )
                for n in self.keywords
            ]
        )

    def __repr__(self) -> str:
        return f"<lottery_ext op {self.__name__}{self.__signature__}>"

    def __call__(self, *args, **kwargs) -> None:
        if torch.compiler.is_compiling():  # traced: the graph calls the registered op
            return self.overload(*args, **kwargs)
        self.run(self.bind(args, kwargs))

    def bind(self, args: tuple, kwargs: dict, keyword_only: bool = True) -> dict:
        """The call's arguments by name, defaults filled; wrong calls raise TypeError as a
        Python function with this signature would. ``keyword_only=False``: the registered
        op's calls, which may pass the hyper-parameters by position."""
        if not keyword_only and len(args) > len(self.positional):
            args, kwargs = (
                args[: len(self.positional)],
                {**dict(zip(self.keywords, args[len(self.positional) :])), **kwargs},
            )
        if len(args) > len(self.positional):
            raise TypeError(
                f"{self.__name__}() takes {len(self.positional)} positional arguments "
                f"({', '.join(self.positional)}) but {len(args)} were given; pass "
                f"{', '.join(self.keywords)} by keyword"
            )
        a = dict(zip(self.positional, args))
        for k in kwargs:
            if k not in self.names:
                raise TypeError(f"{self.__name__}() got an unexpected keyword argument {k!r}")
            if k in a:
                raise TypeError(f"{self.__name__}() got multiple values for argument {k!r}")
        a.update(kwargs)
        missing = [n for n in self.required if n not in a]
        if missing:
            raise TypeError(f"{self.__name__}() missing required argument(s): {', '.join(missing)}")
        for k, v in self.defaults.items():
            a.setdefault(k, v)
        return a

    def core_args(self, a: dict, cls):
        """The hyper-parameters of a bound call as the core's named object (``cls``:
        ``_core.SgdArgs`` / ``_core.AdamArgs``); the last one is reused while they do not
        change (building one costs a few microseconds, a step's fifth at LeNet sizes)."""
        key = tuple([a[k] for k in self.keywords])
        last = self._last_args  # (key, object): one assignment, so threads cannot mix them
        if last is None or last[0] != key:
            last = self._last_args = (key, cls(**dict(zip(self.keywords, key))))
        return last[1]

    def check_hyper(self, hyper: dict) -> None:
        """The float hyper-parameters are finite numbers (optimizers check a group's before
        they touch its state)."""
        _validate.finite(**{k: hyper[k] for k in self.floats})

    def check(self, a: dict) -> None:
        """Every check of a bound call (``ValueError``/``TypeError``, nothing written): the
        hyper-parameters, then the tensors (``validate``: ``_validate.<op>``, which the
        optimizers call on their own after ``check_hyper`` on a group's)."""
        if self.floats:
            self.check_hyper(a)
        self.validate(a)

    def run(self, a: dict) -> None:
        """Check, then run on the kernel for the tensors' device."""
        self.check(a)
        self.run_checked(a)

    def run_checked(self, a: dict, device: torch.device | None = None) -> None:
        """The kernel for the tensors' `device` (default: the first tensor's), on a call
        ``check`` has passed (the optimizers check their lists once, then run)."""
        if device is None:
            first = a[self.positional[0]]
            device = first[0].device if first and isinstance(first[0], Tensor) else _CPU
        self.kernel(device)(a, device)

    def kernel(self, device: torch.device) -> Callable[[dict, torch.device], None]:
        """The kernel for `device`: the compiled launcher of its type, else the reference."""
        if not _force_reference:
            try:
                k = self.kernels[device.type]
            except KeyError:
                pass
            else:
                return k if k is not None else _no_cuda_kernels
        return self._reference

    def _dispatched(self, *args, **kwargs) -> None:
        """What torch.ops.lottery_ext.<name>_ runs (every device): the eager choice."""
        self.run(self.bind(args, kwargs, keyword_only=False))

    def _native(self, backend) -> Callable[[dict, torch.device], None]:
        launch, first = self.launch, self.positional[0]

        def kernel(a: dict, device: torch.device) -> None:
            if a[first]:
                launch(backend, a, _where(device))

        return kernel

    def _reference(self, a: dict, device: torch.device | None = None) -> None:
        with torch.no_grad():
            self.reference(a)


_CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# launches: marshalling onto the compiled core (the checks ran before)


def _launch_sgd_step(backend, a: dict, where: tuple[int, int, int]) -> None:
    params, bufs = a["params"], a["momentum_buffers"] if a["momentum"] != 0 else ()
    backend.sgd_step(
        DTYPE_CODES[params[0].dtype], _ptrs(params), _ptrs(a["grads"]), _ptrs(bufs),
        _ptrs(a["masks"]), _numels(params), [bool(f) for f in a["first"]],
        sgd_step.core_args(a, _native.core.SgdArgs), *where,
    )  # fmt: skip
    _bump(params, bufs)


def _launch_adam_step(backend, a: dict, where: tuple[int, int, int]) -> None:
    params, vmaxs = a["params"], a["max_exp_avg_sqs"] if a["amsgrad"] else ()
    backend.adam_step(
        DTYPE_CODES[params[0].dtype], _ptrs(params), _ptrs(a["grads"]), _ptrs(a["exp_avgs"]),
        _ptrs(a["exp_avg_sqs"]), _ptrs(vmaxs), _ptrs(a["masks"]), _numels(params),
        _ptrs(a["steps"]), adam_step.core_args(a, _native.core.AdamArgs), *where,
    )  # fmt: skip
    _bump(params, a["exp_avgs"], a["exp_avg_sqs"], vmaxs, a["steps"])


def _launch_apply_mask(backend, a: dict, where: tuple[int, int, int]) -> None:
    tensors = a["tensors"]
    backend.apply_mask(
        DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(a["masks"]), _numels(tensors),
        *where,
    )  # fmt: skip
    _bump(tensors)


def _launch_magnitude_histogram(backend, a: dict, where: tuple[int, int, int]) -> None:
    tensors = a["tensors"]
    backend.magnitude_histogram(
        DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(a["masks"]), _numels(tensors),
        a["shift"], a["bits"], a["prefix"], a["prefix_mask"], a["hist"].data_ptr(), *where,
    )  # fmt: skip
    _bump([a["hist"]])


def _launch_magnitude_histogram_batched(backend, a: dict, where: tuple[int, int, int]) -> None:
    tensors = a["tensors"]
    backend.magnitude_histogram_batched(
        DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(a["masks"]), _numels(tensors),
        a["shift"], a["bits"], list(a["prefixes"]), a["prefix_mask"], a["hist"].data_ptr(),
        *where,
    )  # fmt: skip
    _bump([a["hist"]])


def _launch_threshold_mask(backend, a: dict, where: tuple[int, int, int]) -> None:
    tensors, out = a["tensors"], a["out_masks"]
    numels = _numels(tensors)
    scratch, nbytes = None, 0
    if a["ties_to_prune"]:  # tie ranks on the GPU: device scratch from torch's allocator
        nbytes = backend.threshold_mask_scratch_bytes(numels)
        if nbytes:
            scratch = torch.empty(nbytes, dtype=torch.uint8, device=tensors[0].device)
    backend.threshold_mask(
        DTYPE_CODES[tensors[0].dtype], _ptrs(tensors), _ptrs(a["old_masks"]), _ptrs(out),
        numels, a["t_key"], a["ties_to_prune"], 0 if scratch is None else scratch.data_ptr(),
        nbytes, *where,
    )  # fmt: skip
    _bump(out)


def _launch_rewind(backend, a: dict, where: tuple[int, int, int]) -> None:
    params, states = a["params"], a["states"]
    backend.rewind(
        DTYPE_CODES[params[0].dtype], _ptrs(params), _ptrs(a["snapshots"]), _ptrs(a["masks"]),
        _ptrs(states), len(states) // len(params), _numels(params), *where,
    )  # fmt: skip
    _bump(params, states)


def _reference_histogram_batched(a: dict) -> None:
    for i, (t, m, prefix) in enumerate(zip(a["tensors"], a["masks"], a["prefixes"])):
        _reference.magnitude_histogram_(
            [t], [m], a["shift"], a["bits"], prefix, a["prefix_mask"], a["hist"][i]
        )


def _reference_rewind(a: dict) -> None:
    params, states = a["params"], a["states"]
    per = len(states) // len(params) if params else 0
    nested = [list(states[i * per : (i + 1) * per]) for i in range(len(params))]
    _reference.rewind_(params, a["snapshots"], a["masks"], nested)


# ---------------------------------------------------------------------------------------------
# the ops


sgd_step = Op(
    "sgd_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, "
    "bool[] first, *, float lr, float momentum=0.0, float dampening=0.0, "
    "float weight_decay=0.0, bool nesterov=False, bool maximize=False) -> ()",
    _validate.sgd_step,
    _launch_sgd_step,
    lambda a: _reference.sgd_step_(**a),
    """Fused masked SGD update of a list of tensors, in place (see ``MaskedSGD``).
    ``first[i]``: tensor i has no momentum history (its buffer is written from the
    gradient, as torch.optim.SGD clones it); ``momentum_buffers`` may be empty when
    ``momentum == 0``.""",
)

adam_step = Op(
    "adam_step",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] masks, Tensor(e!)[] steps, *, float lr, "
    "float beta1=0.9, float beta2=0.999, float eps=1e-08, float weight_decay=0.0, "
    "bool amsgrad=False, bool maximize=False, bool decoupled=False) -> ()",
    _validate.adam_step,
    _launch_adam_step,
    lambda a: _reference.adam_step_(**a),
    """Fused masked Adam/AdamW update of a list of tensors, in place (see ``MaskedAdam``).
    ``steps`` are one-element float32 CPU tensors, incremented by the op;
    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``.""",
)

apply_mask = Op(
    "apply_mask",
    "(Tensor(a!)[] tensors, Tensor[] masks) -> ()",
    _validate.apply_mask,
    _launch_apply_mask,
    lambda a: _reference.apply_mask_(**a),
    """Zero, in place, the entries of each tensor where its mask is False.""",
)

magnitude_histogram = Op(
    "magnitude_histogram",
    "(Tensor[] tensors, Tensor?[] masks, int shift, int bits, int prefix, int prefix_mask, "
    "Tensor(a!) hist) -> ()",
    _validate.magnitude_histogram,
    _launch_magnitude_histogram,
    lambda a: _reference.magnitude_histogram_(**a),
    """One radix pass: ``hist[d] += #candidates with (key & prefix_mask) == prefix and digit
    (key >> shift) & (2**bits - 1) == d``; ``hist[-1] +=`` #NaN candidates. ``key`` is |x|'s
    bit pattern with the sign cleared. ``hist``: int64, 2**bits + 1 entries, on the
    tensors' device. Kept separate so sharded callers can all-reduce ``hist`` between
    passes.""",
)

magnitude_histogram_batched = Op(
    "magnitude_histogram_batched",
    "(Tensor[] tensors, Tensor?[] masks, int shift, int bits, int[] prefixes, int prefix_mask, "
    "Tensor(a!) hist) -> ()",
    _validate.magnitude_histogram_batched,
    _launch_magnitude_histogram_batched,
    _reference_histogram_batched,
    """``magnitude_histogram`` for every tensor on its own, in one call (per-layer
    thresholds; one GPU launch): tensor i matches its own ``prefixes[i]`` and counts into
    row i of ``hist`` (int64, ``len(tensors) x (2**bits + 1)``).""",
)

threshold_mask = Op(
    "threshold_mask",
    "(Tensor[] tensors, Tensor?[] old_masks, Tensor(a!)[] out_masks, int t_key, "
    "int ties_to_prune) -> ()",
    _validate.threshold_mask,
    _launch_threshold_mask,
    lambda a: _reference.threshold_mask_(**a),
    """``out = candidate & (key > t_key or (key == t_key and not among the first
    ties_to_prune ties in flat memory order over the list))``; ``out`` may be ``old``.""",
)

rewind_tensors = Op(
    "rewind",
    "(Tensor(a!)[] params, Tensor[] snapshots, Tensor?[] masks, Tensor(b!)[] states) -> ()",
    _validate.rewind,
    _launch_rewind,
    _reference_rewind,
    """``params[i] = snapshots[i]`` where ``masks[i]`` (everywhere if None) else 0, and
    every tensor of ``states`` (optimizer buffers, ``len(params) * S`` of them, tensor-major:
    the S buffers of params[0] first) zeroed, in one pass per tensor.""",
    python_name="rewind_tensors",
)

OPS = (
    sgd_step, adam_step, apply_mask, magnitude_histogram, magnitude_histogram_batched,
    threshold_mask, rewind_tensors,
)  # fmt: skip
