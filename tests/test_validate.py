"""Bad inputs: every one is refused with a ValueError or TypeError whose message names the
offending tensor or hyper-parameter, and a refused call modifies nothing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lottery_ext
from lottery_ext import MaskedAdam, MaskedAdamW, MaskedSGD, ops

NAN, INF = float("nan"), float("inf")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)


# name -> (class, kwargs giving a momentum buffer / Adam state)
OPTIMIZERS = {
    "sgd": (MaskedSGD, dict(lr=0.1, momentum=0.9)),
    "adam": (MaskedAdam, dict(lr=1e-2)),
    "adamw": (MaskedAdamW, dict(lr=1e-2)),
}
ADAMS = ["adam", "adamw"]


@pytest.fixture(params=list(OPTIMIZERS))
def opt_name(request):
    return request.param


def make(opt_name: str, params, **kwargs):
    cls, defaults = OPTIMIZERS[opt_name]
    return cls(params, **{**defaults, **kwargs})


def snapshot(opt) -> dict:
    """Copies of every parameter and every tensor of the optimizer state."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            out[("param", gi, i)] = p.detach().clone()
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[("state", gi, i, k)] = v.detach().clone()
    return out


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def with_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)


# ---------------------------------------------------------------------------------------------
# masks through the optimizers


def bool_mask(shape) -> torch.Tensor:
    return torch.rand(shape) > 0.5


BAD_MASKS = {
    "wrong_shape": (ValueError, lambda: bool_mask((4, 3)), r"shape \(4, 3\) does not match"),
    "float": (
        TypeError,
        lambda: torch.ones(3, 4),
        r"dtype must be torch\.bool, got torch\.float32",
    ),
    "uint8": (
        TypeError,
        lambda: torch.ones(3, 4, dtype=torch.uint8),
        r"dtype must be torch\.bool, got torch\.uint8",
    ),
    "list": (TypeError, lambda: [[True] * 4] * 3, r"expected a bool torch\.Tensor, got list"),
    "numpy": (
        TypeError,
        lambda: bool_mask((3, 4)).numpy(),
        r"expected a bool torch\.Tensor, got ndarray",
    ),
    "meta_device": (
        ValueError,
        lambda: torch.ones(3, 4, dtype=torch.bool, device="meta"),
        r"on meta but the parameter is on cpu",
    ),
}


@pytest.mark.parametrize("bad", list(BAD_MASKS))
def test_set_mask_bad_mask_names_parameter(opt_name, bad):
    exc, make_mask, msg = BAD_MASKS[bad]
    model = Net()
    opt = make(opt_name, model.named_parameters())
    before = snapshot(opt)
    with pytest.raises(exc, match=r"mask for parameter 'fc1\.weight': " + msg):
        opt.set_mask(model.fc1.weight, make_mask())
    assert_same(before, snapshot(opt))
    assert opt.get_mask(model.fc1.weight) is None
    assert opt.masks == {}


@pytest.mark.parametrize("bad", list(BAD_MASKS))
def test_masks_kwarg_bad_mask_names_parameter(opt_name, bad):
    exc, make_mask, msg = BAD_MASKS[bad]
    model = Net()
    before = model.fc1.weight.detach().clone()
    with pytest.raises(exc, match=r"mask for parameter 'fc1\.weight': " + msg):
        make(opt_name, model.named_parameters(), masks={"fc1.weight": make_mask()})
    with pytest.raises(exc, match=r"mask for parameter 'fc1\.weight': " + msg):
        make(opt_name, model.named_parameters(), masks={model.fc1.weight: make_mask()})
    assert torch.equal(model.fc1.weight.detach(), before)


def test_bad_mask_unnamed_optimizer_names_position(opt_name):
    model = Net()
    opt = make(opt_name, model.parameters())
    with pytest.raises(
        ValueError, match=r"mask for param_groups\[0\]\['params'\]\[2\] \(shape \(2, 3\)\)"
    ):
        opt.set_mask(model.fc2.weight, bool_mask((3, 2)))
    with pytest.raises(TypeError, match=r"mask for param_groups\[0\]\['params'\]\[1\]"):
        opt.set_mask(model.fc1.bias, torch.ones(3))


@needs_cuda
def test_mask_on_wrong_device(opt_name):
    model = Net()
    opt = make(opt_name, model.named_parameters())
    with pytest.raises(ValueError, match=r"mask for parameter 'fc1\.weight': on cuda"):
        opt.set_mask(model.fc1.weight, bool_mask((3, 4)).cuda())
    p = torch.randn(3)
    with pytest.raises(ValueError, match=r"mask for tensors\[0\]: on cuda"):
        ops.apply_mask([p], [torch.ones(3, dtype=torch.bool, device="cuda")])


