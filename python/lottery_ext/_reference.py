"""Pure-PyTorch implementation of every op: the fallback when the compiled core is missing,
the path for devices without compiled kernels, and the oracle the tests compare against.

Same contract as the compiled kernels (csrc/include/lottery/math.h): 16-bit tensors are
updated in float32 math; after each op every pruned entry (mask False) of the parameter and
of each state buffer is exactly 0, and the pruned gradient entries have no effect.
"""

from __future__ import annotations

import torch

from ._radix import KEY_FORMAT

Tensor = torch.Tensor


def _opmath(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _write_back(dst: Tensor, src: Tensor, keep: Tensor | None) -> None:
    if keep is not None:
        src = src.masked_fill(~keep, 0)
    if src is not dst:
        dst.copy_(src)


def apply_mask_(tensors: list[Tensor], masks: list[Tensor]) -> None:
    for t, m in zip(tensors, masks):
        t.masked_fill_(~m, 0)


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    masks: list[Tensor | None],
    first: list[bool],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    for i, p in enumerate(params):
        keep = masks[i]
        p32 = _opmath(p)
        g = _opmath(grads[i])
        g = -g if maximize else g
        if weight_decay != 0:
            g = g.add(p32, alpha=weight_decay)
        if momentum != 0:
            buf = _opmath(momentum_buffers[i])
            if first[i]:
                buf = buf.copy_(g) if buf is momentum_buffers[i] else g.clone()
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
            _write_back(momentum_buffers[i], buf, keep)
        _write_back(p, p32.add(g, alpha=-lr), keep)


def adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    masks: list[Tensor | None],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> None:
    for i, p in enumerate(params):
        keep = masks[i]
        steps[i].add_(1)
        step = float(steps[i])
        p32 = _opmath(p).clone()
        g = _opmath(grads[i])
        g = -g if maximize else g
        if weight_decay != 0:
            if decoupled:
                p32.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p32, alpha=weight_decay)
        m = _opmath(exp_avgs[i]).clone()
        v = _opmath(exp_avg_sqs[i]).clone()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        vhat = v
        if amsgrad:
            vmax = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            _write_back(max_exp_avg_sqs[i], vmax, keep)
            vhat = vmax
        denom = (vhat.sqrt() / bias_correction2_sqrt).add_(eps)
        p32.addcdiv_(m, denom, value=-(lr / bias_correction1))
        _write_back(exp_avgs[i], m, keep)
        _write_back(exp_avg_sqs[i], v, keep)
        _write_back(p, p32, keep)


# ---- magnitude selection (key format: ``_radix.KEY_FORMAT``) --------------------------------


def flat(t: Tensor) -> Tensor:
    """1-D view of a dense tensor in memory order (the order the kernels walk)."""
    return t.detach().as_strided((t.numel(),), (1,), t.storage_offset())


def magnitude_keys(t: Tensor) -> Tensor:
    """|t| as int64 keys ordered like |t| (the float bits with the sign cleared)."""
    view, bits, _ = KEY_FORMAT[t.dtype]
    return flat(t).view(view).to(torch.int64) & ((1 << bits) - 1)


def magnitude_histogram_(
    tensors: list[Tensor],
    masks: list[Tensor | None],
    shift: int,
    bits: int,
    prefix: int,
    prefix_mask: int,
    hist: Tensor,
) -> None:
    """hist[:2**bits] += digit counts of matching candidates; hist[-1] += NaN candidates."""
    for t, m in zip(tensors, masks):
        keys = magnitude_keys(t)
        if m is not None:
            keys = keys[flat(m)]
        hist[-1] += int((keys > KEY_FORMAT[t.dtype][2]).sum())
        keys = keys[(keys & prefix_mask) == prefix]
        digits = (keys >> shift) & ((1 << bits) - 1)
        hist[: 1 << bits] += torch.bincount(digits, minlength=1 << bits)


def threshold_mask_(
    tensors: list[Tensor],
    old_masks: list[Tensor | None],
    out_masks: list[Tensor],
    t_key: int,
    ties_to_prune: int,
) -> None:
    """out = candidate & (key > t, or key == t beyond the first `ties_to_prune` ties in flat
    order over the whole list)."""
    seen = 0
    for t, old, out in zip(tensors, old_masks, out_masks):
        keys = magnitude_keys(t)
        cand = torch.ones_like(keys, dtype=torch.bool) if old is None else flat(old).clone()
        tie = cand & (keys == t_key)
        rank = seen + torch.cumsum(tie.to(torch.int64), 0) - tie.to(torch.int64)
        keep = cand & ((keys > t_key) | (tie & (rank >= ties_to_prune)))
        seen += int(tie.sum())
        flat(out).copy_(keep)


def rewind_(
    params: list[Tensor],
    snapshots: list[Tensor],
    masks: list[Tensor | None],
    states: list[list[Tensor]],
) -> None:
    for p, s, m, st in zip(params, snapshots, masks, states):
        p.copy_(s if m is None else torch.where(m, s, torch.zeros((), dtype=s.dtype)))
        for buf in st:
            buf.zero_()
