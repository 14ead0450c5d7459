"""The `smoothcert` command line itself: a parser that loads nothing heavy, --version,
--bundle against the deprecated --model, interrupts, and the progress bar."""

from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smoothcert.cli import main
from smoothcert.progress import ProgressBar

from .test_certify_local import linear_bundle, read_tsv

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "numpy", "scipy", "httpx", "fastapi", "redis", "celery")


def test_building_the_parser_imports_nothing_heavy(record_property):
    """`smoothcert --help` builds every command's parser, the plugged-in client commands and
    `up` included: none of them may import a heavy library until it runs."""
    code = ("import sys, smoothcert.cli; smoothcert.cli.build_parser(); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
    # The time, as information only (timing is never asserted here): median of 5 warm runs.
    command = [sys.executable, "-m", "smoothcert.cli", "--help"]
    subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    record_property("help_seconds_median", statistics.median(times))
    print(f"smoothcert --help: median {statistics.median(times):.3f} s of {len(times)} warm runs")


def test_help_names_every_command():
    from importlib.metadata import entry_points

    result = subprocess.run([sys.executable, "-m", "smoothcert.cli", "--help"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    commands = ["certify-local", "train", "evaluate", "plot"]
    plugins = {ep.name for ep in entry_points(group="smoothcert.commands")}  # none where only the engine is
    commands += ["certify", "predict", "status", "cancel", "models"] if "client" in plugins else []
    commands += ["up"] if "up" in plugins else []
    for command in commands:
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), command


def test_version(capsys):
    from smoothcert import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"smoothcert {__version__}\n"


def test_the_option_constants_are_the_engines():
    from smoothcert import adaptive
    from smoothcert.commands import options

    assert (options.SAMPLINGS, options.DEFAULT_TOLERANCE) == (adaptive.SAMPLINGS, adaptive.DEFAULT_TOLERANCE)


@pytest.fixture()
def bundle_and_input(tmp_path):
    np.save(tmp_path / "one.npy", np.full((1, 4, 4), 0.9, np.float32))
    return str(linear_bundle(tmp_path / "bundle")), str(tmp_path / "one.npy")


def test_certify_local_takes_bundle_and_model_as_its_deprecated_alias(bundle_and_input, tmp_path, capsys):
    bundle, x = bundle_and_input
    fast = ["--n0", "20", "--n", "200", "--alpha", "0.01", "--seed", "1"]
    assert main(["certify-local", "--bundle", bundle, x, *fast, "--out", str(tmp_path / "a.tsv")]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["certify-local", "--model", bundle, x, *fast, "--out", str(tmp_path / "b.tsv")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert notes == ["smoothcert certify-local: note: --model is deprecated here, use --bundle PATH "
                     "(--model names a registered model in the client commands)"]
    same = [[{k: v for k, v in row.items() if k != "time"} for row in read_tsv((tmp_path / name).read_text())]
            for name in ("a.tsv", "b.tsv")]
    assert same[0] == same[1] and same[0][0]["radius"]
    with pytest.raises(SystemExit) as exit_:
        main(["certify-local", x])
    assert exit_.value.code == 2 and "--bundle is required" in capsys.readouterr().err


def engine_parser() -> argparse.ArgumentParser:
    """The engine's commands alone (no client plugin), as where only the engine is installed."""
    from smoothcert.commands import evaluate

    p = argparse.ArgumentParser(prog="smoothcert")
    evaluate.register(p.add_subparsers(dest="command", required=True))
    return p


def test_evaluate_reads_a_bundle_path_given_to_model_with_a_note(tmp_path, capsys):
    from smoothcert.bounds import InvalidParameters

    def run(*argv: str) -> int:
        args = engine_parser().parse_args(list(argv))
        return args.run(args)

    fast = ["--data", "sklearn-digits", "--limit", "1", "--n0", "20", "--n", "200", "--alpha", "0.01"]
    assert run("evaluate", "--model", "models/digits", *fast, "--out", str(tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "note: --model models/digits is a bundle on disk: evaluating it here" in err
    assert (tmp_path / "run" / "summary.json").exists()
    with pytest.raises(InvalidParameters, match="needs the client commands"):
        run("evaluate", "--model", "digits", *fast)  # a registered name: a server's job
    with pytest.raises(InvalidParameters, match="--out RUN_DIR is required"):
        run("evaluate", "--bundle", "models/digits", *fast)


def test_an_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    from smoothcert.commands import certify_local

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(certify_local, "certify_local", interrupted)
    assert main(["certify-local", "--bundle", "b", "x.png"]) == 130
    assert capsys.readouterr().err == "smoothcert: interrupted\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_carry_an_estimate_and_end_at_the_total():
    log = io.StringIO()
    bar = ProgressBar(2, "certify", stream=log)
    bar.stage("estimation", 50, 100)
    bar.advance("a")
    bar.advance("b")
    bar.close()
    lines = log.getvalue().splitlines()
    assert re.fullmatch(r"certify 1/2 a \(\d+\.\ds, eta \d+\.\ds\)", lines[0]), lines
    assert re.fullmatch(r"certify 2/2 b \(\d+\.\ds, eta 0\.0s\)", lines[1]), lines


def test_on_a_terminal_a_finished_stage_is_drawn_full_at_once():
    terminal = Terminal()
    bar = ProgressBar(1, "certify", stream=terminal)
    bar.stage("estimation", 10, 100)  # within 0.1 s of the start: throttled
    assert terminal.getvalue() == ""
    bar.stage("estimation", 100, 100)  # a finished stage is always drawn
    frame = terminal.getvalue().split("\r")[-1]
    assert "estimation 100/100" in frame and "0/1" in frame and "eta " in frame
    bar.advance("done")
    bar.close()
    assert re.search(r"\[#{24}\] 1/1 .*eta 0\.0s done", terminal.getvalue().split("\r")[-1])
    assert bar.eta() == 0.0