def test_set_mask_on_foreign_tensor(opt_name):
    model = Net()
    opt = make(opt_name, model.fc1.parameters())
    stranger = nn.Parameter(torch.randn(5, 7))
    before = stranger.detach().clone()
    with pytest.raises(ValueError, match=r"tensor of shape \(5, 7\) is not a parameter of this"):
        opt.set_mask(stranger, bool_mask((5, 7)))
    with pytest.raises(ValueError, match=r"tensor of shape \(2, 3\) is not a parameter of this"):
        opt.set_mask(model.fc2.weight, bool_mask((2, 3)))
    with pytest.raises(ValueError, match=r"tensor of shape \(5, 7\) is not a parameter of this"):
        opt.get_mask(stranger)
    with pytest.raises(ValueError, match=r"tensor of shape \(5, 7\) is not a parameter of this"):
        make(opt_name, model.fc1.parameters(), masks={stranger: bool_mask((5, 7))})
    assert torch.equal(stranger.detach(), before)
    assert opt.masks == {}


def test_masks_keyed_by_unknown_name(opt_name):
    model = Net()
    with pytest.raises(ValueError, match=r"no parameter named 'fc9\.weight'"):
        make(opt_name, model.named_parameters(), masks={"fc9.weight": bool_mask((3, 4))})


def test_masks_keyed_by_name_without_named_parameters(opt_name):
    model = Net()
    before = model.fc1.weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"no parameter named 'fc1\.weight'.*built from model\.named_parameters"
    ):
        make(opt_name, model.parameters(), masks={"fc1.weight": bool_mask((3, 4))})
    assert torch.equal(model.fc1.weight.detach(), before)


def test_masks_keyed_by_something_else(opt_name):
    model = Net()
    with pytest.raises(TypeError, match=r"masks must be keyed by parameter tensors or names"):
        make(opt_name, model.named_parameters(), masks={0: bool_mask((3, 4))})


def test_partial_masks_kwarg_failure_leaves_params_unchanged(opt_name):
    # The first mask is valid, the second is not: the constructor raises. The first
    # parameter may have been pruned already by then; the bad one must not be touched.
    model = Net()
    before = model.fc2.weight.detach().clone()
    with pytest.raises(TypeError, match=r"mask for parameter 'fc2\.weight'"):
        make(
            opt_name,
            model.named_parameters(),
            masks={"fc1.weight": bool_mask((3, 4)), "fc2.weight": torch.zeros(2, 3)},
        )
    assert torch.equal(model.fc2.weight.detach(), before)


# ---------------------------------------------------------------------------------------------
# hyper-parameters


def params3():
    return [nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize(
    ("opt_name", "kwargs", "msg"),
    [
        ("sgd", dict(lr=NAN), r"lr must be finite, got nan"),
        ("adam", dict(lr=NAN), r"lr must be finite, got nan"),
        ("adamw", dict(lr=NAN), r"lr must be finite, got nan"),
        ("sgd", dict(lr=INF), r"lr must be finite, got inf"),
        ("sgd", dict(momentum=NAN), r"momentum must be finite, got nan"),
        ("sgd", dict(dampening=NAN), r"dampening must be finite, got nan"),
        ("adam", dict(eps=NAN), r"eps must be finite, got nan"),
        ("adamw", dict(eps=NAN), r"eps must be finite, got nan"),
        ("sgd", dict(weight_decay=INF), r"weight_decay must be finite, got inf"),
        ("adam", dict(weight_decay=INF), r"weight_decay must be finite, got inf"),
        ("adamw", dict(weight_decay=INF), r"weight_decay must be finite, got inf"),
    ],
)
def test_non_finite_hyperparameters_in_constructor(opt_name, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make(opt_name, params3(), **kwargs)


@pytest.mark.parametrize(
    ("opt_name", "key", "value", "msg"),
    [
        ("sgd", "lr", NAN, r"lr must be finite, got nan"),
        ("adam", "lr", NAN, r"lr must be finite, got nan"),
        ("adamw", "lr", NAN, r"lr must be finite, got nan"),
        ("sgd", "momentum", NAN, r"momentum must be finite"),
        ("sgd", "weight_decay", -INF, r"weight_decay must be finite, got -inf"),
        ("adam", "eps", NAN, r"eps must be finite"),
        ("adam", "betas", (NAN, 0.999), r"beta1 must be finite"),
        ("adamw", "betas", (0.9, INF), r"beta2 must be finite"),
        ("adamw", "weight_decay", INF, r"weight_decay must be finite"),
    ],
)
def test_non_finite_hyperparameter_set_before_step(opt_name, key, value, msg):
    model = Net()
    opt = make(opt_name, model.named_parameters(), masks={"fc1.weight": bool_mask((3, 4))})
    with_grads(model)
    opt.step()  # state exists
    opt.param_groups[0][key] = value
    with_grads(model)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=msg):
        opt.step()
    assert_same(before, snapshot(opt))


def test_nan_lr_before_first_step_creates_no_state(opt_name):
    model = Net()
    opt = make(opt_name, model.parameters())
    opt.param_groups[0]["lr"] = NAN
    with_grads(model)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"lr must be finite, got nan"):
        opt.step()
    assert_same(before, snapshot(opt))
    assert len(opt.state) == 0


