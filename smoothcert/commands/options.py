"""The certification options that `certify-local` and `evaluate` share, so they read alike.

Nothing heavy is imported here (no SciPy, NumPy or torch): `smoothcert --help` builds every
parser, so the checks are imported where the options are used.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smoothcert.search import SigmaSearch

# smoothcert.adaptive's SAMPLINGS and DEFAULT_TOLERANCE, copied so that building the parser
# loads no SciPy; tests/smoothcert/test_cli.py holds them equal.
SAMPLINGS = ("fixed", "adaptive", "sequential")
DEFAULT_TOLERANCE = 0.05


class _DeprecatedModelOption(argparse.Action):
    """`--model PATH` on an engine command: the old spelling of `--bundle PATH`, kept so that
    old command lines still run; says so once on stderr."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: note: --model is deprecated here, use --bundle PATH "
              "(--model names a registered model in the client commands)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_bundle_option(c: argparse.ArgumentParser) -> None:
    """`--bundle PATH` (required), with `--model PATH` as its deprecated alias."""
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", metavar="PATH", help="model bundle: a directory or .zip (not a registered name)")
    which.add_argument("--model", dest="bundle", action=_DeprecatedModelOption, help=argparse.SUPPRESS)


def add_certification_options(c: argparse.ArgumentParser, *, seed_default: int | None = None,
                              seed_help: str = "root seed; input i uses a seed derived from it",
                              server: bool = False) -> None:
    """σ or σ search, bound, n0, n, α, sampling, batch, numeric mode, seed, memory and device.
    `server=True`: the same options as the client commands send them to a server (no value
    is filled in: the server's defaults apply), without the engine's device and remote flags."""
    def default(value):  # the engine's default; a client leaves it to the server
        return None if server else value

    where = "the worker's measured size" if server else "measured for the model and device"
    sigma = c.add_mutually_exclusive_group()
    sigma.add_argument("--sigma", type=float, help="fixed noise level (default: the model's)")
    sigma.add_argument("--sigma-search", choices=("ddrs", "insta"), help="per-input σ search (memory on by default)")
    c.add_argument("--search-steps", type=int, help="σ search steps (ddrs ascent steps, insta rounds)")
    c.add_argument("--search-lr", type=float, help="ddrs step size")
    c.add_argument("--search-samples", type=int, help="noisy samples per search step")
    c.add_argument("--bound", choices=("cohen", "two_sided"), help="default: cohen (DRS bundles: drs)")
    c.add_argument("--n0", type=int, default=default(100), help="selection samples (default 100)")
    c.add_argument("--n", type=int, default=default(100_000), help="estimation samples (default 100000)")
    c.add_argument("--alpha", type=float, default=default(0.001), help="failure probability (default 0.001)")
    c.add_argument("--sampling", choices=SAMPLINGS, default=default("fixed"),
                   help="adaptive: --n is the maximum and each input's estimation size is chosen "
                        "from its selection sample; sequential: --n is the maximum and sampling "
                        "stops once the radius reaches --target-radius or cannot (default: fixed)")
    c.add_argument("--tolerance", type=float,
                   help="with --sampling adaptive: the expected radius loss allowed against --n, "
                        f"in units of σ (default {DEFAULT_TOLERANCE})")
    c.add_argument("--target-radius", type=float,
                   help="with --sampling sequential (required there): the l2 radius at which the "
                        "outcome is decided")
    c.add_argument("--batch", type=int, default=None, help=f"noisy samples per forward pass (default: {where})")
    c.add_argument("--numeric-mode", default=None, metavar="MODE",
                   help="fp32 (default), bf16 or fp16 (CUDA), with +fuse (BatchNorm folded into the "
                        "convolutions), +channels_last, +compile or +cuda_graphs; recorded in every certificate")
    c.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    c.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="use the certificate memory (default: on with --sigma-search, off with a fixed σ)"
                        + ("" if server else "; applied across the inputs in order"))
    if server:
        return
    c.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    c.add_argument("--remote-allow", action="append", default=[], metavar="URL",
                   help="a remote bundle (kind remote) may call an endpoint under URL (repeat for more; "
                        "'*' allows any); none by default")
    c.add_argument("--remote-token", action="append", default=[], metavar="ORIGIN=TOKEN",
                   help="the bearer token sent to a remote endpoint's origin (https://host:port)")


def remote_options(args: argparse.Namespace):
    """What a remote bundle may call (smoothcert.endpoints.RemoteOptions) from the flags."""
    from smoothcert.endpoints import RemoteOptions

    tokens = {}
    for item in args.remote_token:
        origin, sep, token = item.partition("=")
        if not sep:
            raise SystemExit(f"--remote-token {item!r}: expected ORIGIN=TOKEN")
        tokens[origin] = token
    return RemoteOptions(allow=tuple(args.remote_allow), tokens=tokens)


def sigma_search(args: argparse.Namespace) -> SigmaSearch | None:
    """The resolved σ search the options ask for, or None for a fixed σ."""
    from smoothcert.search import SigmaSearch

    if not args.sigma_search:
        return None
    return SigmaSearch(args.sigma_search, args.search_steps, args.search_lr, args.search_samples).resolved()


def sampling(args: argparse.Namespace) -> dict:
    """sampling, tolerance and target_radius as the options ask, checked (the default
    tolerance filled in), as keywords of Certifier.certify and evaluate."""
    from smoothcert.adaptive import check_sampling
    from smoothcert.sequential import check_target

    return dict(sampling=args.sampling, tolerance=check_sampling(args.sampling, args.tolerance),
                target_radius=check_target(args.sampling, args.target_radius))


def use_memory(args: argparse.Namespace, search: SigmaSearch | None) -> bool:
    """--memory/--no-memory, by default on exactly when σ is searched per input (ALGORITHMS §3.1)."""
    return args.memory if args.memory is not None else search is not None
