"""Client commands of the `smoothcert` CLI: `certify`, `models`, `status` (they talk to a server).

`register(subparsers)` adds them to the main `smoothcert` parser; `main(argv)` runs them on
their own. Each command sets `run` (args → exit status) and reports its own errors as
`smoothcert: <message>` on stderr. Exit status: 0 done; 1 the server refused, could not be
reached, or the waited-for job failed, was cancelled or timed out; 2 usage errors and local
inputs the client cannot send. The server URL comes from --server, $SMOOTHCERT_URL, or
http://127.0.0.1:8000; the API key from --api-key or $SMOOTHCERT_API_KEY. Certificates and
job statuses are printed as JSON, each float exactly as the server sent it (never rounded).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, TextIO

import httpx

from clients._client import Client
from clients._exceptions import InputError, SmoothcertError
from clients._jobs import Job
from clients._types import JobStatus

__all__ = ["main", "register"]

Command = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> None:
    """Add `certify`, `models` and `status` to an `add_subparsers()` object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL",
                        help="API base URL (default: $SMOOTHCERT_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", metavar="KEY", help="API key (default: $SMOOTHCERT_API_KEY)")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="wait for the job to end, showing progress")
    waiting.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up after S seconds")

    c = subparsers.add_parser("certify", parents=[common, waiting], help="certify an image on a server",
                              description="Submit a certification job; with --wait, print the certificate as JSON.")
    c.add_argument("image", metavar="IMAGE", help="PNG, JPEG or .npy file")
    c.add_argument("--model", required=True, metavar="NAME", help="registered model name")
    sigma = c.add_mutually_exclusive_group()
    sigma.add_argument("--sigma", type=float, help="fixed noise level (default: the model's)")
    sigma.add_argument("--sigma-search", choices=("ddrs", "insta"), help="per-input σ search")
    c.add_argument("--search-steps", type=int, help="σ search steps")
    c.add_argument("--bound", choices=("cohen", "two_sided"), help="default: the server's (cohen)")
    c.add_argument("--n0", type=int, help="selection samples")
    c.add_argument("--n", type=int, help="estimation samples")
    c.add_argument("--alpha", type=float, help="failure probability")
    c.add_argument("--sampling", choices=("fixed", "adaptive", "sequential"),
                   help="adaptive: --n is the maximum, each input's n is chosen from its selection sample; "
                        "sequential: --n is the maximum and sampling stops once the radius reaches "
                        "--target-radius or cannot (default: the server's, fixed)")
    c.add_argument("--tolerance", type=float,
                   help="with --sampling adaptive: expected radius loss allowed against --n, in units of σ")
    c.add_argument("--target-radius", type=float,
                   help="with --sampling sequential (required there): the l2 radius at which sampling stops")
    c.add_argument("--batch", type=int, help="noisy samples per forward pass (default: the worker's automatic size)")
    c.add_argument("--numeric-mode", metavar="MODE",
                   help="fp32 (default), bf16 or fp16 (CUDA), with +channels_last, +compile or +cuda_graphs")
    c.add_argument("--seed", type=int, help="same seed + same request = same result")
    c.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="use the certificate memory (default: on with --sigma-search)")
    c.add_argument("--idempotency-key", metavar="KEY", help="a retry with the same key returns the same job")
    c.set_defaults(run=_guarded(_certify))

    m = subparsers.add_parser("models", parents=[common], help="list the server's models",
                              description="List the registered models.")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(run=_guarded(_models))

    s = subparsers.add_parser("status", parents=[common, waiting], help="show a job's status",
                              description="Print a job's status as JSON.")
    s.add_argument("id", metavar="ID", help="job id")
    s.add_argument("--kind", choices=("certification", "prediction"), default="certification")
    s.set_defaults(run=_guarded(_status))


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run one client command; returns the exit status. `transport` is for tests."""
    parser = argparse.ArgumentParser(prog="smoothcert", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    parser.set_defaults(transport=transport)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage; return rather than exit, for tests
        return e.code if isinstance(e.code, int) else 2
    return args.run(args)


def _guarded(command: Command) -> Command:
    """Turn the SDK's errors into a message and an exit status."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except InputError as e:
            return _fail(str(e), 2)
        except SmoothcertError as e:
            return _fail(str(e), 1)
        except KeyboardInterrupt:
            return 130
    return run


