"""Client commands of the `smoothcert` CLI: they talk to a server (docs/cli.md).

`certify` and `predict` (one job per input, submitted together, then waited with `--wait`),
`evaluate --model NAME` (a data set on the server; `smoothcert evaluate --bundle PATH` is the
engine's, in this process), `status`, `cancel`, and `models [list|upload|delete]`.
`register(subparsers)` adds them to the main `smoothcert` parser; `main(argv)` runs them on
their own.

- Models: `--model NAME` is always a registered model's name (`smoothcert models`); a bundle
  on disk is `--bundle PATH`, for the engine's commands, or `models upload PATH`.
- Server: `--server`, $SMOOTHCERT_URL, the URL `smoothcert up` saved, http://127.0.0.1:8000.
- Key: `--key KEY`; `--admin`: the admin key `up` saved (model uploads and deletions use it
  unless a key is given); $SMOOTHCERT_API_KEY; the user key `up` saved. A saved key is only
  ever sent to the server it was saved for.
- Output: one readable line per result on stdout, radii rounded down (never to nearest);
  `--json` prints the server's JSON instead, every float exactly as sent. Progress, notes
  and errors go to stderr.
- Exit status: 0 done; 1 the server refused, could not be reached, or a waited-for job
  failed, was cancelled or timed out; 2 usage errors and local inputs the client cannot
  send; 130 interrupted (jobs already submitted go on).

Nothing heavy (httpx, numpy) is imported until a command runs: `smoothcert --help` builds
this parser.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    import httpx

    from clients._client import Client
    from clients._jobs import Job
    from clients._types import JobStatus

__all__ = ["main", "register"]

Command = Callable[[argparse.Namespace], int]
KINDS = ("certification", "prediction", "evaluation")
LOADING_NOTE = "the worker is loading the model (first use: loading and measuring its batch size)"
RUN_FILES = ("results.tsv", "summary.json", "curve.png")  # the run directory of `smoothcert evaluate`
# Options of the engine's `evaluate` that only a run in this process uses.
LOCAL_EVALUATE_ONLY = {"split": "test", "start": 0, "radii": None, "device": None, "remote_allow": [],
                       "remote_token": []}


class UsageError(Exception):
    """A command line the client will not send (exit status 2)."""


class _Interrupted(KeyboardInterrupt):
    """An interrupt already reported (which jobs go on)."""


def register(subparsers: Any) -> None:
    """Add the client commands to an `add_subparsers()` object. An `evaluate` already there
    (the engine's) gets the server options, and runs here when given `--model NAME`."""
    c = subparsers.add_parser(
        "certify", help="certify images with a registered model, on a server",
        description="Submit one certification job per input, all at once; with --wait, wait for them "
                    "and print one line per certificate (--json: the results as the server sent them).")
    c.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG, JPEG or .npy files")
    c.add_argument("--model", required=True, metavar="NAME",
                   help="a registered model's name (see `smoothcert models`); a bundle on disk is "
                        "`smoothcert certify-local --bundle PATH`")
    _certification_options(c)
    _job_options(c)
    c.set_defaults(run=_guarded(_certify))

    p = subparsers.add_parser(
        "predict", help="smoothed prediction of images (no radius), on a server",
        description="Submit one PREDICT job per input (the smoothed classifier's class, or an "
                    "abstention; no radius); with --wait, wait and print one line per input.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG, JPEG or .npy files")
    p.add_argument("--model", required=True, metavar="NAME", help="a registered model's name")
    p.add_argument("--sigma", type=float, help="noise level (default: the model's)")
    p.add_argument("--n", type=int, help="noisy samples (default: the server's, 10000)")
    p.add_argument("--alpha", type=float, help="test level (default 0.001)")
    _engine_options(p)
    _job_options(p)
    p.set_defaults(run=_guarded(_predict))

    if "evaluate" in subparsers.choices:
        _extend_engine_evaluate(subparsers.choices["evaluate"])
    else:
        _add_evaluate(subparsers)

    s = subparsers.add_parser("status", help="show a job's status",
                              description="Print a job's status (--json: as the server sent it).")
    s.add_argument("id", metavar="ID", help="job id")
    s.add_argument("--kind", choices=KINDS, help="the job's kind (default: whichever knows the id)")
    _add_common(s)
    _add_json(s)
    _add_wait(s)
    s.set_defaults(run=_guarded(_status))

    k = subparsers.add_parser("cancel", help="cancel jobs",
                              description="Ask the server to cancel jobs: a queued job stops at once, "
                                          "a running one at its next batch of samples.")
    k.add_argument("ids", nargs="+", metavar="ID", help="job ids")
    k.add_argument("--kind", choices=KINDS, help="the jobs' kind (default: whichever knows each id)")
    _add_common(k)
    _add_json(k)
    k.set_defaults(run=_guarded(_cancel))

    m = subparsers.add_parser(
        "models", help="list, upload or delete the server's models",
        description="`models` (or `models list`) lists the registered models; `models upload BUNDLE` "
                    "and `models delete NAME` change the registry (an admin key: --admin by default).")
    _add_common(m)
    _add_json(m)
    m.set_defaults(run=_guarded(_models_list))
    sub = m.add_subparsers(dest="models_command", metavar="{list,upload,delete}")
    ml = sub.add_parser("list", help="list the registered models (the default)")
    mu = sub.add_parser("upload", help="register a bundle (directory or .zip) under its model.json name",
                        description="Upload a bundle (a directory, zipped on the fly, or a .zip); it is "
                                    "registered under the name in its model.json, replacing one of that name.")
    mu.add_argument("bundle", metavar="BUNDLE", help="bundle directory or .zip")
    md = sub.add_parser("delete", help="unregister a model", description="Unregister a model by name.")
    md.add_argument("name", metavar="NAME", help="a registered model's name")
    for parser, run in ((ml, _models_list), (mu, _models_upload), (md, _models_delete)):
        # Given again after the subcommand; SUPPRESS keeps what was given before it.
        _add_common(parser, suppress=True)
        _add_json(parser, suppress=True)
        parser.set_defaults(run=_guarded(run))


def main(argv: Sequence[str] | None = None, *, transport: httpx.BaseTransport | None = None) -> int:
    """Run one client command; returns the exit status. `transport` is for tests."""
    from smoothcert import __version__

    parser = argparse.ArgumentParser(prog="smoothcert", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"smoothcert {__version__}")
    register(parser.add_subparsers(dest="command", required=True))
    parser.set_defaults(transport=transport)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage; return rather than exit, for tests
        return e.code if isinstance(e.code, int) else 2
    return args.run(args)


# Options


def _add_common(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--server", metavar="URL", default=default,
                   help="API base URL (default: $SMOOTHCERT_URL, the URL `smoothcert up` saved, "
                        "or http://127.0.0.1:8000)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--key", "--api-key", dest="key", metavar="KEY", default=default,
                       help="API key (default: $SMOOTHCERT_API_KEY, else the user key `smoothcert up` saved)")
    which.add_argument("--admin", action="store_true", default=default if suppress else False,
                       help="use the admin key `smoothcert up` saved (the default for model uploads and deletions)")


def _add_json(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print the server's JSON (exact floats) instead of readable lines")


def _add_wait(p: argparse.ArgumentParser, *, always: bool = False) -> None:
    if not always:
        p.add_argument("--wait", action="store_true", help="wait for the jobs to end, showing progress")
    p.add_argument("--timeout", type=float, metavar="S", help="stop waiting after S seconds (the jobs go on)")


def _job_options(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    _add_wait(p)
    _add_json(p)
    p.add_argument("--out", metavar="FILE",
                   help="with --wait: also write the results as JSON to FILE (one input: its result; "
                        "several: a list in input order, null for a job that did not succeed)")
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="a retry with the same key returns the same job (several inputs: KEY-0, KEY-1, ...)")


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, help="noisy samples per forward pass (default: the worker's measured size)")
    p.add_argument("--numeric-mode", metavar="MODE",
                   help="fp32 (default), bf16 or fp16 (CUDA), with +fuse, +channels_last, +compile or "
                        "+cuda_graphs; recorded in every certificate")
    p.add_argument("--seed", type=int, help="same seed + same request = same result (not with the memory on)")


def _certification_options(p: argparse.ArgumentParser) -> None:
    """What the API takes of `certify-local`'s options, under the same names (the engine's
    own definitions, with the server's defaults)."""
    from smoothcert.commands.options import add_certification_options

    add_certification_options(p, server=True,
                              seed_help="same seed + same request = same result (not with the memory on)")


def _add_evaluate(subparsers: Any) -> None:
    """`evaluate` on its own (without the engine's): a registered model on a server only."""
    e = subparsers.add_parser("evaluate", help="certified accuracy of a registered model on a data set, on a server",
                              description=_EVALUATE_DESCRIPTION)
    e.add_argument("--model", required=True, metavar="NAME", help="a registered model's name")
    e.add_argument("--data", required=True, metavar="DATASET", help=_DATA_HELP)
    e.add_argument("--every", type=int, help="certify examples 0, K, 2K, ... (default 1)")
    e.add_argument("--limit", type=int, help="certify at most N examples")
    _certification_options(e)
    e.add_argument("--out", metavar="RUN_DIR", help="also write RUN_DIR/{results.tsv,summary.json,curve.png}")
    e.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    _extend_engine_evaluate(e)


_EVALUATE_DESCRIPTION = ("Upload a data set, certify every K-th example on the server in order, wait, and print "
                         "the summary (--json: as the server sent it); --out downloads the run directory.")
_DATA_HELP = "an .npz (x, y), a zip of class folders, or a directory of class folders (zipped on the fly)"


def _extend_engine_evaluate(e: argparse.ArgumentParser) -> None:
    """The server side of `evaluate`: the engine's command runs `remote` for `--model NAME`."""
    _add_common(e)
    _add_json(e)
    _add_wait(e, always=True)
    e.set_defaults(remote=_guarded(_evaluate), remote_only=("server", "key", "admin", "json", "timeout"))
    e.set_defaults(run=e.get_default("run") or (lambda args: args.remote(args)))


# Commands


def _guarded(command: Command) -> Command:
    """Turn the SDK's errors into a message and an exit status."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from clients._exceptions import (
            AuthenticationError,
            InputError,
            PermissionDeniedError,
            SmoothcertError,
        )

        try:
            return command(args)
        except (InputError, UsageError) as e:
            return _fail(str(e), 2)
        except PermissionDeniedError as e:
            return _fail(f"{e} (this needs an admin key: --admin uses the one `smoothcert up` saved, "
                         "or give --key KEY)", 1)
        except AuthenticationError as e:
            return _fail(f"{e} (the key was {_key_source(args)}; give --key KEY, or --server for the "
                         "server it belongs to)", 1)
        except SmoothcertError as e:
            return _fail(str(e), 1)
        except KeyboardInterrupt as e:
            if not isinstance(e, _Interrupted):
                print("smoothcert: interrupted", file=sys.stderr)
            return 130
    return run


def _fail(message: str, code: int) -> int:
    print(f"smoothcert: {message}", file=sys.stderr)
    return code


def _key_source(args: argparse.Namespace) -> str:
    from clients._base import credentials_path

    if getattr(args, "key", None):
        return "--key"
    if getattr(args, "admin", False):
        return f"the admin key in {credentials_path()}"
    if os.environ.get("SMOOTHCERT_API_KEY"):
        return "$SMOOTHCERT_API_KEY"
    return f"the user key in {credentials_path()}, or none"


def _client(args: argparse.Namespace, *, admin: bool = False) -> Client:
    """A client for the chosen server and key. `admin`: the command needs an admin key, so
    the saved admin key is the default unless a key is given (--key or $SMOOTHCERT_API_KEY)."""
    from clients._base import credentials_path, resolve_url, saved_key
    from clients._client import Client

    url = resolve_url(getattr(args, "server", None))
    key = getattr(args, "key", None)
    want_admin = getattr(args, "admin", False) or (admin and key is None and not os.environ.get("SMOOTHCERT_API_KEY"))
    if key is None and want_admin:
        key = saved_key(url, admin=True)
        if key is None and getattr(args, "admin", False):
            raise UsageError(f"--admin: {credentials_path()} holds no admin key for {url} "
                             "(`smoothcert up` writes it; give --key KEY otherwise)")
    return Client(url, api_key=key, transport=getattr(args, "transport", None))


def _search(args: argparse.Namespace) -> dict[str, Any] | None:
    given = {"steps": args.search_steps, "lr": args.search_lr, "samples": args.search_samples}
    given = {k: v for k, v in given.items() if v is not None}
    if not args.sigma_search:
        if given:
            raise UsageError(f"--search-{next(iter(given))} needs --sigma-search")
        return None
    return {"method": args.sigma_search, **given}


def _certify(args: argparse.Namespace) -> int:
    options = dict(
        sigma=args.sigma, sigma_search=_search(args), bound=args.bound, n0=args.n0, n=args.n, alpha=args.alpha,
        sampling=args.sampling, tolerance=args.tolerance, target_radius=args.target_radius, batch_size=args.batch,
        memory=args.memory, numeric_mode=args.numeric_mode, seed=args.seed,
    )
    return _submit_and_report(args, "certification", options, _certificate_line)


def _predict(args: argparse.Namespace) -> int:
    options = dict(sigma=args.sigma, n=args.n, alpha=args.alpha, batch_size=args.batch,
                   numeric_mode=args.numeric_mode, seed=args.seed)
    return _submit_and_report(args, "prediction", options, _prediction_line)


def _submit_and_report(args: argparse.Namespace, kind: str, options: dict[str, Any],
                       line: Callable[[dict[str, Any]], str]) -> int:
    """Submit one job per input (every input read first, so a bad one sends nothing), then
    with --wait wait for each in turn, printing its line as it ends."""
    from clients._inputs import encode_input

    if args.out and not args.wait:
        raise UsageError("--out writes the results: it needs --wait")
    names = [os.path.basename(path) for path in args.inputs]
    encoded = [encode_input(path) for path in args.inputs]
    several = len(encoded) > 1
    with _client(args) as client:
        submit = client.certify if kind == "certification" else client.predict
        jobs: list[Job] = []
        try:
            for i, item in enumerate(encoded):
                key = args.idempotency_key
                if key is not None and several:
                    key = f"{key}-{i}"
                jobs.append(submit(item, model=args.model, idempotency_key=key, **options))
        except BaseException:
            if jobs:
                print(f"smoothcert: submitted before the error (they go on): {' '.join(j.id for j in jobs)}",
                      file=sys.stderr)
            raise
        if not args.wait:
            if args.json:
                _print_json(_one_or_list([job.submitted.raw if job.submitted else {"id": job.id} for job in jobs]))
            else:
                for job, name in zip(jobs, names, strict=True):
                    print(f"{job.id}\t{job.submitted.status if job.submitted else 'queued'}\t{name}")
            return 0
        results, failed = _wait_all(args, jobs, names, line)
    if args.json:
        _print_json(_one_or_list(results))
    if args.out:
        Path(args.out).write_text(json.dumps(_one_or_list(results), indent=2, ensure_ascii=False) + "\n")
    return 1 if failed else 0


def _wait_all(args: argparse.Namespace, jobs: list[Job], names: list[str],
              line: Callable[[dict[str, Any]], str]) -> tuple[list[Any], int]:
    """Wait for each job (one deadline for all); print each result's line unless --json.
    Returns (results in input order, None where a job did not succeed; how many did not)."""
    from clients._exceptions import SmoothcertError

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    several = len(jobs) > 1
    results: list[Any] = []
    failed = 0
    for i, (job, name) in enumerate(zip(jobs, names, strict=True)):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            status = _wait(job, left, label=name if several else None, pending=jobs[i:])
        except SmoothcertError as e:
            _fail(f"{name}: {e}" if several else str(e), 1)
            results.append(None)
            failed += 1
            continue
        result = status.raw.get("result")
        results.append(result)
        if not args.json:
            print(f"{name}: {line(result or {})}", flush=True)
    return results, failed


def _evaluate(args: argparse.Namespace) -> int:
    given = [name for name, default in LOCAL_EVALUATE_ONLY.items() if getattr(args, name, default) != default]
    if given:
        raise UsageError(f"{', '.join('--' + n.replace('_', '-') for n in given)}: only for an evaluation in "
                         "this process (--bundle PATH), not on a server (--model NAME)")
    out = Path(args.out) if args.out else None
    if out is not None and not args.overwrite and any((out / name).exists() for name in RUN_FILES):
        raise UsageError(f"{out} already holds a run; pass --overwrite to replace it")
    options = dict(
        sigma=args.sigma, sigma_search=_search(args), bound=args.bound, n0=args.n0, n=args.n, alpha=args.alpha,
        sampling=args.sampling, tolerance=args.tolerance, target_radius=args.target_radius, batch_size=args.batch,
        memory=args.memory, numeric_mode=args.numeric_mode, seed=args.seed, every=args.every, limit=args.limit,
    )
    if not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such file or directory (on a server, --data is {_DATA_HELP}; "
                         "sklearn-digits is for an evaluation in this process, --bundle PATH)")
    with _client(args) as client:
        job = client.evaluate(args.data, model=args.model, **options)
        status = _wait(job, args.timeout)
        summary = status.raw.get("result") or {}
        if out is not None:
            files = {name: client.evaluation_file(job.id, name) for name in ("results.tsv", "curve.png")}
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            for name, data in files.items():
                (out / name).write_bytes(data)
    if args.json:
        _print_json(summary)
    else:
        from smoothcert.commands.evaluate import summary_lines

        print(f"evaluation {job.id} of {args.model} on {os.path.basename(os.path.normpath(args.data))}:")
        for text in summary_lines(summary):
            print(f"  {text}")
    if out is not None:
        print(f"wrote {out}/{{{','.join(RUN_FILES)}}}", file=sys.stderr)
    return 0


def _find(client: Client, job_id: str, kind: str | None) -> tuple[Job, JobStatus | None]:
    """The job `job_id` of `kind`, or without one, of the first kind the server knows it by
    (with the status that answered)."""
    from clients._exceptions import NotFoundError, SmoothcertError

    if kind is not None:
        return client.job(job_id, kind), None
    for each in KINDS:
        job = client.job(job_id, each)
        try:
            return job, job.status()
        except NotFoundError:
            continue
    raise SmoothcertError(f"no job {job_id} (certification, prediction or evaluation) for this API key")


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job, status = _find(client, args.id, args.kind)
        status = _wait(job, args.timeout, check=False) if args.wait else status or job.status()
    if args.json:
        _print_json(status.raw)
    else:
        print(_status_line(status, job.kind))
    if args.wait:
        _check_ended(status)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from clients._exceptions import SmoothcertError

    failed = 0
    with _client(args) as client:
        for job_id in args.ids:
            try:
                status = _find(client, job_id, args.kind)[0].cancel()
            except SmoothcertError as e:
                failed += 1
                _fail(f"{job_id}: {e}" if len(args.ids) > 1 else str(e), 1)
                continue
            if args.json:
                _print_json(status.raw)
            elif status.status == "running":
                print(f"{job_id}: cancel requested (it stops at its next batch of samples)")
            else:
                print(f"{job_id}: {status.status}")
    return 1 if failed else 0


def _models_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models()
    if args.json:
        _print_json([_model_json(m) for m in models])
        return 0
    rows = [("NAME", "KIND", "INPUT", "CLASSES", "DIGEST")]
    rows += [(m.name, m.kind or "-", "x".join(map(str, m.input_shape or ())) or "-",
              str(m.num_classes or "-"), (m.digest or "-")[:19]) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _models_upload(args: argparse.Namespace) -> int:
    with _client(args, admin=True) as client:
        model = client.upload_model(args.bundle)
    if args.json:
        _print_json(_model_json(model))
    else:
        print(f"registered {model.name} ({model.digest}) from {args.bundle}")
    return 0


def _models_delete(args: argparse.Namespace) -> int:
    with _client(args, admin=True) as client:
        model = client.delete_model(args.name)
    if args.json:
        _print_json(_model_json(model))
    else:
        print(f"deleted {model.name or args.name} ({model.digest})")
    return 0


# Waiting and output


def _wait(job: Job, timeout: float | None, *, check: bool = True, label: str | None = None,
          pending: list[Job] | None = None) -> JobStatus:
    """Wait with a progress line on stderr; with `check`, raise unless the job succeeded. On an
    interrupt, say which jobs (`pending`, default this one) go on without us."""
    line = _ProgressLine(sys.stderr, job.id, label)
    try:
        status = job.wait(timeout, on_progress=line)
    except KeyboardInterrupt:
        line.close(None)
        ids = " ".join(j.id for j in pending or [job])
        print(f"smoothcert: interrupted; on the server these jobs go on (smoothcert status ID --kind {job.kind} "
              f"--wait): {ids}", file=sys.stderr)
        raise _Interrupted() from None
    except BaseException:
        line.close(None)
        raise
    line.close(status)
    if check:
        _check_ended(status)
    return status


def _check_ended(status: JobStatus) -> None:
    from clients._exceptions import SmoothcertError

    status.raise_for_status()
    if status.status != "succeeded":
        raise SmoothcertError(f"job {status.id} ended {status.status}")


def _print_json(value: Any) -> None:
    # json.dumps writes each float as its shortest round-trip text: a radius or bound is printed
    # exactly as the server certified it, never rounded (up) to fewer digits.
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _one_or_list(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def _model_json(model: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(model).items() if k != "extra"} | model.extra


def _number(value: Any) -> str:
    """A parameter as sent (shortest round-trip text; integers without a fraction)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _class(result: dict[str, Any]) -> str:
    label = result.get("label")
    return f"class {result['prediction']}" + (f" ({label})" if label is not None else "")


def _certificate_line(result: dict[str, Any]) -> str:
    """One certificate for people: "class 7 (7), radius 0.5119 (σ 0.25, n 100000, α 0.001),
    memory off". The radius is rounded down to 4 places, never to nearest."""
    from smoothcert.rounding import floor_text

    n = _number(result.get("n"))
    if result.get("sampling") not in (None, "fixed") and result.get("n_max") is not None:
        n += f" of {_number(result['n_max'])}, {result['sampling']}"
    params = f"σ {_number(result.get('sigma'))}{_chosen(result)}, n {n}, α {_number(result.get('alpha'))}"
    memory = result.get("memory") or {}
    memory_text = f"memory {memory.get('outcome')}" if memory.get("used") else "memory off"
    if result.get("prediction") is None:
        return f"abstained ({params}), {memory_text}"
    return f"{_class(result)}, radius {floor_text(result.get('radius'), 4)} ({params}), {memory_text}"


def _chosen(result: dict[str, Any]) -> str:
    """" chosen by the selector" after a σ selector's σ (" (σ_e: no level chosen)" when its
    estimator abstained, so the σ shown is σ_e); nothing for other models."""
    sel = result.get("selector")
    if not sel:
        return ""
    return " chosen by the selector" if sel.get("sigma_index") is not None else " (σ_e: no level chosen)"


def _prediction_line(result: dict[str, Any]) -> str:
    params = (f"σ {_number(result.get('sigma'))}{_chosen(result)}, n {_number(result.get('n'))}, "
              f"α {_number(result.get('alpha'))}")
    if result.get("prediction") is None:
        return f"abstained ({params})"
    return f"{_class(result)} ({params}; a prediction: no radius)"


def _status_line(status: JobStatus, kind: str) -> str:
    p = status.progress
    if status.status == "succeeded":
        result = status.raw.get("result") or {}
        if kind == "evaluation":
            from smoothcert.commands.evaluate import summary_lines

            return f"{status.id}: succeeded: " + "; ".join(summary_lines(result))
        line = _certificate_line if kind == "certification" else _prediction_line
        return f"{status.id}: succeeded: {line(result)}"
    if status.error is not None:
        code = f"{status.error.code}: " if status.error.code else ""
        return f"{status.id}: {status.status}: {code}{status.error.message}"
    if p is not None and p.stage == "loading":
        return f"{status.id}: {status.status}: {LOADING_NOTE}"
    if p is not None and p.stage:
        return f"{status.id}: {status.status}, {p.stage} {p.samples_done:,}/{p.samples_total:,}"
    return f"{status.id}: {status.status}"


class _ProgressLine:
    """A job's progress on stderr: one line redrawn in place on a terminal (bar, counts,
    elapsed time and an estimate of the time left in the stage); elsewhere (CI, a pipe) one
    line per stage. A succeeded job's last line shows its stage full (total/total), and a
    note says when the worker is loading the model."""

    def __init__(self, stream: TextIO, job_id: str, label: str | None = None, width: int = 24):
        self.stream, self.job_id, self.width = stream, job_id, width
        self.name = f"job {job_id}" + (f" ({label})" if label else "")
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._stage: object = None
        self._stage_since = (self.started, 0)  # (time, samples done) when the stage was first seen
        self._counts: tuple[int, int] | None = None  # the last stage's (done, total)
        self._drawn = False
        self._noted = False

    def __call__(self, status: JobStatus) -> None:
        if status.done:  # drawn by close(), full when it succeeded
            return
        p = status.progress
        stage = p.stage if p is not None and p.stage else status.status
        now = time.monotonic()
        if stage != self._stage:
            self._stage_since = (now, p.samples_done if p is not None else 0)
        if p is not None and p.samples_total:
            self._counts = (p.samples_done, p.samples_total)
        if stage == "loading" and not self._noted:
            self._noted = True
            self._clear()
            print(f"{self.name}: {LOADING_NOTE}", file=self.stream, flush=True)
        elif self.tty:
            self._draw(stage, self._counts if p is not None and p.samples_total else None, now)
        elif stage != self._stage:
            print(f"{self.name}: {stage}", file=self.stream, flush=True)
        self._stage = stage

    def close(self, status: JobStatus | None) -> None:
        """The last line (`status` None: interrupted, just end the line). A succeeded job's
        stage is shown full, total of total, even if the server's last write lagged."""
        if status is None:
            if self._drawn:
                print(file=self.stream, flush=True)
            return
        p = status.progress
        stage, counts = None, None
        if status.status == "succeeded":
            if p is not None and p.samples_total:
                stage, counts = p.stage, (p.samples_total, p.samples_total)
            elif self._counts is not None:
                stage, counts = self._stage, (self._counts[1], self._counts[1])
        elapsed = time.monotonic() - self.started
        if self.tty:
            self._draw(status.status, counts, time.monotonic(), final=True)
            print(file=self.stream, flush=True)
            self._drawn = False
        else:
            detail = f" ({stage} {counts[0]:,}/{counts[1]:,})" if counts is not None else ""
            print(f"{self.name}: {status.status} in {elapsed:.1f} s{detail}", file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self._drawn = False

    def _draw(self, stage: str, counts: tuple[int, int] | None, now: float, final: bool = False) -> None:
        elapsed = now - self.started
        text = f"\r{stage:<12}"
        if counts is not None:
            done, total = counts
            filled = int(self.width * min(done / total, 1.0))
            text += f" [{'#' * filled}{'.' * (self.width - filled)}] {done:,}/{total:,}"
        text += f" {elapsed:5.1f}s"
        if not final:
            text += f" eta {self._eta(counts, now)}"
        self.stream.write(text.ljust(100))
        self.stream.flush()
        self._drawn = True

    def _eta(self, counts: tuple[int, int] | None, now: float) -> str:
        """Time left in this stage, from its rate since it was first seen; "?" until known."""
        since, done0 = self._stage_since
        if counts is None or counts[0] <= done0 or now <= since:
            return "?"
        done, total = counts
        return f"{(now - since) / (done - done0) * max(total - done, 0):.0f}s"


if __name__ == "__main__":
    sys.exit(main())
