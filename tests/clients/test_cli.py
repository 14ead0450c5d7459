"""The client commands against the fake server, and against the real app with a real worker
in this process (as test_contract.py runs it)."""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients.cli import LOADING_NOTE, main, register

from . import fake_server
from .conftest import BASE_URL

ROOT = Path(__file__).resolve().parents[2]


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


def save_credentials(tmp_path, **saved) -> None:
    """What `smoothcert up` leaves (tests/conftest.py points XDG_CONFIG_HOME at tmp_path/config)."""
    path = tmp_path / "config" / "smoothcert" / "credentials.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved))


# certify


def test_certify_wait_prints_a_readable_line_with_the_radius_rounded_down(run, state, image):
    code, out, err = run("certify", image, "--model", "digits", "--sigma-search", "ddrs", "--search-steps", "5",
                         "--n", "1000", "--seed", "7", "--no-memory", "--wait")
    assert code == 0
    assert out == "x.npy: class 7 (7), radius 0.4099 (σ 0.27, n 1000, α 0.001), memory new\n"
    # The float 0.41 is 0.40999999999999997…: its exact value rounded down, never to nearest.
    assert state.last_job().request | {"input": None} == {
        "model": "digits", "input": None, "sigma_search": {"method": "ddrs", "steps": 5}, "n": 1000,
        "seed": 7, "memory": False}
    # stderr is not a terminal here: one line per stage, the last one full
    lines = err.splitlines()
    assert lines[:3] == [f"job cert-0: {s}" for s in ("queued", "sigma_search", "estimation")]
    assert re.fullmatch(r"job cert-0: succeeded in \d+\.\d s \(estimation 1,000/1,000\)", lines[3])


def test_certify_json_prints_the_certificate_exactly_never_rounded_up(run, image, monkeypatch):
    # --json prints the server's floats as the shortest text that reads back as the same float;
    # the readable line rounds the radius down: just below 0.1235 is 0.1234, never 0.1235.
    radius, p_a_lower = math.nextafter(0.1235, 0), math.nextafter(0.9, 0)
    steps = fake_server._steps

    def adversarial(*args):
        out = steps(*args)
        out[-1]["result"] |= {"radius": radius, "p_a_lower": p_a_lower}
        return out

    monkeypatch.setattr(fake_server, "_steps", adversarial)
    code, out, _ = run("certify", image, "--model", "digits", "--wait", "--json")
    assert code == 0 and f'"radius": {radius!r}' in out and f'"p_a_lower": {p_a_lower!r}' in out
    assert (json.loads(out)["radius"], json.loads(out)["p_a_lower"], json.loads(out)["seconds"]) == (
        radius, p_a_lower, 1.5)
    code, out, _ = run("certify", image, "--model", "digits", "--wait")
    assert code == 0 and "radius 0.1234 (" in out
    code, out, _ = run("status", "cert-0", "--json")
    assert code == 0 and f'"radius": {radius!r}' in out and json.loads(out)["result"]["radius"] == radius


def test_certify_sends_every_option_the_api_takes(run, state, image):
    code, _, _ = run("certify", image, "--model", "digits", "--sigma-search", "insta", "--search-steps", "2",
                     "--search-lr", "0.5", "--search-samples", "16", "--bound", "two_sided", "--n0", "50",
                     "--n", "2000", "--alpha", "0.01", "--sampling", "adaptive", "--tolerance", "0.1",
                     "--batch", "64", "--numeric-mode", "fp32+channels_last", "--memory")
    assert code == 0
    request = state.last_job().request
    del request["input"]
    assert request == {"model": "digits", "sigma_search": {"method": "insta", "steps": 2, "lr": 0.5, "samples": 16},
                       "bound": "two_sided", "n0": 50, "n": 2000, "alpha": 0.01, "sampling": "adaptive",
                       "tolerance": 0.1, "batch_size": 64, "numeric_mode": "fp32+channels_last", "memory": True}
    assert run("certify", image, "--model", "digits", "--sampling", "sometimes")[0] == 2


