"""MagnitudePruner: which tensors are pruned, at which rate, and the masks over rounds.

Which parameters are pruned, at which rate and why is decided in one place, ``_plan``: the
pruner uses it, and ``prunable(model, **recipe)`` shows its decision for every parameter.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .. import _ops, _validate
from ..distributed import is_dtensor, shard_like
from ..optim._masked import zero_pruned
from .threshold import prune_smallest, prune_smallest_each

Tensor = torch.Tensor

_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())  # fmt: skip

# The type keys of `include`, `exclude` and `layer_rates`, and the layers each one covers.
LAYER_TYPES = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d),
    "attention": (nn.MultiheadAttention,),  # in_proj / q,k,v_proj weights and its out_proj
    "rnn": (nn.RNNBase, nn.RNNCellBase),  # RNN, LSTM, GRU and their Cell variants
    "embedding": (nn.Embedding, nn.EmbeddingBag),
    "norm": _NORMS,
}  # fmt: skip
# The layer types whose weight matrices are pruned unless excluded; the others are opt-in.
DEFAULT_INCLUDE = ("linear", "conv", "attention", "rnn")

# A Linear registered inside one of these is not taken for the output layer by default.
_ATTENTION_BLOCKS = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
    nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
)  # fmt: skip

# Weight matrices and biases of each layer kind, by parameter name.
_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?")
_RNN_BIAS = re.compile(r"bias_(ih|hh)_l\d+(_reverse)?")
_ROLES = {
    "attention": (
        lambda n: n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
        lambda n: n in ("in_proj_bias", "bias_k", "bias_v"),
    ),
    "rnn": (
        lambda n: n in ("weight_ih", "weight_hh") or bool(_RNN_WEIGHT.fullmatch(n)),
        lambda n: n in ("bias_ih", "bias_hh") or bool(_RNN_BIAS.fullmatch(n)),
    ),
}
_PLAIN_ROLES = (lambda n: n == "weight", lambda n: n == "bias")

TORCH_PRUNE_HINT = "call lottery_ext.from_torch_prune(model) first"


def _count(m: Tensor) -> int:
    """True entries of a mask; over every shard for a DTensor (FSDP2), whose sum is partial."""
    s = m.sum()
    return int(s.full_tensor()) if is_dtensor(s) else int(s)


def _check_rate(rate: object, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(rate).__name__}")
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise ValueError(f"{what} must be in [0, 1), got {rate}")
    return float(rate)


# -- which tensors: one decision for the pruner and for prunable() -----------------------------


def _is_compiled(module: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (OptimizedModule). Without torch._dynamo imported, none
    can exist, so it is not imported here."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    cls = getattr(eval_frame, "OptimizedModule", None)
    return cls is not None and isinstance(module, cls)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` with ``torch.compile`` wrappers made transparent: the wrapper
    is left out and the ``_orig_mod`` it adds to every name below it is dropped, so a compiled
    and a plain model give the same names."""
    stripped: dict[str, str] = {}
    by_name: dict[str, nn.Module] = {}
    out = []
    for name, module in model.named_modules():
        by_name[name] = module
        parent, _, last = name.rpartition(".")
        if not name:
            new = ""
        elif last == "_orig_mod" and _is_compiled(by_name[parent]):
            new = stripped[parent]
        else:
            base = stripped[parent]
            new = f"{base}.{last}" if base else last
        stripped[name] = new
        if not _is_compiled(module):
            out.append((new, module))
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _kind(module: nn.Module) -> str | None:
    return next((k for k, types in LAYER_TYPES.items() if isinstance(module, types)), None)


def _torch_prune_names(module: nn.Module) -> set[str]:
    """Parameters of `module` reparametrised by torch.nn.utils.prune (``weight_orig``)."""
    names = set()
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, torch_prune.BasePruningMethod):
            names.add(f"{hook._tensor_name}_orig")
    for pname in module._parameters:
        if pname.endswith("_orig") and f"{pname[:-5]}_mask" in module._buffers:
            names.add(pname)
    return names


