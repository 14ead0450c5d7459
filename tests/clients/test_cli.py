"""The client commands (`certify`, `models`, `status`) against the fake server."""

from __future__ import annotations

import argparse
import json
import math

import httpx
import numpy as np
import pytest

from clients.cli import main, register

from . import fake_server
from .conftest import BASE_URL


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.full((1, 8, 8), 0.5, np.float32))
    return str(path)


@pytest.fixture
def run(transport, capsys):
    """main(argv) on the fake server → (exit status, stdout, stderr)."""
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--help"] if not argv else [argv[0], "--server", BASE_URL, *argv[1:]],
                    transport=transport)
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_certify_wait_prints_the_certificate_as_json(run, state, image):
    code, out, err = run("certify", image, "--model", "digits", "--sigma-search", "ddrs",
                         "--search-steps", "5", "--n", "1000", "--seed", "7", "--no-memory", "--wait")
    assert code == 0
    cert = json.loads(out)
    assert (cert["prediction"], cert["radius"], cert["n"], cert["seconds"]) == (7, 0.41, 1000, 1.5)
    assert state.last_job().request | {"input": None} == {
        "model": "digits", "input": None, "sigma_search": {"method": "ddrs", "steps": 5}, "n": 1000,
        "seed": 7, "memory": False}
    # stderr is not a terminal here: one line per stage
    assert err.splitlines() == [f"job cert-0: {s}" for s in ("queued", "sigma_search", "estimation", "succeeded")]


def test_certify_prints_the_radius_and_bound_exactly_never_rounded_up(run, image, monkeypatch):
    # The CLI prints the server's floats as JSON, the shortest text that reads back as the same
    # float: a radius just below 0.1235 stays below it (`.4f` would print 0.1235, above it).
    radius, p_a_lower = math.nextafter(0.1235, 0), math.nextafter(0.9, 0)
    steps = fake_server._steps

    def adversarial(kind, body):
        out = steps(kind, body)
        out[-1]["result"] |= {"radius": radius, "p_a_lower": p_a_lower}
        return out

    monkeypatch.setattr(fake_server, "_steps", adversarial)
    code, out, _ = run("certify", image, "--model", "digits", "--wait")
    assert code == 0 and f'"radius": {radius!r}' in out and f'"p_a_lower": {p_a_lower!r}' in out
    assert (json.loads(out)["radius"], json.loads(out)["p_a_lower"]) == (radius, p_a_lower)
    code, out, _ = run("status", "cert-0")
    assert code == 0 and f'"radius": {radius!r}' in out and json.loads(out)["result"]["radius"] == radius


def test_certify_sends_sampling_and_tolerance(run, state, image):
    code, _, _ = run("certify", image, "--model", "digits", "--sampling", "adaptive", "--tolerance", "0.1")
    assert code == 0
    request = state.last_job().request
    assert (request["sampling"], request["tolerance"]) == ("adaptive", 0.1)
    assert run("certify", image, "--model", "digits", "--sampling", "sometimes")[0] == 2


def test_certify_sends_sequential_sampling_and_target_radius(run, state, image):
    code, _, _ = run("certify", image, "--model", "digits", "--sampling", "sequential", "--target-radius", "0.5")
    assert code == 0
    request = state.last_job().request
    assert (request["sampling"], request["target_radius"]) == ("sequential", 0.5) and "tolerance" not in request
    assert run("certify", image, "--model", "digits")[0] == 0
    assert "target_radius" not in state.last_job().request  # not given: not sent


def test_certify_without_wait_prints_the_job(run, state, image):
    code, out, _ = run("certify", image, "--model", "digits", "--sigma", "0.5", "--idempotency-key", "k")
    assert (code, out) == (0, "cert-0\tqueued\n")
    assert state.last_job().request["sigma"] == 0.5 and state.requests[-1]["headers"]["idempotency-key"] == "k"


def test_server_errors_exit_1(run, image):
    code, out, err = run("certify", image, "--model", "nope", "--wait")
    assert (code, out) == (1, "")
    assert err.startswith("smoothcert: no model 'nope'") and "404" in err


def test_a_failed_job_exits_1(run, image):
    code, out, err = run("certify", image, "--model", "broken", "--wait")
    assert (code, out) == (1, "")
    assert err.splitlines()[-1] == "smoothcert: job cert-0 failed: model_error: logits are NaN"


def test_wait_timeout_exits_1(run, image):
    code, _, err = run("certify", image, "--model", "stuck", "--wait", "--timeout", "0")
    assert code == 1 and "did not finish within 0 s" in err


def test_unreachable_server_exits_1(image, capsys):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    assert main(["models", "--server", "http://down:1"], transport=httpx.MockTransport(refuse)) == 1
    assert capsys.readouterr().err == "smoothcert: cannot reach http://down:1: connection refused\n"


def test_usage_and_local_input_errors_exit_2(run, state, tmp_path):
    assert run("certify", "x.png")[0] == 2  # --model missing
    assert run("certify", "x.png", "--model", "digits", "--sigma", "1", "--sigma-search", "ddrs")[0] == 2
    code, _, err = run("certify", str(tmp_path / "missing.png"), "--model", "digits")
    assert code == 2 and err.startswith("smoothcert: cannot read")
    assert run("certify", "x.png", "--model", "digits", "--search-steps", "3")[0] == 2
    assert state.requests == []


def test_models_table_and_json(run):
    code, out, _ = run("models")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "KIND", "INPUT", "CLASSES", "DIGEST"]
    assert lines[1].split() == ["digits", "standard", "1x8x8", "10", "sha256:abababababab"]
    code, out, _ = run("models", "--json")
    assert [m["name"] for m in json.loads(out)] == ["digits", "broken", "stuck"]
    assert json.loads(out)[0]["created_at"] == "2024-01-01T00:00:00Z"


def test_status_and_status_wait(run, image):
    run("certify", image, "--model", "digits")
    code, out, _ = run("status", "cert-0")
    assert code == 0 and json.loads(out)["status"] == "queued"
    code, out, err = run("status", "cert-0", "--wait")
    assert code == 0 and json.loads(out)["result"]["radius"] == 0.41 and "succeeded" in err
    run("certify", image, "--model", "broken")
    code, out, err = run("status", "cert-1", "--wait")
    assert code == 1 and json.loads(out)["status"] == "failed" and "model_error" in err
    assert run("status", "nope")[0] == 1


def test_register_adds_the_commands_to_another_parser(monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="smoothcert")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("certify-local")
    register(commands)
    args = parser.parse_args(["certify", "x.png", "--model", "digits", "--sigma", "0.25"])
    assert (args.image, args.model, args.sigma, args.server, args.wait) == ("x.png", "digits", 0.25, None, False)
    monkeypatch.setenv("SMOOTHCERT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    args = parser.parse_args(["models"])
    assert args.run(args) == 1  # no transport given: a real connection, refused
    assert capsys.readouterr().err.startswith("smoothcert: cannot reach http://127.0.0.1:9: ")