def test_certify_sends_sequential_sampling_and_target_radius(run, state, image):
    code, _, _ = run("certify", image, "--model", "digits", "--sampling", "sequential", "--target-radius", "0.5")
    assert code == 0
    request = state.last_job().request
    assert (request["sampling"], request["target_radius"]) == ("sequential", 0.5) and "tolerance" not in request
    assert run("certify", image, "--model", "digits")[0] == 0
    assert "target_radius" not in state.last_job().request  # not given: not sent


def test_certify_without_wait_prints_the_jobs(run, state, image):
    code, out, _ = run("certify", image, "--model", "digits", "--sigma", "0.5", "--idempotency-key", "k")
    assert (code, out) == (0, "cert-0\tqueued\tx.npy\n")
    assert state.last_job().request["sigma"] == 0.5 and state.requests[-1]["headers"]["idempotency-key"] == "k"
    code, out, _ = run("certify", image, "--model", "digits", "--json")
    assert code == 0 and json.loads(out) == {"id": "cert-1", "status": "queued"}


def test_several_inputs_are_submitted_together_then_waited(run, state, image, tmp_path):
    other = tmp_path / "y.npy"
    np.save(other, np.full((1, 8, 8), 0.25, np.float32))
    out_file = tmp_path / "results.json"
    code, out, err = run("certify", image, str(other), "--model", "digits", "--n", "1000", "--wait",
                         "--idempotency-key", "batch", "--out", str(out_file))
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["x.npy", "y.npy"]
    methods = [r["method"] for r in state.requests]
    assert methods[:2] == ["POST", "POST"] and set(methods[2:]) == {"GET"}  # both submitted before any wait
    assert [r["headers"]["idempotency-key"] for r in state.requests[:2]] == ["batch-0", "batch-1"]
    saved = json.loads(out_file.read_text())
    assert [r["prediction"] for r in saved] == [7, 7] and saved[0]["n"] == 1000
    assert "job cert-0 (x.npy): succeeded" in err and "job cert-1 (y.npy): succeeded" in err
    code, out, _ = run("certify", image, str(other), "--model", "digits", "--wait", "--json")
    assert [r["radius"] for r in json.loads(out)] == [0.41, 0.41]


def test_one_failed_job_among_several_exits_1_after_the_others(run, image, monkeypatch):
    steps, made = fake_server._steps, []

    def second_fails(kind, body, loading=False):
        made.append(kind)
        return steps(kind, body | {"model": "broken"} if len(made) == 2 else body, loading)

    monkeypatch.setattr(fake_server, "_steps", second_fails)
    code, out, err = run("certify", image, image, image, "--model", "digits", "--wait", "--json")
    assert code == 1
    assert [r and r["prediction"] for r in json.loads(out)] == [7, None, 7]  # the third still waited for
    assert "smoothcert: x.npy: job cert-1 failed: model_error: logits are NaN" in err.splitlines()


def test_a_bad_input_among_several_sends_nothing(run, state, image, tmp_path):
    code, _, err = run("certify", image, str(tmp_path / "missing.png"), "--model", "digits", "--wait")
    assert code == 2 and err.startswith("smoothcert: cannot read") and state.requests == []


def test_out_needs_wait(run, state, image, tmp_path):
    code, _, err = run("certify", image, "--model", "digits", "--out", str(tmp_path / "r.json"))
    assert code == 2 and "--wait" in err and state.requests == []


def test_the_loading_stage_is_explained_and_a_lagging_last_write_still_ends_full(run, state, image, monkeypatch):
    steps = fake_server._steps

    def lagging(*args):  # a worker whose throttled progress never wrote the last batch
        out = steps(*args)
        out[-1]["progress"] = {"stage": "estimation", "samples_done": 99_072, "samples_total": 100_000}
        return out

    monkeypatch.setattr(fake_server, "_steps", lagging)
    state.loading = True
    code, out, err = run("certify", image, "--model", "digits", "--wait")
    assert code == 0 and out.startswith("x.npy: class 7")
    lines = err.splitlines()
    assert lines[1] == f"job cert-0: {LOADING_NOTE}" and err.count(LOADING_NOTE) == 1
    assert lines[-1].endswith("(estimation 100,000/100,000)")