def _check_items(items: object, option: str) -> list:
    """`include`/`exclude`: names (glob patterns), type keys, or nn.Module classes."""
    if items is None:
        return []
    if isinstance(items, (str, type)):
        items = [items]
    try:
        items = list(items)
    except TypeError:
        raise TypeError(
            f"{option} must be a list of parameter/module names (globs), type keys "
            f"{sorted(LAYER_TYPES)} or nn.Module classes, got {type(items).__name__}"
        ) from None
    for i, item in enumerate(items):
        if isinstance(item, str):
            continue
        if isinstance(item, type) and issubclass(item, nn.Module):
            continue
        what = f"class {item.__name__}" if isinstance(item, type) else type(item).__name__
        hint = " (pass the class, not an instance)" if isinstance(item, nn.Module) else ""
        raise TypeError(
            f"{option}[{i}]: expected a parameter/module name (glob), a type key "
            f"{sorted(LAYER_TYPES)} or an nn.Module class, got {what}{hint}"
        )
    return items


def _item_label(item) -> str:
    return repr(item) if isinstance(item, str) else item.__name__


class _Entry:
    """One place where a parameter is registered: its module, and the layer it belongs to
    (the module itself, or the MultiheadAttention of an ``out_proj``)."""

    def __init__(self, name, pname, module, module_name, layer, layer_name, kind):
        self.name, self.pname = name, pname
        self.module, self.module_name = module, module_name
        self.layer, self.layer_name, self.kind = layer, layer_name, kind
        self.cls = type(layer).__name__
        rel = name[len(layer_name) + 1 :] if layer_name else name
        self.what = f"{self.cls} {rel}"  # "Linear weight", "LSTM weight_hh_l0_reverse"
        if kind is None:
            self.role = "bias" if _bias_like(pname) else "bare"
        else:  # an out_proj has a Linear's names
            is_weight, is_bias = _ROLES.get(kind, _PLAIN_ROLES) if layer is module else _PLAIN_ROLES
            self.role = "weight" if is_weight(pname) else "bias" if is_bias(pname) else "other"

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.name, self.module_name, self.layer_name) if n))

    def matches(self, item, names_only: bool = False) -> bool:
        if isinstance(item, type):  # the layer's class, as the type keys
            return not names_only and isinstance(self.layer, item)
        if not names_only and item in LAYER_TYPES and self.kind == item:
            return True
        candidates = (self.name,) if names_only else self.names()
        return any(fnmatch.fnmatchcase(x, item) for x in candidates)


def _bias_like(pname: str) -> bool:
    return pname == "bias" or pname.startswith("bias_") or pname.endswith("_bias")


class _Plan:
    """The decision for every parameter: rows (as ``prunable`` returns them), and the targets,
    rates and output tensors of the pruner."""

    def __init__(self, rows, targets, rates, output_names, output_layer, errors):
        self.rows, self.targets, self.rates = rows, targets, rates
        self.output_names, self.output_layer, self.errors = output_names, output_layer, errors


def _guess_output(modules: dict[str, nn.Module]) -> str | None:
    """The last Linear registered, unless it lies inside an attention or Transformer layer:
    then the last Linear that does not (None if there is none)."""

    def inside_attention(name: str) -> bool:
        parts = name.split(".") if name else []
        prefixes = [""] + [".".join(parts[:i]) for i in range(1, len(parts))]
        return any(isinstance(modules.get(p), _ATTENTION_BLOCKS) for p in prefixes)

    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears or not inside_attention(linears[-1]):
        return linears[-1] if linears else None
    outside = [n for n in linears if not inside_attention(n)]
    return outside[-1] if outside else None