def test_tensor_lr(opt_name):
    cls = OPTIMIZERS[opt_name][0]
    with pytest.raises(TypeError, match=rf"{cls.__name__}: lr must be a Python float"):
        make(opt_name, params3(), lr=torch.tensor(0.01))
    # and set later
    model = Net()
    opt = make(opt_name, model.parameters())
    opt.param_groups[0]["lr"] = torch.tensor(0.01)
    with_grads(model)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"lr must be a Python float, not a Tensor"):
        opt.step()
    assert_same(before, snapshot(opt))


@pytest.mark.parametrize("opt_name", ADAMS)
def test_capturable_refused(opt_name):
    cls = OPTIMIZERS[opt_name][0]
    with pytest.raises(ValueError, match=rf"{cls.__name__}: capturable=True is not supported"):
        make(opt_name, params3(), capturable=True)


def test_differentiable_refused(opt_name):
    cls = OPTIMIZERS[opt_name][0]
    with pytest.raises(ValueError, match=rf"{cls.__name__}: differentiable=True is not supported"):
        make(opt_name, params3(), differentiable=True)


@pytest.mark.parametrize(
    ("cls", "torch_cls", "kwargs", "msg"),
    [
        (MaskedSGD, torch.optim.SGD, dict(lr=-0.1), r"Invalid learning rate: -0\.1"),
        (MaskedAdam, torch.optim.Adam, dict(lr=-0.1), r"Invalid learning rate: -0\.1"),
        (MaskedAdamW, torch.optim.AdamW, dict(lr=-0.1), r"Invalid learning rate: -0\.1"),
        (MaskedSGD, torch.optim.SGD, dict(lr=0.1, momentum=-0.5), r"Invalid momentum value"),
        (MaskedSGD, torch.optim.SGD, dict(lr=0.1, weight_decay=-1.0), r"Invalid weight_decay"),
        (MaskedAdam, torch.optim.Adam, dict(eps=-1.0), r"Invalid epsilon value"),
        (
            MaskedAdam,
            torch.optim.Adam,
            dict(betas=(1.0, 0.999)),
            r"Invalid beta parameter at index 0",
        ),
        (
            MaskedAdam,
            torch.optim.Adam,
            dict(betas=(0.9, -0.1)),
            r"Invalid beta parameter at index 1",
        ),
        (
            MaskedAdamW,
            torch.optim.AdamW,
            dict(betas=(0.9, 1.5)),
            r"Invalid beta parameter at index 1",
        ),
        (MaskedAdamW, torch.optim.AdamW, dict(weight_decay=-1.0), r"Invalid weight_decay"),
        (
            MaskedSGD,
            torch.optim.SGD,
            dict(lr=0.1, nesterov=True),
            r"Nesterov momentum requires a momentum and zero dampening",
        ),
        (
            MaskedSGD,
            torch.optim.SGD,
            dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True),
            r"Nesterov momentum requires a momentum and zero dampening",
        ),
    ],
)
def test_torch_constructor_checks_still_apply(cls, torch_cls, kwargs, msg):
    with pytest.raises(ValueError, match=msg) as ours:
        cls(params3(), **kwargs)
    with pytest.raises(ValueError) as theirs:
        torch_cls(params3(), **kwargs)
    assert str(ours.value) == str(theirs.value)


# ---------------------------------------------------------------------------------------------
# parameters and gradients through the optimizers


