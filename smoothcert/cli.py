"""The `smoothcert` command line.

Engine commands (`certify-local`, `evaluate --bundle`, `train`, `plot`) run the library in
this process on a model bundle (`--bundle PATH`) and write Cohen-style TSV (`idx label
predict radius correct time sigma`, then the bound's columns, the seed, and the memory's
columns when it is used). The client commands (`certify`, `predict`, `evaluate --model`,
`status`, `cancel`, `models`) and `up` plug in through the `smoothcert.commands` entry
points (docs/cli.md). Exit status: 0 done, 2 refused input (the message says why), 130
interrupted.

Building the parser imports nothing heavy (no torch, NumPy, SciPy, httpx, FastAPI, Redis or
Celery): each command imports what it needs when it runs, so `smoothcert --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from smoothcert import __version__

COMMANDS = ("certify_local", "train", "evaluate")  # engine commands, each a module of smoothcert.commands
# The engine's refusals (module, class): exit status 2 with the message.
REFUSALS = (("smoothcert.bounds", "InvalidParameters"), ("smoothcert.manifest", "BundleError"),
            ("smoothcert.imageio", "ImageError"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothcert",
        description="Certified predictions for image classifiers (randomized smoothing). Engine commands "
                    "run here on a model bundle (--bundle PATH); client commands talk to a server about a "
                    "registered model (--model NAME); `smoothcert up` runs a server on this machine.",
        epilog="`smoothcert COMMAND --help` describes a command; docs/cli.md has them all, with examples.")
    parser.add_argument("--version", action="version", version=f"smoothcert {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"smoothcert.commands.{name}").register(commands)
    # Client commands (certify, predict, models, ...) and `up` live in the layers above the
    # engine and register themselves through this entry-point group.
    for plugin in entry_points(group="smoothcert.commands"):
        plugin.load()(commands)
    return parser


def refused(exc: BaseException) -> bool:
    """Whether `exc` is one of the engine's refusals (or a missing file). Only a module
    already imported can have raised its class, so none is imported here (they load SciPy)."""
    if isinstance(exc, FileNotFoundError):
        return True
    return any(module in sys.modules and isinstance(exc, getattr(sys.modules[module], name))
               for module, name in REFUSALS)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("smoothcert: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not refused(exc):
            raise
        print(f"smoothcert: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