def test_on_a_terminal_the_bar_has_an_estimate_and_ends_full(transport, image, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream, as a terminal
    assert main(["certify", image, "--model", "digits", "--n", "1000", "--wait", "--server", BASE_URL],
                transport=transport) == 0
    frames = [f.strip() for f in capsys.readouterr().err.split("\r") if f.strip()]
    assert any(" eta " in f for f in frames[:-1])
    assert re.match(r"succeeded\s+\[#{24}\] 1,000/1,000\s+\d+\.\ds$", frames[-1]), frames[-1]


def test_an_interrupt_names_the_jobs_that_go_on(run, image, monkeypatch):
    from clients._jobs import Job

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Job, "wait", interrupted)
    code, out, err = run("certify", image, image, "--model", "digits", "--wait")
    assert (code, out) == (130, "")
    assert err == ("smoothcert: interrupted; on the server these jobs go on (smoothcert status ID --kind "
                   "certification --wait): cert-0 cert-1\n")


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
    code, _, err = run("certify", "x.png", "--model", "digits", "--search-lr", "3")
    assert code == 2 and "--search-lr needs --sigma-search" in err
    assert state.requests == []


# predict, status, cancel


def test_predict(run, state, image):
    code, out, _ = run("predict", image, "--model", "digits", "--n", "500", "--sigma", "0.5", "--seed", "3", "--wait")
    assert code == 0 and out == "x.npy: class 7 (7) (σ 0.5, n 500, α 0.001; a prediction: no radius)\n"
    assert state.last_job().kind == "prediction"
    assert state.last_job().request | {"input": None} == {"model": "digits", "input": None, "n": 500,
                                                          "sigma": 0.5, "seed": 3}
    code, out, _ = run("predict", image, "--model", "digits", "--wait", "--json")
    assert json.loads(out)["p_value"] == 1e-9


def test_status_and_status_wait(run, image):
    run("certify", image, "--model", "digits")
    code, out, _ = run("status", "cert-0")
    assert (code, out) == (0, "cert-0: queued\n")
    code, out, _ = run("status", "cert-0")
    assert (code, out) == (0, "cert-0: running, selection 0/200\n")
    code, out, err = run("status", "cert-0", "--wait", "--json")
    assert code == 0 and json.loads(out)["result"]["radius"] == 0.41 and "succeeded" in err
    code, out, _ = run("status", "cert-0")
    assert out == "cert-0: succeeded: class 7 (7), radius 0.4099 (σ 0.27, n 100000, α 0.001), memory new\n"
    run("certify", image, "--model", "broken")
    code, out, err = run("status", "cert-1", "--wait")
    assert code == 1 and out == "cert-1: failed: model_error: logits are NaN\n"
    code, _, err = run("status", "nope")
    assert code == 1 and "no job nope (certification, prediction or evaluation)" in err
    code, _, err = run("status", "cert-0", "--kind", "prediction")  # the kind is part of the job's address
    assert code == 1 and "no prediction" in err
    run("predict", image, "--model", "digits")
    code, out, _ = run("status", "pred-2")  # found under its own kind
    assert (code, out) == (0, "pred-2: queued\n")


def test_cancel(run, state, image):
    for _ in range(3):
        run("certify", image, "--model", "stuck")
    code, out, _ = run("cancel", "cert-0", "cert-1")
    assert (code, out) == (0, "cert-0: cancelled\ncert-1: cancelled\n")
    assert [r["method"] for r in state.requests[-4:]] == ["GET", "DELETE"] * 2  # each job's kind found first
    sent = len(state.requests)
    assert run("cancel", "cert-2", "--kind", "certification")[0] == 0
    assert [r["method"] for r in state.requests[sent:]] == ["DELETE"]
    code, _, err = run("cancel", "cert-0")  # the fake answers 409 for a job that ended
    assert code == 1 and "already ended" in err
    run("certify", image, "--model", "stuck")
    code, out, _ = run("cancel", "nope", "cert-3", "--json")
    assert code == 1 and json.loads(out)["status"] == "cancelled"


# models and keys