def test_sparse_gradient_names_parameter(opt_name):
    model = Net()
    opt = make(opt_name, model.named_parameters())
    with_grads(model)
    model.fc2.weight.grad = torch.randn(2, 3).to_sparse()
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"gradient of parameter 'fc2\.weight': sparse"):
        opt.step()
    # every parameter of the group is unchanged, also those checked before fc2.weight
    after = snapshot(opt)
    for i in range(4):
        assert torch.equal(before[("param", 0, i)], after[("param", 0, i)]), i


def test_complex_parameter_names_parameter(opt_name):
    z = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = make(opt_name, [("z", z)])
    z.grad = torch.randn(3, dtype=torch.complex64)
    before = z.detach().clone()
    with pytest.raises(TypeError, match=r"parameter 'z': complex tensors are not supported"):
        opt.step()
    assert torch.equal(z.detach(), before)


@pytest.mark.parametrize(
    ("bad_grad", "exc", "msg"),
    [
        (
            lambda: torch.randn(5),
            ValueError,
            r"gradient of parameter 'fc1\.weight': shape \(5,\) does not match",
        ),
        (
            lambda: torch.randn(3, 4, dtype=torch.float64),
            TypeError,
            r"gradient of parameter 'fc1\.weight': dtype torch\.float64 does not match",
        ),
    ],
    ids=["shape", "dtype"],
)
def test_gradient_unlike_parameter_names_parameter(opt_name, bad_grad, exc, msg):
    # torch refuses `p.grad = <other shape/dtype>`; `.data` on an existing grad gets past it.
    model = Net()
    opt = make(opt_name, model.named_parameters())
    with_grads(model)
    model.fc1.weight.grad.data = bad_grad()
    before = snapshot(opt)
    with pytest.raises(exc, match=msg):
        opt.step()
    after = snapshot(opt)
    for k in before:
        if k[0] == "param":
            assert torch.equal(before[k], after[k]), k


def test_strided_parameter_and_gradient_step_like_torch(opt_name):
    # A sliced view as parameter, and a gradient in another memory order than its parameter:
    # torch.optim steps both by logical index, so do we (issue 11, case 7).
    cls, defaults = OPTIMIZERS[opt_name]
    torch_cls = {MaskedSGD: torch.optim.SGD, MaskedAdam: torch.optim.Adam,
                 MaskedAdamW: torch.optim.AdamW}[cls]  # fmt: skip
    w = nn.Parameter(torch.randn(4, 6)[:, ::2])
    t = nn.Parameter(torch.randn(3, 4))
    w_ref, t_ref = (nn.Parameter(x.detach().clone()) for x in (w, t))
    mask = torch.rand(4, 3) > 0.5
    opt = make(opt_name, [("w", w), ("t", t)], masks={"w": mask})
    ref = torch_cls([w_ref, t_ref], **defaults)
    for _ in range(4):
        gw, gt = torch.randn(4, 6)[:, ::2], torch.randn(4, 3).t()
        w.grad, t.grad = gw, gt
        w_ref.grad, t_ref.grad = gw.masked_fill(~mask, 0), gt.clone()
        opt.step()
        ref.step()
        with torch.no_grad():
            w_ref.masked_fill_(~mask, 0)
            for v in ref.state[w_ref].values():
                if v.shape == mask.shape:
                    v.masked_fill_(~mask, 0)
    assert not w.is_contiguous() and not w.grad.is_contiguous()
    torch.testing.assert_close(w.detach(), w_ref.detach())
    torch.testing.assert_close(t.detach(), t_ref.detach())
    assert not w.detach()[~mask].any()


