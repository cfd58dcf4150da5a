"""The `lottery-ext` command line (also `python -m lottery_ext`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    import lottery_ext

    print(json.dumps(lottery_ext.build_info(), indent=2))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .experiments.estimate import preset_size
    from .experiments.presets import DEFAULT_PRESET, PRESETS, RunConfig

    if not args.no_time:
        print("(rough times: a training step of each preset timed here on random data, once; "
              "remembered in the user cache; --no-time skips it)", file=sys.stderr)  # fmt: skip
    for p in PRESETS.values():
        star = " (default)" if p.name == DEFAULT_PRESET else ""
        print(f"{p.name}{star}: {p.description}")
        print(f"    {p.recipe()}")
        print(f"    {preset_size(RunConfig.from_preset(p), timed=not args.no_time)}")
        if p.needs_data:
            print(f"    --data-dir: {p.needs_data}")
        sys.stdout.flush()  # one preset at a time: the timings take a moment
    return 0


# `find` options that set a RunConfig field directly: generated from the fields (their help
# from presets.HELP); `milestones` and `controls` take comma lists.
_LISTS = ("milestones", "controls")
_CHOICES = {"optimizer": ["sgd", "momentum", "adam", "adamw"], "scope": ["layer", "global"]}


def _config_options() -> dict[str, type]:
    import dataclasses
    import typing

    from .experiments.presets import HELP, RunConfig

    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        if f.name not in HELP:
            continue
        hint = str(hints[f.name])
        out[f.name] = int if "int" in hint and "list" not in hint else (
            float if "float" in hint else str)  # fmt: skip
    return out


def _cmd_find(args: argparse.Namespace) -> int:
    from .experiments.presets import PRESETS, RunConfig
    from .experiments.report import report
    from .experiments.runner import Experiment, default_out_dir

    if args.preset not in PRESETS:
        print(f"error: unknown preset {args.preset!r}; `lottery-ext presets` lists them",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        overrides = _checked_options(args)  # every option, before anything is written
        cfg = RunConfig.from_preset(PRESETS[args.preset], **overrides)
        task = None
        if args.model or args.data:
            cfg, task = _own_search(args, cfg)
        if args.dry_run:
            return _dry_run(cfg, args.data_dir, task)
        out = Path(args.out) if args.out else default_out_dir(cfg)
        scale = _scale_options(args)
        writer = _start_distributed(cfg, scale)  # torchrun: one unit across the ranks
        if not writer:  # the other ranks train the same units and say nothing
            Experiment(cfg, out, data_dir=args.data_dir, progress=False, log=lambda _: None,
                       task=task, **scale).run()  # fmt: skip
            return 0
        print(f"run directory: {out}")
        Experiment(cfg, out, data_dir=args.data_dir, progress=not args.no_progress,
                   task=task, adopt=args.adopt, **scale).run()  # fmt: skip
    except (ValueError, FileNotFoundError, TypeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a read-only run directory, a full disk: nothing is damaged
        print(f"error: cannot write the run: {exc.strerror or exc} ({exc.filename or ''}); "
              "finished units are kept, rerun the same command once it is fixed",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        again = " ".join(["lottery-ext", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
        if args.out is None:
            again += f" --out {out}"
        print(f"\ninterrupted: finished units are in {out}/results.jsonl and the units in "
              f"progress have checkpoints (state/unit_*.pt); resume with: {again}",
              file=sys.stderr)  # fmt: skip
        return 130
    print(report(out, make_plots=not args.no_plots))
    print(f"\nresults: {out}/results.jsonl, summary: {out}/summary.csv"
          + ("" if args.no_plots else f", plots: {out}/{{accuracy,early_stop,"
                                            "end_of_training,curves}.png"))  # fmt: skip
    return 0


def _start_distributed(cfg, scale: dict) -> bool:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (nccl on CUDA, gloo on
    CPU) so that each unit trains on all ranks with DDP; check what DDP needs first. Returns
    whether this process writes (rank 0, or the only process)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return True
    import atexit

    import torch.distributed as dist

    from . import distributed as D

    if scale["workers"] > 1 or scale["executor"] == "ray":
        raise ValueError("under torchrun each unit trains on all ranks (DDP): --workers and "
                         "--executor ray run whole units in parallel instead; use one or the "
                         "other")  # fmt: skip
    rank = int(os.environ.get("RANK", "0"))
    D.shard_rows(cfg.batch_size, (rank, world))  # a batch size the ranks cannot split
    scale["retries"] = 0  # a retry on one rank alone would hang the others
    if not dist.is_initialized():
        cuda = str(cfg.device).startswith("cuda")
        if cuda:
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return D.is_writer()


def _scale_options(args: argparse.Namespace) -> dict:
    """--workers, --executor and the Ray options, checked."""
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.executor != "ray" and (args.ray_address or args.unit_gpus):
        raise ValueError("--ray-address and --unit-gpus go with --executor ray")
    for name in ("unit_cpus", "unit_gpus"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and value < float("inf")):
            raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
    if args.retries is not None and args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    if args.executor == "ray" and args.workers:
        raise ValueError(
            "--workers is for local worker processes; with --executor ray, "
            "the cluster's CPUs and --unit-cpus decide how many units run at once"
        )
    return dict(workers=args.workers or 1, executor=args.executor,
                ray_address=args.ray_address, unit_cpus=args.unit_cpus or 1.0,
                unit_gpus=args.unit_gpus or 0.0, retries=args.retries)  # fmt: skip


def _checked_options(args: argparse.Namespace) -> dict:
    """The `find` options as RunConfig overrides, each checked with its option's name and
    what is allowed (RunConfig.check then checks the combination)."""
    import math

    out = {k: getattr(args, k) for k in _config_options() if k not in _LISTS}
    for key in ("lr", "momentum", "weight_decay", "rate", "output_rate", "conv_rate", "dropout"):
        value = out.get(key)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    positive = ("lr",)
    for key in positive:
        if out.get(key) is not None and out[key] <= 0:
            raise ValueError(f"--{key} must be > 0, got {out[key]}")
    at_least = {"threads": 1, "trials": 1, "iterations": 1, "eval_every": 1, "batch_size": 1,
                "checkpoint_every": 1, "val_size": 1, "rounds": 0, "warmup": 0, "seed": 0,
                "rewind_iteration": 0}  # fmt: skip
    for key, low in at_least.items():
        if out.get(key) is not None and out[key] < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {out[key]}")
    for key in ("rate", "output_rate", "conv_rate", "dropout"):
        if out.get(key) is not None and not 0 <= out[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be in [0, 1), got {out[key]}")
    for key in ("momentum", "weight_decay"):
        if out.get(key) is not None and out[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {out[key]}")
    if args.milestones is not None:
        try:
            milestones = [int(m) for m in args.milestones.split(",") if m.strip()]
        except ValueError:
            raise ValueError(
                f"--milestones takes comma-separated iterations (e.g. 20000,25000), "
                f"got {args.milestones!r}"
            ) from None
        if any(m < 1 for m in milestones):
            raise ValueError(f"--milestones must be iterations >= 1, got {args.milestones!r}")
        out["milestones"] = milestones
    if args.controls is not None:
        controls = [] if args.controls == "none" else [c.strip() for c in args.controls.split(",")]
        unknown = sorted(set(controls) - {"reinit", "random_prune"})
        if unknown:
            raise ValueError(
                f"--controls: unknown {unknown}; use reinit, random_prune (comma list) or none"
            )
        out["controls"] = controls
    if out.get("device") is not None:
        _check_device(out["device"])
    return out


def _check_device(name: str) -> None:
    """A device torch can use here, or an error that lists the ones it can."""
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    usable = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and torch.cuda.is_available()
            and (device.index is None or device.index < torch.cuda.device_count()))
    )  # fmt: skip
    if not usable:
        raise ValueError(
            f"--device {name}: not a device torch can use here; available: {', '.join(available)}"
        )


def _import(spec: str, option: str):
    """`pkg.module:name` -> the object (the current directory is importable, as with -m)."""
    import importlib

    if ":" not in spec:
        raise ValueError(
            f"{option}: expected module:callable (e.g. mypkg.models:make_net), got {spec!r}"
        )
    module, _, name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{option}: cannot import {module!r} ({exc})") from exc
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{option}: module {module!r} has no {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{option}: {spec} is not callable")
    return obj


def _own_search(args, cfg):
    """`find --model M:f --data M:g`: the user's model factory and data sets with every other
    option of `find`; the preset supplies the defaults (optimizer, lr schedule, budget)."""
    import functools

    from .experiments.training import lr_at, optimizer_for
    from .search import TicketSearch

    if not (args.model and args.data):
        raise ValueError("--model and --data go together (module:callable each)")
    model_fn = _import(args.model, "--model")
    data = _import(args.data, "--data")()
    if isinstance(data, dict):
        data = (data.get("train"), data.get("val"), data.get("test"))
    if not isinstance(data, (tuple, list)) or len(data) != 3:
        raise ValueError("--data: the callable must return (train, val, test) or a dict of them")
    search = TicketSearch(
        model_fn, *data, optimizer=functools.partial(optimizer_for, cfg),
        iterations=cfg.iterations, out=args.out or ".", batch_size=cfg.batch_size,
        eval_every=cfg.eval_every, rounds=cfg.rounds, rate=cfg.rate, trials=cfg.trials,
        controls=cfg.controls, output_rate=cfg.output_rate, scope=cfg.scope,
        rewind_iteration=cfg.rewind_iteration, seed=cfg.seed, device=cfg.device,
        checkpoint_every=cfg.checkpoint_every, threads=cfg.threads,
        progress=not args.no_progress,
    )  # fmt: skip
    # the preset's warmup and milestones (partials, not lambdas: workers unpickle the task)
    search.task.lr_schedule = functools.partial(lr_at, cfg)
    own = search.cfg  # what config.json records (and a resume must match)
    own.model, own.dataset = args.model, args.data
    own.optimizer, own.lr, own.momentum = cfg.optimizer, cfg.lr, cfg.momentum
    own.weight_decay, own.warmup, own.milestones = cfg.weight_decay, cfg.warmup, cfg.milestones
    return own, search.task


def _dry_run(cfg, data_dir, task=None) -> int:
    """What a run would prune, parameter by parameter, and its schedule; writes nothing."""
    from .experiments import runner
    from .experiments.task import PresetTask
    from .pruning.pruner import format_prunable, prunable

    if task is None:
        data = runner.load_dataset(cfg.dataset, data_dir, val_size=cfg.val_size, seed=cfg.seed)
        task = PresetTask(cfg, data)
    model = task.build_model()
    controls = ", ".join(cfg.controls) or "none"
    print(f"preset {cfg.preset}: model {cfg.model}, data {cfg.dataset}, "
          f"{cfg.trials} trial(s) x {cfg.rounds} round(s), controls {controls}, "
          f"{cfg.iterations} iterations per training")  # fmt: skip
    print(format_prunable(prunable(model, **runner.pruner_recipe(cfg))))
    print("dry run: nothing was trained or written")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .experiments.report import report

    try:
        print(report(args.run_dir, make_plots=not args.no_plots))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .ticket import best_level, export_ticket

    try:
        if args.best:
            if args.trial is not None or args.level is not None:
                raise ValueError("--best chooses the trial and level: drop --trial/--level")
            trial, level, why = best_level(args.run_dir, args.tolerance)
            print(f"chose trial {trial}, level {level}: {why}")
        else:
            if args.trial is None or args.level is None:
                raise ValueError("give --trial and --level, or --best")
            trial, level = args.trial, args.level
        ticket = export_ticket(args.run_dir, trial, level)
        out = Path(args.out or f"ticket-trial{trial}-level{level}.pt")
        ticket.save(out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {ticket!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .experiments.presets import DEFAULT_PRESET

    parser = argparse.ArgumentParser(
        prog="lottery-ext", description="Find lottery tickets with iterative magnitude pruning."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    find = sub.add_parser("find", help="run iterative magnitude pruning (resumes if interrupted)")
    find.add_argument("--preset", default=DEFAULT_PRESET, help=f"recipe (default {DEFAULT_PRESET})")
    find.add_argument("--data-dir", help="dataset directory (MNIST IDX files, CIFAR-10 batches)")
    find.add_argument("--out", help="run directory (default runs/<preset>-<config hash>)")
    from .experiments.presets import HELP, PRESETS

    default = PRESETS[DEFAULT_PRESET]
    for name, typ in _config_options().items():
        value = getattr(default, name, None)
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value) or "none"
        shown = f" ({DEFAULT_PRESET}: {value})" if value is not None else ""
        kw = {"choices": _CHOICES[name]} if name in _CHOICES else {}
        find.add_argument("--" + name.replace("_", "-"), dest=name, help=HELP[name] + shown,
                          type=None if name in _LISTS else typ, metavar=None if kw else
                          name.upper(), **kw)  # fmt: skip
    find.add_argument("--no-progress", action="store_true", help="no progress bars")
    find.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    find.add_argument(
        "--model",
        help="your own model: module:callable building the dense "
        "network (with --data; the preset gives the other defaults)",
    )
    find.add_argument(
        "--data",
        help="your own data: module:callable returning (train, val, "
        "test) Datasets, DataLoaders or (x, y) tensor pairs",
    )
    scale = find.add_argument_group("running units in parallel")
    scale.add_argument("--workers", type=int,
                       help="train up to N units at once in N local worker processes, each "
                            "with cores/N threads unless --threads is given (default 1: in "
                            "this process)")  # fmt: skip
    scale.add_argument("--executor", choices=["local", "ray"], default="local",
                       help="local (this process, or --workers processes) or ray (Ray tasks; "
                            "pip install 'lottery_ext[ray]')")  # fmt: skip
    scale.add_argument("--ray-address", help="Ray cluster to join (default: start one here)")
    scale.add_argument("--unit-cpus", type=float, help="CPUs each unit asks Ray for (default 1)")
    scale.add_argument("--unit-gpus", type=float, help="GPUs each unit asks Ray for (default 0)")
    scale.add_argument("--retries", type=int,
                       help="runs of a failing unit before the search stops (default 2 with "
                            "workers or Ray, 0 in this process)")  # fmt: skip
    adopt_help = ("resume a run directory whose config.json was lost: its results are taken "
                  "as this command's (each row's config hash is checked)")  # fmt: skip
    find.add_argument("--adopt", action="store_true", help=adopt_help)
    find.add_argument("--dry-run", action="store_true",
                      help="print what would be pruned (every parameter, its rate and why) and "
                           "exit without training or writing anything")  # fmt: skip
    find.set_defaults(func=_cmd_find)

    rep = sub.add_parser("report", help="tables and plots of a finished or running run")
    rep.add_argument("run_dir")
    rep.add_argument("--no-plots", action="store_true")
    rep.set_defaults(func=_cmd_report)

    exp = sub.add_parser("export", help="save one ticket of a run as a file (lx.load_ticket)")
    exp.add_argument("run_dir", help="a `lottery-ext find` run directory")
    exp.add_argument("--trial", type=int, help="trial number (0-based)")
    exp.add_argument("--level", type=int, help="pruning level (0 = dense)")
    best_help = ("the sparsest level whose ticket's mean test accuracy is within --tolerance "
                 "points of the dense network's, and its best trial")  # fmt: skip
    exp.add_argument("--best", action="store_true", help=best_help)
    exp.add_argument("--tolerance", type=float, default=0.5,
                     help="percentage points below the dense accuracy allowed by --best "
                          "(default 0.5)")  # fmt: skip
    exp.add_argument("--out", help="ticket file (default ticket-trial<T>-level<L>.pt)")
    exp.set_defaults(func=_cmd_export)

    pre = sub.add_parser("presets", help="list the presets: recipe, size, rough time here")
    pre.add_argument("--no-time", action="store_true",
                     help="do not time a training step of each preset")  # fmt: skip
    pre.set_defaults(func=_cmd_presets)
    sub.add_parser("info", help="how this install was built").set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except BrokenPipeError:  # `lottery-ext presets | head`: the reader left, nothing to say
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return 0
