"""`smoothcert evaluate` (certified accuracy of a bundle on a data split, into a run
directory) and `smoothcert plot` (overlay the curves of several runs).

`evaluate --bundle PATH` runs here. `evaluate --model NAME` evaluates a registered model on a
server: the client commands, which plug into `smoothcert`, give this parser their options and
the `remote` function that runs it (the engine never imports them). `--model PATH` naming a
bundle on disk is the old spelling of `--bundle PATH`: it still runs here, with a note.

The summary printed on stderr rounds the ACR and the (certified) accuracies down, never up;
summary.json keeps the exact floats."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from smoothcert.commands.options import (
    add_certification_options,
    remote_options,
    sampling,
    sigma_search,
    use_memory,
)
from smoothcert.rounding import floor_text

RUN_FILES = ("results.tsv", "summary.json", "curve.png")


def register(commands) -> None:
    e = commands.add_parser(
        "evaluate", help="certified accuracy of a model on a data split (a bundle here, or a registered model)",
        description="Certify every k-th example of a data set in order; write RUN_DIR/results.tsv "
                    "(one row per example, as it is certified), summary.json and curve.png. With --bundle "
                    "PATH it runs in this process; with --model NAME on a server (the data set is uploaded; "
                    "--out then downloads the run).",
    )
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", metavar="PATH", help="evaluate this model bundle (directory or .zip) here")
    which.add_argument("--model", metavar="NAME",
                       help="evaluate this registered model on a server (see `smoothcert models`)")
    e.add_argument("--data", required=True,
                   help="--bundle: sklearn-digits, mnist-5k, an .npz file or an ImageFolder directory; "
                        "--model: an .npz "
                        "(x, y), a zip of class folders, or a directory of class folders (uploaded)")
    e.add_argument("--split", choices=("train", "test"), default="test", help="default: test")
    e.add_argument("--every", type=int, default=1, help="certify examples 0, K, 2K, ... (default 1)")
    e.add_argument("--limit", type=int, help="certify at most N examples")
    e.add_argument("--start", type=int, default=0, help="begin at example K: K, K + every, ... (default 0; "
                   "another start gives disjoint examples, for choosing settings; --bundle only)")
    add_certification_options(e, seed_default=0,
                              seed_help="root seed; example idx uses a seed derived from it and idx (default 0)")
    e.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="radii of summary.json's certified accuracy (default 0, 0.25, ... past the largest)")
    e.add_argument("--out", metavar="RUN_DIR", help="run directory, created (required with --bundle)")
    e.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    e.set_defaults(run=evaluate_command, remote=None, remote_only=())

    p = commands.add_parser(
        "plot", help="certified accuracy against radius for evaluation runs",
        description="Overlay the certified-accuracy curves of one or more run directories in a PNG.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `smoothcert evaluate`")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per run (default: name and method)")
    p.add_argument("--title", help="default: the model and data the runs share")
    p.set_defaults(run=plot_command)


def is_bundle_path(value: str) -> bool:
    """A bundle on disk: a directory or a .zip file (what `--model` named before `--bundle`)."""
    path = Path(value)
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


def evaluate_command(args: argparse.Namespace) -> int:
    # Imported here so `smoothcert --help` stays fast.
    from smoothcert.bounds import InvalidParameters

    if args.model is not None:
        if not is_bundle_path(args.model):
            if args.remote is None:
                raise InvalidParameters("--model NAME evaluates a registered model on a server, which needs the "
                                        "client commands (not installed); evaluate a bundle with --bundle PATH")
            return args.remote(args)
        print(f"smoothcert evaluate: note: --model {args.model} is a bundle on disk: evaluating it here. "
              "Spell that --bundle PATH (--model PATH is deprecated; --model NAME is a registered model)",
              file=sys.stderr)
        args.bundle = args.model
    given = [name for name in args.remote_only if getattr(args, name, None) not in (None, False)]
    if given:
        raise InvalidParameters(f"{', '.join('--' + n for n in given)}: only for an evaluation on a server "
                                "(--model NAME)")
    if args.out is None:
        raise InvalidParameters("--out RUN_DIR is required with --bundle (the run directory to write)")
    from smoothcert.bundle import load_bundle
    from smoothcert.certifier import Certifier, default_device
    from smoothcert.data import load_data
    from smoothcert.evaluation import evaluate, write_run
    from smoothcert.progress import ProgressBar
    from smoothcert.tsv import Writer

    out = Path(args.out)
    # An evaluation can take hours: never overwrite one by accident.
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise InvalidParameters(f"{out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it")
    try:
        dataset = load_data(args.data, args.split)
    except ValueError as exc:
        raise InvalidParameters(str(exc)) from exc
    device = args.device or default_device()
    certifier = Certifier(load_bundle(args.bundle, device=device, remote=remote_options(args)), device=device,
                          numeric_mode=args.numeric_mode)
    search = sigma_search(args)
    how = sampling(args)
    memory = use_memory(args, search)
    bound = args.bound or ("drs" if certifier.spec.kind == "drs" else "cohen")
    count = len(range(max(args.start, 0), len(dataset), max(args.every, 1))[: args.limit])

    out.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar(count, "evaluate")
    written = 0

    def stream(row) -> None:
        nonlocal written
        writer.write(row.idx, row.label, row.certificate)
        written += 1

    # Rows are streamed to results.tsv as they come, so a long run can be followed and a
    # killed one keeps its rows; write_run rewrites the same file with the summary at the end.
    with open(out / "results.tsv", "w", newline="") as f:
        writer = Writer(f, bound, memory, how["sampling"])
        try:
            run = evaluate(
                certifier, dataset, every=args.every, limit=args.limit, start=args.start, sigma=args.sigma,
                sigma_search=search, bound=bound, n0=args.n0, n=args.n, alpha=args.alpha,
                **how, batch_size=args.batch, seed=args.seed, memory=memory,
                progress=bar, on_row=stream,
            )
        except InvalidParameters:
            if not written:  # refused before any work: leave no half-made run behind
                (out / "results.tsv").unlink()
            raise
        finally:
            bar.close()
    summary = write_run(out, run, args.radii)
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    print(f"wrote {out}/{{{','.join(RUN_FILES)}}}", file=sys.stderr)
    return 0


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A run's summary (summary.json, or an evaluation job's result) for people: the ACR and
    the (certified) accuracies rounded down, never up. Torch-free (the client prints it too)."""
    grid = ", ".join(f"{g['radius']:g}: {floor_text(g['accuracy'], 3)}" for g in summary["certified_accuracy"])
    spent = summary["samples"]
    search_note = "" if spent.get("search_mean") is None else f", σ search {spent['search_mean']:.0f}"
    lines = [f"{summary['count']} examples: clean accuracy {floor_text(summary['clean_accuracy'], 3)}, "
             f"ACR {floor_text(summary['acr'], 3)}, abstained {summary['abstention_rate']:.3f}",
             f"certified accuracy at r = {grid}",
             f"samples per example: {spent['mean']:.0f} (estimation n {spent['estimation_mean']:.0f}{search_note})"]
    if summary.get("memory") is not None:
        m = summary["memory"]
        lines.append(f"memory: {m['entries']} entries, {m['changed']} certificates changed by the rule")
    return lines


def plot_command(args: argparse.Namespace) -> int:
    from smoothcert.bounds import InvalidParameters
    from smoothcert.plotting import plot_runs

    try:
        path = plot_runs(args.runs, args.out, labels=args.labels, title=args.title)
    except ValueError as exc:  # a label count that does not match, an unreadable summary
        raise InvalidParameters(str(exc)) from exc
    print(f"wrote {path}", file=sys.stderr)
    return 0
