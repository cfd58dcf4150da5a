"""Recipes of the paper (Frankle & Carbin 2019, Figure 2 and Appendix) as presets.

A preset fills every setting of a run; command-line options override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    dataset: str  # experiments.data.load_dataset name
    model: str  # experiments.models.build_model name
    init: str  # experiments.models init scheme
    optimizer: str  # sgd | momentum | adam | adamw
    lr: float
    batch_size: int
    iterations: int
    rounds: int
    trials: int
    hidden: tuple[int, ...] | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup: int = 0  # linear LR warmup iterations
    milestones: tuple[int, ...] = ()  # LR x 0.1 at each
    rate: float = 0.2
    output_rate: float | None = None  # None: rate / 2
    conv_rate: float | None = None  # None: rate
    scope: str = "layer"
    eval_every: int = 100
    augment: bool = False
    dropout: float = 0.0
    controls: tuple[str, ...] = ("reinit", "random_prune")
    threads: int | None = None  # None: torch's default (all cores)
    needs_data: str = ""  # what --data-dir must hold, "" if nothing

    def recipe(self) -> str:
        opt = f"{self.optimizer} lr {self.lr:g}"
        if self.momentum:
            opt += f" momentum {self.momentum:g}"
        if self.weight_decay:
            opt += f" wd {self.weight_decay:g}"
        if self.milestones:
            opt += f", LR x0.1 at {', '.join(f'{m:,}' for m in self.milestones)}"
        if self.warmup:
            opt += f", warmup {self.warmup:,}"
        rates = f"{self.scope} {self.rate:.0%}"
        if self.conv_rate is not None:
            rates = f"conv {self.conv_rate:.0%}, fc {self.rate:.0%}"
        out = self.rate / 2 if self.output_rate is None else self.output_rate
        rates += f", output {out:.0%}"
        return (
            f"{self.model} on {self.dataset}; {opt}; batch {self.batch_size}, "
            f"{self.iterations:,} iterations, eval every {self.eval_every}; prune {rates}; "
            f"{self.rounds} rounds x {self.trials} trials; init {self.init}"
        )


_CIFAR = "CIFAR-10 python batches (data_batch_1..5, test_batch)"


def _conv(depth: int, lr: float, iterations: int, conv_rate: float) -> Preset:
    """Conv-2/4/6 on CIFAR-10 (paper Figure 5): Adam, batch 60, fc layers at 20%, conv layers
    at `conv_rate`, output at 10%; they differ in depth, learning rate, length, conv rate."""
    return Preset(
        name=f"conv{depth}-cifar10",
        description=f"Conv-{depth} on CIFAR-10 (paper Figure 5)",
        dataset="cifar10",
        model=f"conv{depth}",
        init="glorot_normal",
        optimizer="adam",
        lr=lr,
        batch_size=60,
        iterations=iterations,
        rate=0.2,
        conv_rate=conv_rate,
        rounds=20,
        trials=5,
        needs_data=_CIFAR,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="mnist1d-mlp",
            description="default: an MLP on MNIST-1D (generated, no download), minutes on 2 cores",
            dataset="mnist1d",
            model="mlp",
            hidden=(256, 128),
            init="glorot_normal",
            optimizer="adam",
            lr=2e-3,
            batch_size=100,
            iterations=2_000,
            eval_every=100,
            rounds=8,
            trials=2,
            threads=1,  # a model this small only loses time to thread synchronisation
        ),
        Preset(
            name="lenet300-mnist",
            description="LeNet-300-100 on MNIST (paper Figure 3/4)",
            dataset="mnist",
            model="lenet300",
            init="glorot_normal",
            optimizer="adam",
            lr=1.2e-3,
            batch_size=60,
            iterations=50_000,
            rounds=20,
            trials=5,
            needs_data="MNIST IDX files (train-images-idx3-ubyte[.gz], ...)",
        ),
        *(
            _conv(depth, lr, iterations, conv_rate)
            for depth, lr, iterations, conv_rate in (
                (2, 2e-4, 20_000, 0.1),
                (4, 3e-4, 25_000, 0.1),
                (6, 3e-4, 30_000, 0.15),
            )
        ),
        Preset(
            name="resnet20-cifar10",
            description="ResNet-20 on CIFAR-10, global pruning (paper Section 4; add "
            "--warmup 20000 to find tickets at lr 0.1)",
            dataset="cifar10",
            model="resnet20",
            init="kaiming_normal",
            optimizer="momentum",
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-4,
            batch_size=128,
            iterations=30_000,
            milestones=(20_000, 25_000),
            scope="global",
            rate=0.2,
            output_rate=0.0,
            augment=True,
            eval_every=500,
            rounds=15,
            trials=3,
            needs_data=_CIFAR,
        ),
        Preset(
            name="vgg19-cifar10",
            description="VGG-19 on CIFAR-10, global pruning (paper Section 4; add "
            "--warmup 10000 to find tickets at lr 0.1)",
            dataset="cifar10",
            model="vgg19",
            init="kaiming_normal",
            optimizer="momentum",
            lr=0.1,
            momentum=0.9,
            weight_decay=1e-4,
            batch_size=64,
            iterations=112_000,
            milestones=(80_000,),
            scope="global",
            rate=0.2,
            output_rate=0.0,
            augment=True,
            eval_every=1000,
            rounds=15,
            trials=3,
            needs_data=_CIFAR,
        ),
    ]
}

DEFAULT_PRESET = "mnist1d-mlp"


# What each setting means: the help of its `lottery-ext find --option` (one source: the CLI
# options are generated from RunConfig's fields and this table).
HELP = {
    "trials": "independent trials (each its own θ0)",
    "rounds": "pruning rounds (levels after the dense one)",
    "iterations": "training iterations per level",
    "eval_every": "evaluate on validation and test every N iterations",
    "batch_size": "mini-batch size",
    "optimizer": "sgd | momentum | adam | adamw (lottery_ext masked optimizers)",
    "lr": "learning rate",
    "momentum": "SGD momentum (optimizer momentum)",
    "weight_decay": "weight decay (surviving weights only)",
    "warmup": "linear learning-rate warmup iterations",
    "milestones": "comma-separated iterations where the learning rate drops x0.1",
    "dropout": "dropout after each hidden fully-connected layer, in [0, 1)",
    "rate": "fraction of the remaining weights pruned per round, in [0, 1)",
    "output_rate": "rate of the output layer (default rate / 2)",
    "conv_rate": "rate of the conv layers (default rate)",
    "scope": "layer (each tensor its own fraction) | global (one threshold)",
    "controls": "comma list of reinit,random_prune, or 'none'",
    "rewind_iteration": "late rewinding: reset survivors to their values at iteration k",
    "val_size": "validation examples held out of the training set",
    "seed": "seed of everything random (the same seed gives the same results)",
    "threads": "CPU threads (default: the preset's, else torch's)",
    "checkpoint_every": "write a resumable checkpoint every N iterations",
    "device": "cpu or cuda",
}


@dataclass
class RunConfig:
    """Every setting of a run. Saved as config.json; a rerun must match it to resume."""

    preset: str
    dataset: str
    model: str
    init: str
    optimizer: str
    lr: float
    batch_size: int
    iterations: int
    rounds: int
    trials: int
    hidden: list[int] | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup: int = 0
    milestones: list[int] = field(default_factory=list)
    rate: float = 0.2
    output_rate: float | None = None
    conv_rate: float | None = None
    scope: str = "layer"
    eval_every: int = 100
    augment: bool = False
    dropout: float = 0.0
    controls: list[str] = field(default_factory=lambda: ["reinit", "random_prune"])
    rewind_iteration: int = 0
    val_size: int | None = None
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 1000
    # TicketSearch only: the MagnitudePruner options as given (presets derive theirs)
    pruner_options: dict | None = None

    @classmethod
    def from_preset(cls, preset: Preset, **overrides) -> RunConfig:
        base = {f.name: getattr(preset, f.name) for f in dataclasses.fields(cls)
                if hasattr(preset, f.name)}  # fmt: skip
        base["preset"] = preset.name
        for key in ("hidden", "milestones", "controls"):
            if base.get(key) is not None:
                base[key] = list(base[key])
        given = {k: v for k, v in overrides.items() if v is not None}
        if (
            given.get("optimizer") == "momentum"
            and "momentum" not in given
            and not base["momentum"]
        ):
            given["momentum"] = 0.9  # asking for momentum SGD without a value means the usual 0.9
        base.update(given)
        cfg = cls(**base)
        cfg.check()
        return cfg

    def check(self) -> None:
        custom = self.preset == "custom"  # TicketSearch: the optimizer is the user's factory
        if not custom and self.optimizer not in ("sgd", "momentum", "adam", "adamw"):
            raise ValueError(
                f"optimizer must be sgd, momentum, adam or adamw, not {self.optimizer!r}"
            )
        for key in ("iterations", "batch_size", "eval_every", "trials", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not 0 <= self.rewind_iteration < self.iterations:
            raise ValueError(
                f"rewind_iteration must be in [0, iterations={self.iterations}), "
                f"got {self.rewind_iteration}"
            )
        unknown = set(self.controls) - {"reinit", "random_prune"}
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; use reinit, random_prune")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be layer or global, not {self.scope!r}")
        for key in ("rate", "output_rate", "conv_rate"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if self.optimizer == "momentum" and self.momentum <= 0:
            raise ValueError("optimizer 'momentum' needs --momentum > 0 (or use --optimizer sgd)")
        if not custom and (self.lr <= 0 or self.warmup < 0 or not 0 <= self.dropout < 1):
            raise ValueError("lr must be > 0, warmup >= 0 and dropout in [0, 1)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["pruner_options"] is None:  # presets: the same dict (and run-directory hash)
            del d["pruner_options"]
        return d
