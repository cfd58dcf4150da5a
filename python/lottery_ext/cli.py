"""The `lottery-ext` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import lottery_ext

    print(json.dumps(lottery_ext.build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lottery-ext", description="Find lottery tickets with iterative magnitude pruning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="how this install was built (native core, CUDA, threads)")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
