"""The `smoothcert` command line.

Engine commands run the library directly and write Cohen-style TSV
(`idx label predict radius correct time sigma`, then the bound's columns, the seed, and the
memory's columns when it is used). Exit status: 0 done, 2 refused input (the message says why).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

COMMANDS = ("certify_local", "train", "evaluate")  # engine commands, each a module of smoothcert.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smoothcert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"smoothcert.commands.{name}").register(commands)
    # Client commands (certify, models, status) and `up` live in the layers above the engine
    # and register themselves through this entry-point group.
    for plugin in entry_points(group="smoothcert.commands"):
        plugin.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from smoothcert.bounds import InvalidParameters
    from smoothcert.imageio import ImageError
    from smoothcert.manifest import BundleError

    try:
        return args.run(args)
    except (InvalidParameters, BundleError, ImageError, FileNotFoundError) as exc:
        print(f"smoothcert: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