def _fail(message: str, code: int) -> int:
    print(f"smoothcert: {message}", file=sys.stderr)
    return code


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, api_key=args.api_key, transport=getattr(args, "transport", None))


def _certify(args: argparse.Namespace) -> int:
    search: dict[str, Any] | None = None
    if args.sigma_search:
        search = {"method": args.sigma_search, "steps": args.search_steps}
        search = {k: v for k, v in search.items() if v is not None}
    elif args.search_steps is not None:
        return _fail("--search-steps needs --sigma-search", 2)
    with _client(args) as client:
        job = client.certify(
            args.image, model=args.model, sigma=args.sigma, sigma_search=search, bound=args.bound,
            n0=args.n0, n=args.n, alpha=args.alpha, sampling=args.sampling, tolerance=args.tolerance,
            target_radius=args.target_radius, batch_size=args.batch, memory=args.memory,
            numeric_mode=args.numeric_mode, seed=args.seed, idempotency_key=args.idempotency_key,
        )
        if not args.wait:
            print(f"{job.id}\t{job.submitted.status if job.submitted else 'queued'}")
            return 0
        status = _wait(job, args.timeout)
    _print_json(status.raw.get("result"))
    return 0


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.id, args.kind)
        status = _wait(job, args.timeout, check=False) if args.wait else job.status()
    _print_json(status.raw)
    if args.wait:
        _check_ended(status)
    return 0


def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        _print_json([{k: v for k, v in asdict(m).items() if k != "extra"} | m.extra for m in models])
        return 0
    rows = [("NAME", "KIND", "INPUT", "CLASSES", "DIGEST")]
    rows += [(m.name, m.kind or "-", "x".join(map(str, m.input_shape or ())) or "-",
              str(m.num_classes or "-"), (m.digest or "-")[:19]) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _wait(job: Job, timeout: float | None, *, check: bool = True) -> JobStatus:
    """Wait with a progress line on stderr; with `check`, raise unless the job succeeded."""
    line = _ProgressLine(sys.stderr, job.id)
    try:
        status = job.wait(timeout, on_progress=line)
    except KeyboardInterrupt:
        line.close()
        print(f"smoothcert: interrupted; job {job.id} goes on (smoothcert status {job.id} --wait)",
              file=sys.stderr)
        raise
    line.close()
    if check:
        _check_ended(status)
    return status


def _check_ended(status: JobStatus) -> None:
    status.raise_for_status()
    if status.status != "succeeded":
        raise SmoothcertError(f"job {status.id} ended {status.status}")


def _print_json(value: Any) -> None:
    # json.dumps writes each float as its shortest round-trip text: a radius or bound is printed
    # exactly as the server certified it, never rounded (up) to fewer digits.
    print(json.dumps(value, indent=2, ensure_ascii=False))


class _ProgressLine:
    """A job's progress on one stderr line: redrawn in place on a terminal; elsewhere (CI,
    a pipe) one line per stage, so logs stay short."""

    def __init__(self, stream: TextIO, job_id: str, width: int = 24):
        self.stream, self.job_id, self.width = stream, job_id, width
        self.tty = stream.isatty()
        self._last_stage: object = None
        self._drawn = False

    def __call__(self, status: JobStatus) -> None:
        p = status.progress
        stage = p.stage if p is not None and p.stage and not status.done else status.status
        if self.tty:
            fraction = (p.fraction if p is not None else None) or 0.0
            bar = "#" * int(self.width * fraction) + "." * (self.width - int(self.width * fraction))
            counts = f" {p.samples_done:,}/{p.samples_total:,}" if p is not None and p.samples_total else ""
            self.stream.write(f"\r{stage:<12} [{bar}]{counts}".ljust(72))
            self.stream.flush()
            self._drawn = True
        elif stage != self._last_stage:
            print(f"job {self.job_id}: {stage}", file=self.stream, flush=True)
        self._last_stage = stage

    def close(self) -> None:
        if self._drawn:
            print(file=self.stream, flush=True)
            self._drawn = False


if __name__ == "__main__":
    sys.exit(main())
