"""`smoothcert certify-local`: certify images with a bundle in this process, as TSV.

Columns: `idx label predict radius correct time sigma`, then the bound's columns, the seed,
and with the memory its outcome and the radius before the rule. `predict` is -1 for an
abstention; label and correct are NA when the input has no label.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

BOUND_COLUMNS = {
    "cohen": ("pA_lower",),
    "two_sided": ("pA_lower", "pB_upper"),
    "drs": ("pA_lower_left", "pA_lower_right"),
}


def register(commands) -> None:
    c = commands.add_parser(
        "certify-local", help="certify images with a model bundle, in this process",
        description="Certify each input with the bundle and write one TSV row per input.",
    )
    c.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG/NPY files, or .npz with x (and y)")
    c.add_argument("--model", required=True, help="bundle directory or .zip")
    sigma = c.add_mutually_exclusive_group()
    sigma.add_argument("--sigma", type=float, help="fixed noise level (default: the model's)")
    sigma.add_argument("--sigma-search", choices=("ddrs", "insta"), help="per-input σ search")
    c.add_argument("--search-steps", type=int, help="σ search steps (ddrs ascent steps, insta rounds)")
    c.add_argument("--search-lr", type=float, help="ddrs step size")
    c.add_argument("--search-samples", type=int, help="noisy samples per search step")
    c.add_argument("--bound", choices=("cohen", "two_sided"), help="default: cohen (DRS bundles: drs)")
    c.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    c.add_argument("--n", type=int, default=100_000, help="estimation samples (default 100000)")
    c.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    c.add_argument("--batch", type=int, default=1000, help="noisy samples per forward pass")
    c.add_argument("--seed", type=int, help="root seed; input i uses a seed derived from it")
    c.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the memory rule across the inputs in order "
                        "(default: on with --sigma-search, off with a fixed σ)")
    c.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    c.add_argument("--out", help="TSV file (default: standard output)")
    c.set_defaults(run=certify_local)


def certify_local(args: argparse.Namespace) -> int:
    # Imported here so `smoothcert --help` stays fast.
    from smoothcert.bundle import load_bundle
    from smoothcert.certifier import Certifier, default_device
    from smoothcert.imageio import load_inputs
    from smoothcert.progress import ProgressBar
    from smoothcert.sampling import derive_seed
    from smoothcert.sigma import SigmaSearch

    # Load straight onto the device: a .pt2 graph may name devices that only load_bundle rewrites.
    device = args.device or default_device()
    certifier = Certifier(load_bundle(args.model, device=device), device=device)
    items = load_inputs(args.inputs, certifier.spec.input_shape)
    search = None
    if args.sigma_search:
        search = SigmaSearch(args.sigma_search, args.search_steps, args.search_lr, args.search_samples).resolved()
    use_memory = args.memory if args.memory is not None else search is not None
    memory = certifier.new_memory() if use_memory else None
    bound = args.bound or ("drs" if certifier.spec.kind == "drs" else "cohen")

    out: TextIO = open(args.out, "w", newline="") if args.out else sys.stdout
    columns = ["idx", "label", "predict", "radius", "correct", "time", "sigma",
               *BOUND_COLUMNS[bound], "seed"]
    if memory is not None:
        columns += ["memory", "radius_before"]
    bar = ProgressBar(len(items), "certify")
    changed = 0
    try:
        print("\t".join(columns), file=out, flush=True)
        for idx, item in enumerate(items):
            cert = certifier.certify(
                item.array, sigma=args.sigma, sigma_search=search, bound=bound, n0=args.n0,
                n=args.n, alpha=args.alpha, batch_size=args.batch,
                seed=None if args.seed is None else derive_seed(args.seed, idx),
                memory=memory, progress=bar.stage,
            )
            predict = -1 if cert.abstained else cert.prediction
            row = [idx, _na(item.label), predict, f"{cert.radius:.4f}",
                   _na(None if item.label is None else int(predict == item.label)),
                   f"{cert.seconds:.3f}", f"{cert.sigma:.4f}", *_bound_values(cert), cert.seed]
            if memory is not None:
                row += [cert.memory.outcome, _na(cert.memory.radius_before, "{:.4f}")]
                changed += cert.memory.outcome != "new"
            print("\t".join(map(str, row)), file=out, flush=True)
            bar.advance(f"{item.name}: predict {predict} radius {cert.radius:.3f}")
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    if memory is not None:
        print(f"memory: {len(memory)} entries, {changed} certificates changed by the rule", file=sys.stderr)
    return 0


def _bound_values(cert) -> list[str]:
    if cert.bound == "drs":
        values = cert.p_a_lower_halves or (None, None)
    elif cert.bound == "two_sided":
        values = (cert.p_a_lower, cert.p_b_upper)
    else:
        values = (cert.p_a_lower,)
    return [_na(v, "{:.6f}") for v in values]


def _na(value, fmt: str = "{}") -> str:
    return "NA" if value is None else fmt.format(value)