def test_models_list_table_and_json(run):
    for argv in (("models",), ("models", "list")):
        code, out, _ = run(*argv)
        lines = out.splitlines()
        assert code == 0 and lines[0].split() == ["NAME", "KIND", "INPUT", "CLASSES", "DIGEST"]
        assert lines[1].split() == ["digits", "standard", "1x8x8", "10", "sha256:abababababab"]
    for argv in (("models", "--json"), ("models", "list", "--json")):
        code, out, _ = run(*argv)
        assert [m["name"] for m in json.loads(out)] == ["digits", "broken", "stuck"]
        assert json.loads(out)[0]["created_at"] == "2024-01-01T00:00:00Z"


def test_models_upload_and_delete_use_the_saved_admin_key(transport, state, tmp_path, capsys):
    state.api_key, state.admin_key = "user-key", "admin-key"
    save_credentials(tmp_path, url=BASE_URL, api_key="user-key", admin_key="admin-key")
    code = main(["models", "upload", str(ROOT / "models" / "digits")], transport=transport)
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("registered digits (sha256:")
    assert state.requests[-1]["headers"]["authorization"] == "Bearer admin-key"
    assert set(state.uploads[-1]) >= {"model.json", "weights.pt"}
    assert main(["models"], transport=transport) == 0  # other commands: the user key
    assert state.requests[-1]["headers"]["authorization"] == "Bearer user-key"
    capsys.readouterr()
    assert main(["models", "delete", "stuck", "--json"], transport=transport) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "stuck" and "stuck" not in state.models
    assert main(["models", "delete", "stuck"], transport=transport) == 1


def test_key_and_admin_choose_the_key(transport, state, tmp_path, capsys, monkeypatch):
    state.api_key, state.admin_key = "user-key", "admin-key"
    bundle = str(ROOT / "models" / "digits")
    # The user key on an admin route: a 403 that says how to give an admin key.
    code = main(["models", "upload", bundle, "--server", BASE_URL, "--key", "user-key"], transport=transport)
    assert code == 1 and "--admin" in capsys.readouterr().err
    assert main(["models", "upload", bundle, "--server", BASE_URL, "--api-key", "admin-key"], transport=transport) == 0
    # --admin needs credentials saved for this server; a key saved for another is never sent.
    save_credentials(tmp_path, url="http://elsewhere:8000", api_key="user-key", admin_key="admin-key")
    code = main(["models", "--server", BASE_URL, "--admin"], transport=transport)
    assert code == 2 and "holds no admin key for http://testserver" in capsys.readouterr().err
    code = main(["models", "--server", BASE_URL], transport=transport)
    assert code == 1 and "bad API key" in capsys.readouterr().err
    assert "authorization" not in state.requests[-1]["headers"]
    save_credentials(tmp_path, url=BASE_URL, api_key="user-key", admin_key="admin-key")
    assert main(["models", "--admin"], transport=transport) == 0
    assert state.requests[-1]["headers"]["authorization"] == "Bearer admin-key"
    monkeypatch.setenv("SMOOTHCERT_API_KEY", "user-key")  # a key the user gave: used as it is
    assert main(["models", "upload", bundle], transport=transport) == 1
    assert main(["models", "--key", "k", "--admin"], transport=transport) == 2  # one or the other


# evaluate


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "test.npz"
    np.savez(path, x=np.full((3, 1, 8, 8), 0.5, np.float32), y=np.array([7, 7, 7]))
    return path


