"""`smoothcert certify-local`: certify images with a bundle in this process, as TSV.

Columns (`smoothcert.tsv`, shared with `evaluate`): `idx label predict radius correct time
sigma`, then the bound's columns, the seed, and with the memory its outcome and the radius
before the rule. `predict` is -1 for an abstention; label and correct are NA when the input
has no label. The progress line's radius is rounded down, like the TSV's (`smoothcert.tsv`).
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from smoothcert.commands.options import (
    add_bundle_option,
    add_certification_options,
    remote_options,
    sampling,
    sigma_search,
    use_memory,
)
from smoothcert.rounding import floor_text


def register(commands) -> None:
    c = commands.add_parser(
        "certify-local", help="certify images with a model bundle, in this process",
        description="Certify each input with a model bundle (a directory or .zip, given by --bundle) in "
                    "this process, and write one TSV row per input. To certify on a server with a "
                    "registered model, use `smoothcert certify --model NAME`.",
    )
    c.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG/NPY files, or .npz with x (and y)")
    add_bundle_option(c)
    add_certification_options(c)
    c.add_argument("--out", help="TSV file (default: standard output)")
    c.set_defaults(run=certify_local)


def certify_local(args: argparse.Namespace) -> int:
    # Imported here so `smoothcert --help` stays fast.
    from smoothcert.bundle import load_bundle
    from smoothcert.certifier import Certifier, default_device
    from smoothcert.imageio import load_inputs
    from smoothcert.progress import ProgressBar
    from smoothcert.sampling import derive_seed
    from smoothcert.tsv import Writer

    # Load straight onto the device: a .pt2 graph may name devices that only load_bundle rewrites.
    device = args.device or default_device()
    certifier = Certifier(load_bundle(args.bundle, device=device, remote=remote_options(args)), device=device,
                          numeric_mode=args.numeric_mode)
    items = load_inputs(args.inputs, certifier.spec.input_shape)
    search = sigma_search(args)
    how = sampling(args)
    memory = certifier.new_memory(args.alpha) if use_memory(args, search) else None
    bound = args.bound or ("drs" if certifier.spec.kind == "drs" else "cohen")

    out: TextIO = open(args.out, "w", newline="") if args.out else sys.stdout
    bar = ProgressBar(len(items), "certify")
    changed = 0
    try:
        writer = Writer(out, bound, memory is not None, how["sampling"])
        for idx, item in enumerate(items):
            cert = certifier.certify(
                item.array, sigma=args.sigma, sigma_search=search, bound=bound, n0=args.n0,
                n=args.n, alpha=args.alpha, **how, batch_size=args.batch,
                seed=None if args.seed is None else derive_seed(args.seed, idx),
                memory=memory, progress=bar.stage,
            )
            writer.write(idx, item.label, cert)
            predict = -1 if cert.abstained else cert.prediction
            changed += memory is not None and cert.memory.outcome != "new"
            bar.advance(f"{item.name}: predict {predict} radius {floor_text(cert.radius, 3)}")
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    if memory is not None:
        print(f"memory: {len(memory)} entries, {changed} certificates changed by the rule", file=sys.stderr)
    return 0