def _plan(
    model: nn.Module,
    rate: float = 0.2,
    *,
    output_rate: float | None = None,
    layer_rates: Mapping[str, float] | None = None,
    scope: str = "layer",
    prune_biases: bool = False,
    include: Iterable | None = None,
    exclude: Iterable | None = None,
    output_layer: str | None = None,
    output_in_global: bool = False,
) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rate = _check_rate(rate, "rate")
    out_rate = _check_rate(rate / 2 if output_rate is None else output_rate, "output_rate")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layer_rates = dict(layer_rates or {})
    for key, r in layer_rates.items():
        _check_rate(r, f"layer_rates[{key!r}]")
    if layer_rates and scope == "global":
        raise ValueError("layer_rates apply to scope='layer'; global scope has one rate")
    include = _check_items(include, "include")
    exclude = _check_items(exclude, "exclude")

    named = _named_modules(model)
    modules = dict(named)
    if output_layer is None:
        output_layer = _guess_output(modules)
    else:
        if not isinstance(output_layer, str):
            raise TypeError(
                f"output_layer must be a module name, got {type(output_layer).__name__}"
            )
        output_layer = ".".join(p for p in output_layer.split(".") if p != "_orig_mod")
        if output_layer not in modules:
            layers = [n for n, m in named if m._parameters or isinstance(m, nn.MultiheadAttention)]
            shown = ", ".join(repr(n) for n in layers[:30]) + (", ..." if len(layers) > 30 else "")
            raise ValueError(
                f"output_layer {output_layer!r} is not a module of the model; its layers are: "
                f"{shown}"
            )

    # every place each parameter is registered, in model order (named_parameters' order)
    entries: dict[int, list[_Entry]] = {}
    tensors: dict[int, Tensor] = {}
    errors: list[str] = []
    for mod_name, module in named:
        parent_name = mod_name.rpartition(".")[0]
        parent = modules.get(parent_name) if mod_name else None
        if isinstance(parent, nn.MultiheadAttention) and parent.out_proj is module:
            layer, layer_name, kind = parent, parent_name, "attention"
        else:
            layer, layer_name, kind = module, mod_name, _kind(module)
        reparam = _torch_prune_names(module)
        for pname, p in module._parameters.items():
            if p is None:
                continue
            e = _Entry(_join(mod_name, pname), pname, module, mod_name, layer, layer_name, kind)
            if pname in reparam:
                e.role = "torch_prune"
            entries.setdefault(id(p), []).append(e)
            tensors[id(p)] = p

    unmatched = [x for x in include if isinstance(x, str) and x not in LAYER_TYPES]
    for es in entries.values():
        for e in es:
            unmatched = [x for x in unmatched if not e.matches(x)]
    if unmatched:
        raise ValueError(
            f"include: {unmatched} match no parameter name, nor the name of a module holding "
            f"parameters, and are not type keys {sorted(LAYER_TYPES)} ('block.*' matches "
            "everything under the module 'block')"
        )

    def decide(e: _Entry) -> tuple[str, str]:
        """(status, reason): status 'pruned', 'kept', 'excluded' or 'error'."""
        if e.role == "torch_prune":
            return "error", f"torch.nn.utils.prune reparametrisation: {TORCH_PRUNE_HINT}"
        by = None  # the include entry that opts this tensor in, if not by default
        if e.role == "other":
            by = next((x for x in include if isinstance(x, str) and e.matches(x, True)), None)
            if by is None:
                return "kept", f"{e.what}: not a weight matrix of {e.cls}; opt-in via include"
        elif e.kind not in DEFAULT_INCLUDE:
            by = next((x for x in include if e.matches(x)), None)
            if by is None:
                if e.kind == "embedding":
                    return "kept", f"{e.cls}: opt-in via include"
                if e.kind == "norm":
                    return "kept", f"{e.cls}: not pruned by default; opt-in via include"
                if isinstance(e.module, parametrize.ParametrizationList):
                    return "kept", "torch.nn.utils.parametrize original: opt-in via include"
                return "kept", "bare Parameter: opt-in via include"
        if e.role == "bias" and not prune_biases:
            return "kept", "bias: prune_biases=False"
        ex = next((x for x in exclude if e.matches(x)), None)
        if ex is not None:
            return "excluded", f"excluded by {_item_label(ex)}"
        what = e.what if e.kind is not None else f"bare Parameter {e.name}"
        return "pruned", what + (f" (included by {_item_label(by)})" if by is not None else "")

    rows, targets, rates, output_names = [], {}, {}, set()
    used_keys: set[str] = set()
    for pid, es in entries.items():
        decided = [(e, *decide(e)) for e in es]
        first = decided[0]
        pick = next((d for d in decided if d[1] == "error"), None)
        pick = pick or next((d for d in decided if d[1] == "excluded"), None)
        pick = pick or next((d for d in decided if d[1] == "pruned"), first)
        e, status, reason = pick
        name, p = first[0].name, tensors[pid]
        if e is not first[0]:
            reason += f" (as {e.name}, the same tensor)"
        elif len(es) > 1:
            reason += f" (also {', '.join(x.name for x in es[1:])})"
        is_output = output_layer is not None and output_layer in (e.layer_name, e.module_name)
        row_rate = None
        if status == "error":
            errors.append(
                f"{name}: the model still carries torch.nn.utils.prune's reparametrisation "
                f"({e.pname} parameter + {e.pname[:-5]}_mask buffer, applied by a forward "
                f"pre-hook); {TORCH_PRUNE_HINT} to turn it into plain weights and masks"
            )
        elif status == "pruned":
            in_pool = scope == "global" and output_in_global
            row_rate = out_rate if is_output and not in_pool else rate
            source = None
            keys = (e.kind, e.layer_name, e.module_name, e.name, name)
            for key in dict.fromkeys(k for k in keys if k):  # later keys are more specific
                if key in layer_rates and not (key == e.kind and is_output):
                    row_rate, source = layer_rates[key], key
                    used_keys.add(key)
            if is_output:
                how = "output_rate" if output_rate is not None else "rate/2"
                how = "in the global pool" if in_pool else how
                how = f"layer_rates[{source!r}]" if source is not None else how
                reason += f", output layer ({how})"
                output_names.add(name)
            elif source is not None:
                reason += f", rate from layer_rates[{source!r}]"
            targets[name] = p
            rates[name] = row_rate
        elif is_output:
            reason += " (output layer)"
        kind = e.kind if e.kind is not None else "parameter"
        rows.append(dict(name=name, shape=tuple(p.shape), numel=p.numel(),
                         pruned=status == "pruned", rate=row_rate, reason=reason,
                         kind=kind, output=is_output))  # fmt: skip
    unknown = set(layer_rates) - used_keys - set(LAYER_TYPES)
    if unknown:
        raise ValueError(
            f"layer_rates keys match no pruned tensor: {sorted(unknown)} "
            "(lottery_ext.prunable(model, ...) says why each parameter is or is not pruned)"
        )
    return _Plan(rows, targets, rates, output_names, output_layer, errors)


