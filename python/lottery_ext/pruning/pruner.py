"""MagnitudePruner: which tensors are pruned, at which rate, and the masks over rounds."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .. import _ops, _validate
from .threshold import prune_smallest, prune_smallest_each

Tensor = torch.Tensor

# Layer types pruned by default and the type keys `layer_rates` understands.
LAYER_TYPES = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d),
}  # fmt: skip


def _check_rate(rate: object, what: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(rate).__name__}")
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise ValueError(f"{what} must be in [0, 1), got {rate}")
    return float(rate)


class MagnitudePruner:
    """Iterative magnitude pruning as in Frankle & Carbin (2019).

    Each ``prune()`` removes, from every pruned tensor, its `rate` fraction of the weights
    still remaining — exactly ``round(rate * remaining)`` of them, the smallest magnitudes,
    ties broken by flat index — and the output layer at ``output_rate`` (default ``rate / 2``,
    as in the paper). Pruned weights never come back.

    Args:
        model: the network.
        rate: fraction of the remaining weights pruned per round.
        output_rate: rate of the output layer (the last ``nn.Linear``, or ``output_layer``).
        layer_rates: overrides by parameter name (``"fc1.weight"``), module name (``"fc1"``)
            or layer type (``"conv"``, ``"linear"``), e.g. ``{"conv": 0.1, "linear": 0.2}``
            for the paper's Conv-2/4/6 recipe. A type key does not override ``output_rate``.
        scope: ``"layer"`` (each tensor loses its own fraction) or ``"global"`` (one exact
            threshold across all pruned tensors except the output layer, which keeps its own
            ``output_rate`` unless ``output_in_global=True``).
        prune_biases: prune the biases of the pruned layers too (kept by default).
        exclude: parameter or module names (glob patterns allowed) never pruned.
        output_layer: module name of the output layer (default: the last ``nn.Linear``).
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
        exclude: Iterable[str] | None = None,
        output_layer: str | None = None,
        output_in_global: bool = False,
    ) -> None:
        self.model = model
        self.rate = _check_rate(rate, "rate")
        self.output_rate = _check_rate(rate / 2 if output_rate is None else output_rate,
                                       "output_rate")  # fmt: skip
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.scope = scope
        self.output_in_global = bool(output_in_global)
        layer_rates = dict(layer_rates or {})
        for key, r in layer_rates.items():
            _check_rate(r, f"layer_rates[{key!r}]")
        if layer_rates and scope == "global":
            raise ValueError("layer_rates apply to scope='layer'; global scope has one rate")
        exclude = list(exclude or [])

        modules = dict(model.named_modules())
        if output_layer is None:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            output_layer = linears[-1] if linears else None
        elif output_layer not in modules:
            raise ValueError(f"output_layer {output_layer!r} is not a module of the model")
        self.output_layer = output_layer

        self.targets: dict[str, Tensor] = {}  # name -> parameter, in model order
        self.rates: dict[str, float] = {}
        self._output_names: set[str] = set()
        used_keys: set[str] = set()
        for mod_name, module in modules.items():
            kind = next((k for k, types in LAYER_TYPES.items() if isinstance(module, types)), None)
            if kind is None:
                continue
            for pname, p in module.named_parameters(recurse=False):
                if pname != "weight" and not (pname == "bias" and prune_biases):
                    continue
                name = f"{mod_name}.{pname}" if mod_name else pname
                if any(fnmatch.fnmatchcase(x, pat) for x in (name, mod_name) for pat in exclude):
                    continue
                is_output = mod_name == output_layer
                rate_ = self.output_rate if is_output else self.rate
                for key in (kind, mod_name, name):  # later keys are more specific
                    if key in layer_rates and not (key == kind and is_output):
                        rate_ = layer_rates[key]
                        used_keys.add(key)
                self.targets[name] = p
                self.rates[name] = rate_
                if is_output:
                    self._output_names.add(name)
        unknown = set(layer_rates) - used_keys - set(LAYER_TYPES)
        if unknown:
            raise ValueError(f"layer_rates keys match no pruned tensor: {sorted(unknown)}")
        if not self.targets:
            raise ValueError("the model has no Linear or Conv weights to prune")
        self._masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.targets.items()}
        self._optimizers: list = []
        self.rounds = 0

    # -- masks ---------------------------------------------------------------------------------

    @property
    def masks(self) -> dict[str, Tensor]:
        """name -> bool mask (True = kept) for every pruned tensor."""
        return dict(self._masks)

    def _layer_counts(self) -> dict[str, int]:
        """Layer scope: how many weights each tensor loses this round (exact, compounded)."""
        return {n: round(self.rates[n] * int(m.sum())) for n, m in self._masks.items()}

    def _global_pool(self) -> list[str]:
        return [n for n in self.targets if n not in self._output_names or self.output_in_global]

    @torch.no_grad()
    def _magnitude_round(self) -> dict[str, Tensor]:
        new = {}
        if self.scope == "layer":
            counts = self._layer_counts()
            groups: dict[tuple, list[str]] = {}
            for name, p in self.targets.items():
                groups.setdefault((p.device, p.dtype), []).append(name)
            for names in groups.values():  # each layer its own threshold, selected together
                tensors = [self.targets[n].detach() for n in names]
                masks = prune_smallest_each(tensors, [counts[n] for n in names],
                                            [self._masks[n] for n in names],
                                            names=names)  # fmt: skip
                new.update(zip(names, masks))
            return new
        pool = self._global_pool()
        remaining = sum(int(self._masks[n].sum()) for n in pool)
        tensors = [self.targets[n].detach() for n in pool]
        by_dtype: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault((t.device, t.dtype), []).append(i)
        if len(by_dtype) > 1:
            raise TypeError("global pruning needs all pruned tensors on one device and dtype")
        out = prune_smallest(tensors, round(self.rate * remaining), [self._masks[n] for n in pool],
                             names=pool)  # fmt: skip
        new.update(zip(pool, out))
        for name in self.targets:
            if name not in new:  # the output layer, at its own rate
                count = round(self.output_rate * int(self._masks[name].sum()))
                new[name] = prune_smallest(self.targets[name].detach(), count, self._masks[name],
                                           names=[name])[0]  # fmt: skip
        return new

    def compute_masks(self) -> dict[str, Tensor]:
        """The masks the next ``prune()`` would produce, without applying them."""
        return self._magnitude_round()

    def prune(self) -> dict[str, Tensor]:
        """One round of magnitude pruning. Zeroes the newly pruned weights, updates attached
        optimizers, and returns the new masks (name -> bool tensor)."""
        return self._commit(self._magnitude_round())

    @torch.no_grad()
    def random_masks(self, seed: int = 0) -> dict[str, Tensor]:
        """The random-mask control, without changing anything: for each tensor, the masks
        ``prune()`` would give it next, but with exactly as many of its surviving weights
        removed at random (seeded) as ``prune()`` would remove by magnitude."""
        magnitude = self._magnitude_round()
        gen = torch.Generator().manual_seed(seed)
        new = {}
        for name, p in self.targets.items():
            old = self._masks[name]
            count = int(old.sum()) - int(magnitude[name].sum())
            # scores in the mask's memory layout, so ties and layouts line up with `old`
            scores = torch.empty_like(old, dtype=torch.float32)
            scores.copy_(torch.rand(p.shape, generator=gen))
            new[name] = prune_smallest(scores, count, old, names=[name])[0]
        return new

    def prune_randomly(self, seed: int = 0) -> dict[str, Tensor]:
        """One round of random pruning (``random_masks(seed)``) committed like ``prune()``:
        zeroes the removed weights, updates attached optimizers, returns the masks."""
        return self._commit(self.random_masks(seed))

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
        groups: dict[tuple, tuple[list, list]] = {}
        for name, p in self.targets.items():
            g = groups.setdefault((p.device, p.dtype), ([], []))
            g[0].append(p.detach())
            g[1].append(self._masks[name])
        for tensors, ms in groups.values():
            _ops.apply_mask(tensors, ms)
        for opt in self._optimizers:
            for name, p in self.targets.items():
                opt.set_mask(p, self._masks[name])

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
        kept = sum(int(m.sum()) for m in self._masks.values())
        total = sum(m.numel() for m in self._masks.values())
        all_params = sum(p.numel() for p in self.model.parameters())
        return {
            "pruned_tensors": kept / total if total else 1.0,
            "all_parameters": (all_params - (total - kept)) / all_params if all_params else 1.0,
        }

    def layer_stats(self) -> list[dict]:
        rows = []
        for name, m in self._masks.items():
            kept = int(m.sum())
            rows.append(dict(name=name, shape=tuple(m.shape), remaining=kept, total=m.numel(),
                             fraction=kept / m.numel() if m.numel() else 1.0,
                             rate=self.rates[name]))  # fmt: skip
        return rows

    def report(self) -> str:
        """A table: name, shape, remaining, fraction (and the totals)."""
        rows = self.layer_stats()
        lines = [f"{'name':30s} {'shape':>18s} {'remaining':>12s} {'fraction':>9s}"]
        for r in rows:
            lines.append(f"{r['name']:30s} {str(r['shape']):>18s} "
                         f"{r['remaining']:>12,d} {100 * r['fraction']:8.2f}%")  # fmt: skip
        d = self.density()
        lines.append(
            f"{'pruned tensors':30s} {'':>18s} {'':>12s} {100 * d['pruned_tensors']:8.2f}%"
        )
        lines.append(
            f"{'all parameters':30s} {'':>18s} {'':>12s} {100 * d['all_parameters']:8.2f}%"
        )
        return "\n".join(lines)

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"masks": {n: m.clone() for n, m in self._masks.items()}, "rounds": self.rounds}

    def load_state_dict(self, sd: Mapping) -> None:
        masks = sd["masks"]
        if set(masks) != set(self.targets):
            raise ValueError(
                f"mask names differ from this pruner's tensors: "
                f"missing {sorted(set(self.targets) - set(masks))[:5]}, "
                f"unexpected {sorted(set(masks) - set(self.targets))[:5]}"
            )
        loaded = {}
        for name, p in self.targets.items():  # check everything before changing anything
            m = masks[name].to(p.device)
            _validate.mask(m, p, name)
            loaded[name] = torch.empty_like(p, dtype=torch.bool).copy_(m)  # p's memory layout
        self._masks = loaded
        self.rounds = int(sd.get("rounds", 0))
        self.apply()