def test_later_step_after_refused_one_matches_torch_adam():
    # A refused step may create Adam state (zeros, step 0): it must not change what follows.
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    a_ref, b_ref = (nn.Parameter(t.detach().clone()) for t in (a, b))
    opt = MaskedAdam([a, b], lr=0.1, weight_decay=0.1)
    ref = torch.optim.Adam([a_ref, b_ref], lr=0.1, weight_decay=0.1)
    a.grad, b.grad = torch.randn(4), torch.randn(3).to_sparse()
    with pytest.raises(TypeError, match=r"gradient of param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    b.grad = b.grad.to_dense()
    a_ref.grad, b_ref.grad = a.grad.clone(), b.grad.clone()
    for _ in range(2):
        opt.step()
        ref.step()
    torch.testing.assert_close(a.detach(), a_ref.detach())
    torch.testing.assert_close(b.detach(), b_ref.detach())


def test_later_step_after_refused_one_matches_torch_sgd():
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    a_ref, b_ref = (nn.Parameter(t.detach().clone()) for t in (a, b))
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    opt = MaskedSGD([a, b], **kw)
    ref = torch.optim.SGD([a_ref, b_ref], **kw)
    a.grad, b.grad = torch.randn(4), torch.randn(3).to_sparse()
    with pytest.raises(TypeError, match=r"gradient of param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert len(opt.state) == 0  # a refused step leaves no state behind
    b.grad = b.grad.to_dense()
    a_ref.grad, b_ref.grad = a.grad.clone(), b.grad.clone()
    for _ in range(2):
        opt.step()
        ref.step()
    torch.testing.assert_close(a.detach(), a_ref.detach())
    torch.testing.assert_close(b.detach(), b_ref.detach())


# ---------------------------------------------------------------------------------------------
# the public ops


def sgd_inputs(n=2, dtype=torch.float32, mask=True):
    ps = [torch.randn(3, 4, dtype=dtype) for _ in range(n)]
    return dict(
        params=ps,
        grads=[torch.randn_like(p) for p in ps],
        momentum_buffers=[torch.randn_like(p) for p in ps],
        masks=[bool_mask(p.shape) if mask else None for p in ps],
        first=[False] * n,
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=0.01,
        nesterov=False,
        maximize=False,
    )


def adam_inputs(n=2, dtype=torch.float32, mask=True, amsgrad=True):
    ps = [torch.randn(3, 4, dtype=dtype) for _ in range(n)]
    return dict(
        params=ps,
        grads=[torch.randn_like(p) for p in ps],
        exp_avgs=[torch.randn_like(p) for p in ps],
        exp_avg_sqs=[torch.rand_like(p) for p in ps],
        max_exp_avg_sqs=[torch.rand_like(p) + 1 for p in ps],
        masks=[bool_mask(p.shape) if mask else None for p in ps],
        steps=[torch.tensor(3.0) for _ in ps],
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=amsgrad,
        maximize=False,
        decoupled=False,
    )


def mask_inputs(n=2, dtype=torch.float32):
    ts = [torch.randn(3, 4, dtype=dtype) for _ in range(n)]
    return dict(tensors=ts, masks=[bool_mask(t.shape) for t in ts])


OPS = {"sgd_step": (ops.sgd_step, sgd_inputs), "adam_step": (ops.adam_step, adam_inputs)}


def tensors_of(kwargs: dict) -> list[torch.Tensor]:
    out = []
    for v in kwargs.values():
        if isinstance(v, list):
            out += [
                t
                for t in v
                if isinstance(t, torch.Tensor)
                and t.device.type == "cpu"
                and t.layout == torch.strided
            ]
    return out


def raises_unchanged(fn, kwargs, exc, msg, custom=True):
    """fn(**kwargs) raises `exc` matching `msg` and leaves every CPU tensor argument as it was.
    With `custom`, also through torch.ops.lottery_ext.<op>_ (the registered custom op). The
    dispatcher itself handles some inputs before the kernel sees them (non-tensors: schema
    error; sparse: no kernel for the sparse key; meta: the fake kernel), so those pass False."""
    before = [t.clone() for t in tensors_of(kwargs)]
    with pytest.raises(exc, match=msg):
        fn(**kwargs)
    for b, a in zip(before, tensors_of(kwargs)):
        assert torch.equal(b, a)
    if not custom:
        return
    op = getattr(torch.ops.lottery_ext, fn.__name__ + "_")
    with pytest.raises(exc, match=msg):
        op(*kwargs.values())
    for b, a in zip(before, tensors_of(kwargs)):
        assert torch.equal(b, a)


@pytest.fixture(params=list(OPS))
def op_name(request):
    return request.param


def test_ops_valid_inputs_do_run(op_name):
    # the baseline of the tests below: the same inputs, unmodified, are accepted and update
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    before = kw["params"][0].clone()
    fn(**kw)
    assert not torch.equal(before, kw["params"][0])
    kw = mask_inputs()
    ops.apply_mask(**kw)
    assert (kw["tensors"][1][~kw["masks"][1]] == 0).all()


@pytest.mark.parametrize(
    ("dtype", "msg"),
    [
        (torch.int32, r"params\[0\]: dtype torch\.int32 is not supported"),
        (torch.int64, r"params\[0\]: dtype torch\.int64 is not supported"),
        (torch.bool, r"params\[0\]: dtype torch\.bool is not supported"),
        (torch.complex64, r"params\[0\]: complex tensors are not supported"),
        (torch.complex128, r"params\[0\]: complex tensors are not supported"),
    ],
)
def test_ops_unsupported_param_dtype(op_name, dtype, msg):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs(n=1, mask=False)
    for key in (
        "params",
        "grads",
        "momentum_buffers",
        "exp_avgs",
        "exp_avg_sqs",
        "max_exp_avg_sqs",
    ):
        if key in kw:
            kw[key] = [torch.ones(3, 4).to(dtype)]
    raises_unchanged(fn, kw, TypeError, msg)
    t = torch.ones(3, 4).to(dtype)
    raises_unchanged(
        ops.apply_mask,
        dict(tensors=[t], masks=[bool_mask((3, 4))]),
        TypeError,
        msg.replace("params", "tensors"),
    )


def test_ops_sparse_and_bad_kind(op_name):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    kw["grads"][1] = kw["grads"][1].to_sparse()
    msg = r"gradient of params\[1\]: sparse tensors are not supported"
    raises_unchanged(fn, kw, TypeError, msg, custom=False)
    kw = make_inputs()
    kw["params"][0] = kw["params"][0].to_sparse()
    msg = r"params\[0\]: only dense \(strided\) tensors"
    raises_unchanged(fn, kw, TypeError, msg, custom=False)
    kw = make_inputs()
    kw["grads"][0] = kw["grads"][0].tolist()
    msg = r"gradient of params\[0\]: expected a torch\.Tensor"
    raises_unchanged(fn, kw, TypeError, msg, custom=False)


@pytest.mark.parametrize(
    ("change", "exc", "msg"),
    [
        (
            lambda p: torch.randn(4, 3, dtype=p.dtype),
            ValueError,
            r"gradient of params\[1\]: shape \(4, 3\) does not match the parameter's \(3, 4\)",
        ),
        (
            lambda p: torch.randn(12, dtype=p.dtype),
            ValueError,
            r"gradient of params\[1\]: shape \(12,\) does not match",
        ),
        (
            lambda p: p.double(),
            TypeError,
            r"gradient of params\[1\]: dtype torch\.float64 does not match the parameter's "
            r"torch\.float32",
        ),
        (
            lambda p: p.half(),
            TypeError,
            r"gradient of params\[1\]: dtype torch\.float16 does not match",
        ),
        (
            lambda p: torch.randn(4, 3).t(),
            ValueError,
            r"gradient of params\[1\]: memory layout \(strides \(1, 3\)\) differs",
        ),
        (
            lambda p: torch.randn(3, 4, device="meta"),
            ValueError,
            r"gradient of params\[1\]: on meta but the parameter is on cpu",
        ),
    ],
    ids=["shape", "flat", "double", "half", "strides", "device"],
)
def test_ops_gradient_unlike_param(op_name, change, exc, msg):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    kw["grads"][1] = change(kw["params"][1])
    raises_unchanged(fn, kw, exc, msg, custom=kw["grads"][1].device.type == "cpu")


@pytest.mark.parametrize(
    ("op_name", "key", "what"),
    [
        ("sgd_step", "momentum_buffers", "momentum_buffer"),
        ("adam_step", "exp_avgs", "exp_avg"),
        ("adam_step", "exp_avg_sqs", "exp_avg_sq"),
        ("adam_step", "max_exp_avg_sqs", "max_exp_avg_sq"),
    ],
)
def test_ops_state_unlike_param(op_name, key, what):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    kw[key][1] = torch.zeros(5)
    raises_unchanged(
        fn, kw, ValueError, rf"optimizer state '{what}' of params\[1\]: shape \(5,\) does not"
    )
    kw = make_inputs()
    kw[key][0] = kw[key][0].double()
    raises_unchanged(fn, kw, TypeError, rf"optimizer state '{what}' of params\[0\]: dtype")


def test_ops_unused_state_is_not_checked():
    # momentum == 0: no momentum buffers needed; amsgrad False: no max_exp_avg_sqs needed
    kw = sgd_inputs()
    kw.update(momentum=0.0, momentum_buffers=[])
    ops.sgd_step(**kw)
    kw = adam_inputs(amsgrad=False)
    kw.update(max_exp_avg_sqs=[])
    ops.adam_step(**kw)


@pytest.mark.parametrize(
    ("make_mask", "exc", "msg"),
    [
        (lambda: torch.ones(3, 4), TypeError, r"dtype must be torch\.bool, got torch\.float32"),
        (
            lambda: torch.ones(3, 4, dtype=torch.uint8),
            TypeError,
            r"dtype must be torch\.bool, got torch\.uint8",
        ),
        (lambda: bool_mask((4, 3)), ValueError, r"shape \(4, 3\) does not match"),
        (lambda: bool_mask((4, 3)).t(), ValueError, r"memory layout"),
        (lambda: [True] * 12, TypeError, r"expected a bool torch\.Tensor, got list"),
        (
            lambda: torch.ones(3, 4, dtype=torch.bool, device="meta"),
            ValueError,
            r"on meta but the parameter is on cpu",
        ),
    ],
    ids=["float", "uint8", "shape", "strides", "list", "device"],
)
def test_ops_bad_mask(op_name, make_mask, exc, msg):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    kw["masks"][1] = m = make_mask()
    custom = isinstance(m, torch.Tensor) and m.device.type == "cpu"
    raises_unchanged(fn, kw, exc, r"mask for params\[1\]: " + msg, custom)
    kw = mask_inputs()
    kw["masks"][1] = make_mask()
    raises_unchanged(ops.apply_mask, kw, exc, r"mask for tensors\[1\]: " + msg, custom)


def test_apply_mask_needs_a_mask_for_every_tensor():
    kw = mask_inputs()
    kw["masks"][0] = None
    before = kw["tensors"][0].clone()
    with pytest.raises(TypeError, match=r"mask for tensors\[0\]: expected a bool torch\.Tensor"):
        ops.apply_mask(**kw)
    assert torch.equal(before, kw["tensors"][0])


def test_ops_non_dense_param(op_name):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    for v in kw.values():
        if isinstance(v, list) and v and isinstance(v[1], torch.Tensor) and v[1].dim() == 2:
            v[1] = torch.zeros(3, 8, dtype=v[1].dtype)[:, ::2]
    raises_unchanged(fn, kw, ValueError, r"params\[1\]: .*contiguous")
    t = torch.randn(3, 8)[:, ::2]
    raises_unchanged(
        ops.apply_mask,
        dict(tensors=[t], masks=[bool_mask((3, 8))[:, ::2]]),
        ValueError,
        r"tensors\[0\]: .*contiguous",
    )


def test_ops_dense_permuted_param_is_accepted(op_name):
    # a transposed tensor is dense: the kernels walk it as one block (is_dense)
    fn, make_inputs = OPS[op_name]
    kw = make_inputs(n=1)
    for v in kw.values():
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) and v[0].dim() == 2:
            v[0] = v[0].t().contiguous().t()
    before = kw["params"][0].clone()
    fn(**kw)
    assert not torch.equal(before, kw["params"][0])


@pytest.mark.parametrize("drop", ["grads", "masks", "first|steps", "params"])
def test_ops_lists_of_different_lengths(op_name, drop):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs(n=3)
    key = [k for k in drop.split("|") if k in kw][0]
    kw[key] = kw[key][:2]
    raises_unchanged(fn, kw, ValueError, rf"tensor lists differ in length: .*'{key}': 2")


@pytest.mark.parametrize("key", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_adam_state_lists_of_different_lengths(key):
    kw = adam_inputs(n=3)
    kw[key] = kw[key][:1]
    raises_unchanged(ops.adam_step, kw, ValueError, rf"tensor lists differ in length: .*'{key}': 1")


def test_sgd_momentum_buffers_length_checked_only_with_momentum():
    kw = sgd_inputs(n=3)
    kw["momentum_buffers"] = kw["momentum_buffers"][:1]
    raises_unchanged(
        ops.sgd_step, kw, ValueError, r"tensor lists differ in length: .*'momentum_buffers': 1"
    )


def test_apply_mask_lists_of_different_lengths():
    kw = mask_inputs(n=3)
    kw["masks"] = kw["masks"][:2]
    raises_unchanged(ops.apply_mask, kw, ValueError, r"tensor lists differ in length")


def _all_like(kw: dict, i: int, fn) -> None:
    for v in kw.values():
        if isinstance(v, list) and len(v) > i and isinstance(v[i], torch.Tensor):
            if v[i].dtype != torch.bool and v[i].dim() == 2:
                v[i] = fn(v[i])


def test_ops_mixed_dtype(op_name):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    _all_like(kw, 1, lambda t: t.double())
    raises_unchanged(
        fn,
        kw,
        ValueError,
        rf"{op_name}: params\[1\] is torch\.float64 on cpu but params\[0\] is torch\.float32",
    )


def test_ops_mixed_device(op_name):
    # a meta tensor stands in for a second device (no data is ever touched: the call is refused)
    fn, make_inputs = OPS[op_name]
    kw = make_inputs(mask=False)
    _all_like(kw, 1, lambda t: t.to("meta"))
    msg = rf"{op_name}: params\[1\] is torch\.float32 on meta"
    raises_unchanged(fn, kw, ValueError, msg, custom=False)


@needs_cuda
def test_ops_mixed_cuda_device(op_name):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs(mask=False)
    _all_like(kw, 1, lambda t: t.cuda())
    raises_unchanged(fn, kw, ValueError, rf"{op_name}: params\[1\] is torch\.float32 on cuda")


def test_apply_mask_mixed_dtype_names_tensor():
    kw = mask_inputs(n=3)
    kw["tensors"][2] = kw["tensors"][2].double()
    raises_unchanged(ops.apply_mask, kw, ValueError, r"tensors\[2\]")


@pytest.mark.parametrize(
    "bad",
    [
        lambda: torch.tensor(3.0, dtype=torch.float64),
        lambda: torch.tensor(3, dtype=torch.int64),
        lambda: torch.tensor(3.0, dtype=torch.float16),
        lambda: torch.tensor([3.0, 3.0]),
        lambda: torch.tensor(3.0, device="meta"),
        lambda: 3.0,
    ],
    ids=["float64", "int64", "float16", "two_elements", "meta", "python_float"],
)
def test_adam_bad_step_tensor(bad):
    kw = adam_inputs(n=3)
    kw["steps"][2] = s = bad()
    custom = isinstance(s, torch.Tensor) and s.device.type == "cpu"
    msg = r"steps\[2\]: expected a one-element float32 CPU tensor"
    raises_unchanged(ops.adam_step, kw, TypeError, msg, custom)


@pytest.mark.parametrize(
    ("op_name", "key", "value", "exc", "msg"),
    [
        ("sgd_step", "lr", NAN, ValueError, r"lr must be finite, got nan"),
        ("sgd_step", "momentum", NAN, ValueError, r"momentum must be finite, got nan"),
        ("sgd_step", "dampening", INF, ValueError, r"dampening must be finite, got inf"),
        ("sgd_step", "weight_decay", INF, ValueError, r"weight_decay must be finite, got inf"),
        ("sgd_step", "lr", torch.tensor(0.1), TypeError, r"lr must be a Python float, not a"),
        ("sgd_step", "lr", "0.1", TypeError, r"lr must be a number, got str"),
        ("adam_step", "lr", NAN, ValueError, r"lr must be finite, got nan"),
        ("adam_step", "beta1", NAN, ValueError, r"beta1 must be finite, got nan"),
        ("adam_step", "beta2", -INF, ValueError, r"beta2 must be finite, got -inf"),
        ("adam_step", "eps", NAN, ValueError, r"eps must be finite, got nan"),
        ("adam_step", "weight_decay", INF, ValueError, r"weight_decay must be finite, got inf"),
        ("adam_step", "lr", torch.tensor(0.1), TypeError, r"lr must be a Python float, not a"),
    ],
)
def test_ops_bad_hyperparameters(op_name, key, value, exc, msg):
    fn, make_inputs = OPS[op_name]
    kw = make_inputs()
    kw[key] = value
    before = [t.clone() for t in tensors_of(kw)]
    with pytest.raises(exc, match=msg):
        fn(**kw)
    for b, a in zip(before, tensors_of(kw)):
        assert torch.equal(b, a)
    assert math.isfinite(float(kw["params"][0].sum()))


def test_ops_size_one_dim_strides_do_not_matter():
    # Strides of size-1 dimensions carry no layout information: a (3, 1) gradient/mask with
    # strides (1, 3) is the same block of memory as a (3, 1) parameter with strides (1, 1).
    p = torch.randn(3, 1)
    g = torch.randn(1, 3).t()
    m = torch.tensor([[True, False, True]]).t()
    assert p.stride() != g.stride() and g.is_contiguous() and p.is_contiguous()
    expected = torch.where(m, p - 0.1 * g, torch.zeros(()))
    ops.sgd_step([p], [g], [], [m], [True], lr=0.1)
    torch.testing.assert_close(p, expected)
    ops.apply_mask([p], [m])
    torch.testing.assert_close(p, expected)


def test_lottery_ext_exports():
    assert lottery_ext.ops is ops
    assert {"MaskedSGD", "MaskedAdam", "MaskedAdamW", "build_info", "ops"} <= set(
        lottery_ext.__all__
    )