def test_evaluate_on_the_server_prints_the_summary_and_downloads_the_run(run, state, dataset, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run("evaluate", "--model", "digits", "--data", str(dataset), "--n", "1000", "--every", "2",
                         "--sigma", "0.25", "--out", str(out_dir))
    assert code == 0
    filename, data, form = state.datasets[-1]
    assert (filename, data) == ("test.npz", dataset.read_bytes())
    assert form == {"model": "digits", "n": "1000", "every": "2", "sigma": "0.25"}
    assert out.splitlines() == [
        f"evaluation eval-0 of digits on {dataset.name}:",
        "  3 examples: clean accuracy 1.000, ACR 0.456, abstained 0.000",  # ACR 0.4567891 rounded down
        "  certified accuracy at r = 0: 1.000, 0.25: 0.666",  # 2/3 rounded down
        "  samples per example: 1100 (estimation n 1000)"]
    assert json.loads((out_dir / "summary.json").read_text()) == fake_server.SUMMARY
    assert (out_dir / "curve.png").read_bytes() == fake_server.CURVE
    assert (out_dir / "results.tsv").read_text().startswith("idx\tlabel")
    assert "job eval-0: succeeded" in err and "(evaluation 3/3)" in err
    code, _, err = run("evaluate", "--model", "digits", "--data", str(dataset), "--out", str(out_dir))
    assert code == 2 and "--overwrite" in err
    code, out, _ = run("evaluate", "--model", "digits", "--data", str(dataset), "--json")
    assert code == 0 and json.loads(out) == fake_server.SUMMARY
    code, out, _ = run("status", "eval-0", "--kind", "evaluation")
    assert out == ("eval-0: succeeded: 3 examples: clean accuracy 1.000, ACR 0.456, abstained 0.000; certified "
                   "accuracy at r = 0: 1.000, 0.25: 0.666; samples per example: 1100 (estimation n 1000)\n")


def test_evaluate_zips_a_directory_of_class_folders(run, state, tmp_path):
    import zipfile

    for label in ("3", "7"):
        (tmp_path / "data" / label).mkdir(parents=True)
        (tmp_path / "data" / label / "a.png").write_bytes(b"png " + label.encode())
    (tmp_path / "data" / ".DS_Store").write_bytes(b"junk")
    assert run("evaluate", "--model", "digits", "--data", str(tmp_path / "data"))[0] == 0
    filename, data, _ = state.datasets[-1]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert (filename, zf.namelist()) == ("data.zip", ["3/a.png", "7/a.png"])
    code, _, err = run("evaluate", "--model", "digits", "--data", "sklearn-digits")
    assert code == 2 and "--bundle" in err


def test_evaluate_through_the_smoothcert_command(transport, state, dataset, capsys, tmp_path):
    """The engine's `evaluate` runs on the server for --model NAME (the client's plugin), and
    refuses options that only make sense on one side."""
    from smoothcert.cli import build_parser

    parser = build_parser()
    parser.set_defaults(transport=transport)

    def run(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return args.run(args)

    assert run("evaluate", "--model", "digits", "--data", str(dataset), "--server", BASE_URL, "--limit", "2") == 0
    # The engine's defaults are sent as they are (the server's are the same), seed 0 included.
    assert state.datasets[-1][2] == {"model": "digits", "limit": "2", "every": "1", "seed": "0", "n0": "100",
                                     "n": "100000", "alpha": "0.001", "sampling": "fixed"}
    assert "3 examples: clean accuracy 1.000" in capsys.readouterr().out
    assert run("evaluate", "--model", "digits", "--data", str(dataset), "--server", BASE_URL, "--split", "train") == 2
    assert "--split: only for an evaluation in this process" in capsys.readouterr().err
    assert run("evaluate", "--model", "digits", "--data", str(dataset), "--server", BASE_URL, "--start", "2") == 2
    assert "--start: only for an evaluation in this process" in capsys.readouterr().err
    from smoothcert.bounds import InvalidParameters

    with pytest.raises(InvalidParameters, match="--server: only for an evaluation on a server"):
        run("evaluate", "--bundle", "models/digits", "--data", "sklearn-digits", "--server", BASE_URL,
            "--out", str(tmp_path / "r"))


def test_register_adds_the_commands_to_another_parser(monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="smoothcert")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("certify-local")
    register(commands)
    args = parser.parse_args(["certify", "x.png", "y.png", "--model", "digits", "--sigma", "0.25"])
    assert (args.inputs, args.model, args.sigma, args.server, args.wait) == (["x.png", "y.png"], "digits", 0.25,
                                                                           None, False)
    assert {"certify", "predict", "evaluate", "status", "cancel", "models"} <= set(commands.choices)
    monkeypatch.setenv("SMOOTHCERT_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    args = parser.parse_args(["models"])
    assert args.run(args) == 1  # no transport given: a real connection, refused
    assert capsys.readouterr().err.startswith("smoothcert: cannot reach http://127.0.0.1:9: ")


def test_version(capsys):
    from smoothcert import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"smoothcert {__version__}\n"


# Against the real API and a real worker, in this process


USER = "cli-user"


def test_real_worker_shows_loading_then_ends_full(redis_url, redis_client, capsys, monkeypatch):
    """The worker says when it loads a model (the CLI prints the note), and a succeeded job's
    progress ends full although its writes are throttled."""
    from service.config import Settings
    from service.main import create_app
    from service.store import Store
    from service.up import DEMO_BUNDLE, register_bundle
    from workers.jobs import run_job
    from workers.runtime import LoadedModel, ModelRuntime

    settings = Settings(redis_url=redis_url, api_keys=[USER], device="cpu")
    store = Store(redis_client, prefix=settings.key_prefix, job_ttl_seconds=settings.job_ttl_seconds)
    register_bundle(store, DEMO_BUNDLE)
    runtime = ModelRuntime(store, settings)
    load = LoadedModel.load

    def slow_load(self):  # longer than one long-poll round (2 s): the CLI sees the stage
        time.sleep(3)
        load(self)

    monkeypatch.setattr(LoadedModel, "load", slow_load)
    inner = fake_server.sync_transport(create_app(settings, store))
    workers: list[threading.Thread] = []

    def handle(request: httpx.Request) -> httpx.Response:  # a worker picks up each job submitted
        response = inner.handle_request(request)
        if request.method == "POST" and response.status_code == 202:
            job_id = json.loads(response.content)["id"]
            workers.append(threading.Thread(target=run_job, args=(store, runtime, job_id, settings)))
            workers[-1].start()
        return response

    digit = str(ROOT / "examples" / "digit-7.png")
    argv = ["certify", digit, "--model", "digits", "--n", "2000", "--seed", "1", "--server", BASE_URL,
            "--key", USER, "--wait"]
    try:
        assert main(argv, transport=httpx.MockTransport(handle)) == 0
    finally:
        for worker in workers:
            worker.join(60)
    out, err = capsys.readouterr()
    job_id = store.get_job(re.search(r"job (\w+):", err).group(1)).id
    assert f"job {job_id}: {LOADING_NOTE}" in err.splitlines()
    assert err.splitlines()[-1].endswith("(estimation 2,000/2,000)")
    progress = store.get_job(job_id).progress
    assert (progress.stage, progress.samples_done, progress.samples_total) == ("estimation", 2000, 2000)
    radius = store.get_job(job_id).result["radius"]
    printed = re.fullmatch(r"digit-7\.png: class 7 \(7\), radius (\S+) \(σ 0\.25, n 2000, α 0\.001\), memory off\n",
                           out).group(1)
    assert Decimal(printed) <= Decimal(radius) < Decimal(printed) + Decimal("0.0001")  # rounded down
    assert main(argv, transport=httpx.MockTransport(handle)) == 0  # cached now: no loading stage
    for worker in workers:
        worker.join(60)
    assert LOADING_NOTE not in capsys.readouterr().err


def test_a_selector_result_says_who_chose_sigma():
    from clients.cli import _certificate_line, _prediction_line

    base = {"prediction": 3, "label": "3", "radius": 1.03790801, "sigma": 0.5, "n": 1000, "alpha": 0.001,
            "memory": {"used": False}}
    chosen = base | {"selector": {"sigma_index": 2, "sigmas": [0.12, 0.25, 0.5]}}
    assert _certificate_line(chosen) == (
        "class 3 (3), radius 1.0379 (σ 0.5 chosen by the selector, n 1000, α 0.001), memory off")
    assert _certificate_line(base) == "class 3 (3), radius 1.0379 (σ 0.5, n 1000, α 0.001), memory off"
    none = base | {"prediction": None, "selector": {"sigma_index": None}}
    assert _certificate_line(none) == "abstained (σ 0.5 (σ_e: no level chosen), n 1000, α 0.001), memory off"
    assert _prediction_line(chosen) == (
        "class 3 (3) (σ 0.5 chosen by the selector, n 1000, α 0.001; a prediction: no radius)")
