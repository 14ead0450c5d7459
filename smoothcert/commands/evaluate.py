"""`smoothcert evaluate` (certified accuracy of a bundle on a data split, into a run
directory) and `smoothcert plot` (overlay the curves of several runs).

The summary printed on stderr rounds the ACR and the (certified) accuracies down, never up;
summary.json keeps the exact floats."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        "evaluate", help="certified accuracy of a bundle on a data split",
        description="Certify every k-th example of a split in order; write RUN_DIR/results.tsv "
                    "(one row per example, as it is certified), summary.json and curve.png.",
    )
    e.add_argument("--model", required=True, help="bundle directory or .zip")
    e.add_argument("--data", required=True, help="sklearn-digits, an .npz file or an ImageFolder directory")
    e.add_argument("--split", choices=("train", "test"), default="test", help="default: test")
    e.add_argument("--every", type=int, default=1, help="certify examples 0, K, 2K, ... (default 1)")
    e.add_argument("--limit", type=int, help="certify at most N examples")
    add_certification_options(e, seed_default=0,
                              seed_help="root seed; example idx uses a seed derived from it and idx (default 0)")
    e.add_argument("--radii", type=float, nargs="+", metavar="R",
                   help="radii of summary.json's certified accuracy (default 0, 0.25, ... past the largest)")
    e.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created)")
    e.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    e.set_defaults(run=evaluate_command)

    p = commands.add_parser(
        "plot", help="certified accuracy against radius for evaluation runs",
        description="Overlay the certified-accuracy curves of one or more run directories in a PNG.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories written by `smoothcert evaluate`")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="one legend label per run (default: name and method)")
    p.add_argument("--title", help="default: the model and data the runs share")
    p.set_defaults(run=plot_command)


def evaluate_command(args: argparse.Namespace) -> int:
    # Imported here so `smoothcert --help` stays fast.
    from smoothcert.bounds import InvalidParameters
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
    certifier = Certifier(load_bundle(args.model, device=device, remote=remote_options(args)), device=device,
                          numeric_mode=args.numeric_mode)
    search = sigma_search(args)
    how = sampling(args)
    memory = use_memory(args, search)
    bound = args.bound or ("drs" if certifier.spec.kind == "drs" else "cohen")
    count = len(range(0, len(dataset), max(args.every, 1))[: args.limit])

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
                certifier, dataset, every=args.every, limit=args.limit, sigma=args.sigma,
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
    grid = ", ".join(f"{g['radius']:g}: {floor_text(g['accuracy'], 3)}" for g in summary["certified_accuracy"])
    print(f"{summary['count']} examples: clean accuracy {floor_text(summary['clean_accuracy'], 3)}, "
          f"ACR {floor_text(summary['acr'], 3)}, abstained {summary['abstention_rate']:.3f}", file=sys.stderr)
    print(f"certified accuracy at r = {grid}", file=sys.stderr)
    spent = summary["samples"]
    search_note = "" if spent["search_mean"] is None else f", σ search {spent['search_mean']:.0f}"
    print(f"samples per example: {spent['mean']:.0f} (estimation n {spent['estimation_mean']:.0f}{search_note})",
          file=sys.stderr)
    if summary["memory"] is not None:
        m = summary["memory"]
        print(f"memory: {m['entries']} entries, {m['changed']} certificates changed by the rule", file=sys.stderr)
    print(f"wrote {out}/{{{','.join(RUN_FILES)}}}", file=sys.stderr)
    return 0


def plot_command(args: argparse.Namespace) -> int:
    from smoothcert.bounds import InvalidParameters
    from smoothcert.plotting import plot_runs

    try:
        path = plot_runs(args.runs, args.out, labels=args.labels, title=args.title)
    except ValueError as exc:  # a label count that does not match, an unreadable summary
        raise InvalidParameters(str(exc)) from exc
    print(f"wrote {path}", file=sys.stderr)
    return 0