@torch.no_grad()
def random_like(masks: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """The random-mask control for `masks`: per tensor (in the mapping's order), a new mask
    keeping exactly as many weights, at positions drawn uniformly over the whole tensor from
    `generator` (one ``torch.rand`` of the tensor's shape each; ties cannot bias it)."""
    out = {}
    for name, m in masks.items():
        scores = torch.rand(m.shape, generator=generator)
        out[name] = prune_smallest(scores, m.numel() - _count(m), names=[name])[0].to(m.device)
    return out


def prunable(model: nn.Module, **recipe) -> list[dict]:
    """What ``MagnitudePruner(model, **recipe)`` would prune, without pruning anything: one
    row per parameter of the model (in ``named_parameters()`` order) with ``name``,
    ``shape``, ``numel``, ``pruned`` (bool), ``rate`` (None when not pruned), ``reason``
    (e.g. ``"Linear weight"``, ``"bias: prune_biases=False"``, ``"excluded by 'fc*'"``,
    ``"Embedding: opt-in via include"``), ``kind`` (the type key, or ``"parameter"`` for a
    bare Parameter) and ``output`` (part of the output layer). ``recipe`` takes the pruner's
    keyword arguments (``rate``, ``include``, ``exclude``, ``layer_rates``, ...) and raises
    the same errors for bad ones. ``format_prunable(rows)`` makes a table of the rows."""
    return _plan(model, **recipe).rows


def format_prunable(rows: list[dict]) -> str:
    """A table of ``prunable()`` rows: name, shape, numel, pruned, rate, reason, and totals."""
    width = max([30] + [len(r["name"]) for r in rows])
    lines = [f"{'name':{width}s} {'shape':>18s} {'numel':>12s} {'pruned':>6s} {'rate':>6s}  reason"]
    for r in rows:
        rate = "" if r["rate"] is None else f"{r['rate']:.4g}"
        lines.append(f"{r['name']:{width}s} {str(r['shape']):>18s} {r['numel']:>12,d} "
                     f"{'yes' if r['pruned'] else 'no':>6s} {rate:>6s}  {r['reason']}")  # fmt: skip
    pruned = sum(r["numel"] for r in rows if r["pruned"])
    total = sum(r["numel"] for r in rows)
    share = f"{100 * pruned / total:.2f}%" if total else "-"
    n = sum(r["pruned"] for r in rows)
    lines.append(
        f"{n} of {len(rows)} tensors pruned, holding {pruned:,d} of {total:,d} parameters ({share})"
    )
    return "\n".join(lines)


class MagnitudePruner:
    """Iterative magnitude pruning as in Frankle & Carbin (2019).

    Each ``prune()`` removes, from every pruned tensor, its `rate` fraction of the weights
    still remaining — exactly ``round(rate * remaining)`` of them, the smallest magnitudes,
    ties broken by flat index — and the output layer at ``output_rate`` (default ``rate / 2``,
    as in the paper). Pruned weights never come back.

    Args:
        model: the network (a ``torch.compile``-d model prunes its underlying module; names
            are given without the ``_orig_mod.`` prefix).
        rate: fraction of the remaining weights pruned per round.
        output_rate: rate of the output layer (``output_layer``; default ``rate / 2``).
        layer_rates: overrides by parameter name (``"fc1.weight"``), module name (``"fc1"``)
            or type key (``"conv"``, ``"linear"``, ``"attention"``, ``"rnn"``, ``"embedding"``,
            ``"norm"``), e.g. ``{"conv": 0.1, "linear": 0.2}`` for the paper's Conv-2/4/6
            recipe. A type key does not override ``output_rate``.
        scope: ``"layer"`` (each tensor loses its own fraction) or ``"global"`` (one exact
            threshold across all pruned tensors except the output layer, which keeps its own
            ``output_rate`` unless ``output_in_global=True``).
        prune_biases: prune the biases of the pruned layers too (kept by default).
        include: what to prune besides the default (``DEFAULT_INCLUDE``: every weight matrix
            of Linear, Conv*/ConvTranspose*, MultiheadAttention (with its ``out_proj``) and
            RNN/LSTM/GRU and their cells): type keys (``"embedding"``, ``"norm"``),
            nn.Module classes, or parameter/module names (glob patterns; the way to opt in
            the bare Parameters of custom modules).
        exclude: never pruned, over everything else: parameter or module names (glob
            patterns), type keys or nn.Module classes.
        output_layer: module name of the output layer. Default: the last ``nn.Linear``
            registered, or, when that one lies inside a MultiheadAttention/Transformer layer
            (an ``out_proj``, say), the last Linear outside them. ``self.output_layer`` says
            which one was chosen.

    ``lottery_ext.prunable(model, **same_arguments)`` lists every parameter with whether it
    is pruned, its rate, and why.
    """

    def __init__(
        self,
        model: nn.Module,
        rate: float = 0.2,
        *,
        output_rate: float | None = None,
        layer_rates: Mapping[str, float] | None = None,
        scope: str = "layer",
        prune_biases: bool = False,
        include: Iterable | None = None,
        exclude: Iterable | None = None,
        output_layer: str | None = None,
        output_in_global: bool = False,
    ) -> None:
        plan = _plan(model, rate, output_rate=output_rate, layer_rates=layer_rates, scope=scope,
                     prune_biases=prune_biases, include=include, exclude=exclude,
                     output_layer=output_layer, output_in_global=output_in_global)  # fmt: skip
        if plan.errors:
            raise ValueError("; ".join(plan.errors))
        if not plan.targets:
            raise ValueError(
                "the model has no weights to prune (lottery_ext.prunable(model, ...) says why "
                "each parameter is left out; `include` opts in embeddings, norms and bare "
                "Parameters)"
            )
        self.model = model
        self.rate = float(rate)
        self.output_rate = float(rate / 2 if output_rate is None else output_rate)
        self.scope = scope
        self.output_in_global = bool(output_in_global)
        self.output_layer = plan.output_layer
        self.targets: dict[str, Tensor] = plan.targets  # name -> parameter, in model order
        self.rates: dict[str, float] = plan.rates
        self._output_names: set[str] = plan.output_names
        self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.targets.items()}
        self._optimizers: list = []
        self.rounds = 0

    # -- masks ---------------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, Tensor]:
        """name -> bool mask (True = kept) for every pruned tensor."""
        return dict(self._masks)

    def _layer_counts(self, old: Mapping[str, Tensor]) -> dict[str, int]:
        """Layer scope: how many weights each tensor loses this round (exact, compounded)."""
        return {n: round(self.rates[n] * _count(m)) for n, m in old.items()}

    def _global_pool(self) -> list[str]:
        return [n for n in self.targets if n not in self._output_names or self.output_in_global]

    @torch.no_grad()
    def _magnitude_round(self, old: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The next round's masks from `old` (default: the pruner's own), nothing changed."""
        old = self._masks if old is None else old
        new = {}
        if self.scope == "layer":
            counts = self._layer_counts(old)
            every = list(self.targets)
            for group in _ops.group_by_device_dtype(list(self.targets.values())):
                names = [every[i] for i in group]  # each its own threshold, selected together
                tensors = [self.targets[n].detach() for n in names]
                masks = prune_smallest_each(tensors, [counts[n] for n in names],
                                            [old[n] for n in names],
                                            names=names)  # fmt: skip
                new.update(zip(names, masks))
            return new
        pool = self._global_pool()
        remaining = sum(_count(old[n]) for n in pool)
        tensors = [self.targets[n].detach() for n in pool]
        if len(_ops.group_by_device_dtype(tensors)) > 1:
            raise TypeError("global pruning needs all pruned tensors on one device and dtype")
        if pool:  # empty when the output layer is all there is
            out = prune_smallest(tensors, round(self.rate * remaining),
                                 [old[n] for n in pool], names=pool)  # fmt: skip
            new.update(zip(pool, out))
        for name in self.targets:
            if name not in new:  # the output layer, at its own rate
                count = round(self.output_rate * _count(old[name]))
                new[name] = prune_smallest(self.targets[name].detach(), count, old[name],
                                           names=[name])[0]  # fmt: skip
        return new

    def compute_masks(self, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The masks the next ``prune()`` would produce, without applying them or changing
        the pruner: from `masks` (name -> bool mask of every pruned tensor, e.g. a level's
        ticket) when given, else from the pruner's own. A pure function of the model's
        current weights, the masks and the recipe."""
        if masks is None:
            return self._magnitude_round()
        return self._magnitude_round(self._checked_masks(masks))

    def _checked_masks(self, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """`masks` checked against the pruned tensors, in each parameter's memory layout."""
        if set(masks) != set(self.targets):
            raise ValueError(
                f"mask names differ from this pruner's tensors: "
                f"missing {sorted(set(self.targets) - set(masks))[:5]}, "
                f"unexpected {sorted(set(masks) - set(self.targets))[:5]}"
            )
        out = {}
        for name, p in self.targets.items():  # check everything before changing anything
            m = masks[name]
            m = m.to(p.device) if isinstance(m, Tensor) else m
            _validate.mask(m, p, name)
            if is_dtensor(p) and not is_dtensor(m):  # FSDP2: a whole mask, cut like p
                m = shard_like(m, p)
            out[name] = torch.empty_like(p, dtype=torch.bool).copy_(m)  # p's memory layout
        return out

    def prune(self) -> dict[str, Tensor]:
        """One round of magnitude pruning. Zeroes the newly pruned weights, updates attached
        optimizers, and returns the new masks (name -> bool tensor)."""
        return self._commit(self._magnitude_round())

    def random_masks(self, seed: int = 0) -> dict[str, Tensor]:
        """The random-mask control of the next round, without changing anything: each
        tensor keeps exactly as many weights as ``prune()`` would leave it, at positions drawn
        uniformly over the whole tensor (``random_like``, seeded) — the paper's "randomly
        pruned network" of the same per-layer sparsity, as ``lottery-ext find`` trains it."""
        return random_like(self.compute_masks(), torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def prune_randomly(self, seed: int = 0) -> dict[str, Tensor]:
        """One round of iterative random pruning, committed like ``prune()``: each tensor
        loses as many of its *surviving* weights as ``prune()`` would remove, chosen at
        random (seeded; pruned weights stay pruned). Zeroes the removed weights, updates
        attached optimizers, returns the masks."""
        magnitude = self._magnitude_round()
        gen = torch.Generator().manual_seed(seed)
        new = {}
        for name, p in self.targets.items():
            old = self._masks[name]
            count = _count(old) - _count(magnitude[name])
            # scores in the mask's memory layout, so ties and layouts line up with `old`
            scores = torch.empty_like(old, dtype=torch.float32)
            draw = torch.rand(p.shape, generator=gen)
            scores.copy_(shard_like(draw, old) if is_dtensor(old) else draw)  # FSDP2: its rows
            new[name] = prune_smallest(scores, count, old, names=[name])[0]
        return self._commit(new)

    def random_prune(self, seed: int = 0) -> dict[str, Tensor]:
        """Deprecated: its name hid that it changes the pruner. Use ``random_masks(seed)``
        (pure) or ``prune_randomly(seed)`` (commits, as this did)."""
        warnings.warn(
            "MagnitudePruner.random_prune() changes the pruner; use random_masks(seed) for the "
            "control's masks without changing anything, or prune_randomly(seed) to commit them",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.prune_randomly(seed)

    @torch.no_grad()
    def _commit(self, new: dict[str, Tensor]) -> dict[str, Tensor]:
        for name, m in new.items():
            if (m & ~self._masks[name]).any():  # defensive: the kernels never revive
                raise RuntimeError(f"internal error: mask of {name} revived pruned weights")
        self._masks = new
        self.rounds += 1
        self.apply()
        return self.masks

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights of the model and push the masks to attached optimizers."""
        pairs = []  # every tensor the masks zero, attached optimizers' state included
        for name, p in self.targets.items():
            m = self._masks[name]
            pairs.append((p.detach(), m))
            pairs += [(b, m) for opt in self._optimizers for b in opt.state_buffers(p)]
        zero_pruned(pairs)  # one pass per tensor; a DTensor (FSDP2): its shard, masked alike
        for opt in self._optimizers:
            for name, p in self.targets.items():
                opt.set_mask(p, self._masks[name], zero=False)

    def attach(self, optimizer) -> None:
        """Keep `optimizer`'s masks (a lottery_ext masked optimizer) in sync after every
        round, starting now."""
        if not hasattr(optimizer, "set_mask"):
            raise TypeError(
                "attach() needs a lottery_ext masked optimizer (MaskedSGD/MaskedAdam/MaskedAdamW)"
            )
        self._optimizers.append(optimizer)
        for name, p in self.targets.items():
            optimizer.set_mask(p, self._masks[name])

    # -- reporting ----------------------------------------------------------------------------

    def density(self) -> dict[str, float]:
        """Fraction of weights remaining: over the pruned tensors and over all parameters."""
        kept = sum(_count(m) for m in self._masks.values())
        total = sum(m.numel() for m in self._masks.values())
        all_params = sum(p.numel() for p in self.model.parameters())
        return {
            "pruned_tensors": kept / total if total else 1.0,
            "all_parameters": (all_params - (total - kept)) / all_params if all_params else 1.0,
        }

    def layer_stats(self) -> list[dict]:
        rows = []
        for name, m in self._masks.items():
            kept = _count(m)
            rows.append(dict(name=name, shape=tuple(m.shape), remaining=kept, total=m.numel(),
                             fraction=kept / m.numel() if m.numel() else 1.0,
                             rate=self.rates[name]))  # fmt: skip
        return rows

    def report(self) -> str:
        """A table: name, shape, remaining, fraction (the output layer's rows marked), and
        the totals; a last line names the output layer when none of its tensors is pruned."""
        rows = self.layer_stats()
        w = max([30] + [len(r["name"]) for r in rows])
        lines = [f"{'name':{w}s} {'shape':>18s} {'remaining':>12s} {'fraction':>9s}"]
        for r in rows:
            mark = "  output layer" if r["name"] in self._output_names else ""
            lines.append(f"{r['name']:{w}s} {str(r['shape']):>18s} "
                         f"{r['remaining']:>12,d} {100 * r['fraction']:8.2f}%{mark}")  # fmt: skip
        d = self.density()
        for label, key in (
            ("pruned tensors", "pruned_tensors"),
            ("all parameters", "all_parameters"),
        ):
            lines.append(f"{label:{w}s} {'':>18s} {'':>12s} {100 * d[key]:8.2f}%")
        if not self._output_names:
            which = "none" if self.output_layer is None else f"{self.output_layer} (not pruned)"
            lines.append(f"output layer: {which}")
        return "\n".join(lines)

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"masks": {n: m.clone() for n, m in self._masks.items()}, "rounds": self.rounds}

    def load_state_dict(self, sd: Mapping) -> None:
        self._masks = self._checked_masks(sd["masks"])
        self.rounds = int(sd.get("rounds", 0))
        self.apply()
