"""What every reliability scenario reports: named checks (PASS/FAIL lines), the figures
behind them, the configuration and the machine; printed, and written as JSON with --json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_model


@dataclass
class Check:
    ok: bool
    what: str
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.what}: {self.detail}"


@dataclass
class Report:
    """A scenario's outcome: `ok` only if every check passed and the scenario finished."""

    scenario: str
    config: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def check(self, ok: bool, what: str, detail: str) -> bool:
        self.checks.append(Check(bool(ok), what, detail))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def text(self) -> str:
        lines = [c.line() for c in self.checks]
        if self.error is not None:
            lines.append(f"FAIL {self.scenario} did not finish: {self.error}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "ok": self.ok, "seconds": round(self.seconds, 1),
                "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
                "config": self.config, "figures": self.figures,
                "checks": [vars(c) for c in self.checks], "error": self.error}


def scenario_parser(doc: str, *, deadline: float) -> argparse.ArgumentParser:
    """A scenario's parser, its description the first paragraph of `doc`, with the options
    every scenario takes: --deadline (seconds for the whole run), --seed, --logs, --json."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=deadline, help="seconds for the whole run")
    common_arguments(parser)
    return parser


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenario's random choices")
    parser.add_argument("--logs", type=Path, default=None, help="keep the stack's logs in this folder")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the report here")


@contextmanager
def log_folder(logs: Path | None, prefix: str) -> Iterator[Path]:
    """`logs` (kept), or a temporary folder removed afterwards."""
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        yield logs
        return
    folder = Path(tempfile.mkdtemp(prefix=f"smoothcert-{prefix}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_scenario(name: str, args: argparse.Namespace, body: Callable[[Report, Path], None]) -> Report:
    """Run `body(report, logs)`; an exception ends the scenario as a failure with its message
    (and the stack's log tail, when the body attached it to the exception)."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = Report(name, config)
    started = time.monotonic()
    with log_folder(args.logs, name) as logs:
        try:
            body(report, logs)
        except KeyboardInterrupt:
            report.error = "interrupted"
        except Exception as exc:  # the report says what went wrong; the caller decides
            report.error = f"{type(exc).__name__}: {exc}"
    report.seconds = time.monotonic() - started
    return report


def main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Report],
         argv: list[str] | None = None) -> int:
    """Parse, run, print the checks, write the JSON; exit status 0 only if every check passed."""
    args = parser.parse_args(argv)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    sys.stdout.reconfigure(line_buffering=True)
    print(f"cpu:    {cpu_model()} ({os.cpu_count()} logical cores); python {platform.python_version()}")
    report = run(args)
    print(f"\n{report.scenario}: {report.seconds:.0f} s")
    print(report.text())
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_json(), indent=2, default=str))
        print(f"report written to {args.json}")
    return 0 if report.ok else 1
