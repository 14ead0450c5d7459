"""`smoothcert up` from nothing: a private Redis, a worker, the API, the demo model, keys; one
`up` per state folder and port; a clean stop on SIGTERM and Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clients import Client, UnprocessableEntityError
from service.queue import worker_queues
from service.up import api_command, worker_command, worker_device

from ..conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def start_up(tmp_path: Path, port: int, state: Path, env: dict, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smoothcert.cli", "up", "--port", str(port), "--state-dir", str(state)],
        env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, log


def wait_for(text: str, log: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)


def assert_stopped_cleanly(proc: subprocess.Popen, log: Path, signame: str, *ports: int) -> None:
    output = log.read_text()
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.splitlines()[-1] == f"smoothcert up: stopped on {signame} (API, worker, Redis)", output
    time.sleep(1)
    pattern = "|".join(f"{p}" for p in ports)
    leftovers = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"


def test_up_runs_the_stack_refuses_a_second_up_and_stops_on_sigterm(tmp_path):
    redis_port, api_port = free_port(), free_port()
    env = dict(os.environ, SMOOTHCERT_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    state = tmp_path / "state"
    proc, log = start_up(tmp_path, api_port, state, env, "up")
    credentials = Path(os.environ["XDG_CONFIG_HOME"]) / "smoothcert" / "credentials.json"
    try:
        wait_for("is up", log, proc)
        saved = json.loads(credentials.read_text())
        assert saved["url"] == f"http://127.0.0.1:{api_port}" and saved["api_key"] and saved["admin_key"]
        assert credentials.stat().st_mode & 0o777 == 0o600
        assert (state / "up.lock").read_text().strip() == str(proc.pid)

        def second_up(port: int, folder: Path) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "smoothcert.cli", "up", "--port", str(port),
                                   "--state-dir", str(folder)], env=env, cwd=ROOT, capture_output=True,
                                  text=True, timeout=60)

        # The same state folder (another port): refused, naming the pid that holds it.
        again = second_up(free_port(), state)
        assert again.returncode == 1 and f"(pid {proc.pid}) is running on the state folder {state}" in again.stderr
        # The same port (another folder): refused, naming the port.
        again = second_up(api_port, tmp_path / "other")
        assert again.returncode == 1 and f"something already answers on 127.0.0.1:{api_port}" in again.stderr
        assert "Traceback" not in again.stderr and "stopped" not in again.stderr
        assert json.loads(credentials.read_text()) == saved  # the running stack's keys still stand
        with Client() as client:  # picks up the URL and key that the first `up` left
            status = client.certify(ROOT / "examples" / "digit-4.png", model="digits", n=1000).wait(timeout=60)
            assert status.status == "succeeded" and status.result.prediction == 4
            # MNIST's σ selector, registered beside it: σ chosen per input, no memory
            status = client.certify(ROOT / "examples" / "mnist-3.png", model="mnist-selector", n=1000).wait(timeout=60)
            assert status.status == "succeeded" and status.result.prediction == 3, status.raw
            assert status.result.selector["sigma_index"] in (0, 1, 2)
            assert status.raw["result"]["guarantee"]["scope"] == "selector"
            if worker_device() == "cpu":  # `up` declares its one worker's device to the API
                with pytest.raises(UnprocessableEntityError, match="SMOOTHCERT_QUEUE_DEVICES"):
                    client.certify(ROOT / "examples" / "digit-4.png", model="digits", n=1000, numeric_mode="fp16")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert_stopped_cleanly(proc, log, "SIGTERM", redis_port, f"--port {api_port}")


def test_ctrl_c_while_starting_stops_everything_cleanly(tmp_path):
    redis_port, api_port = free_port(), free_port()
    env = dict(os.environ, SMOOTHCERT_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    proc, log = start_up(tmp_path, api_port, tmp_path / "state", env, "up")
    try:
        wait_for("starting at", log, proc)  # Redis, the worker and the API started, not ready yet
    finally:
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends (the children have sessions of their own)
        proc.wait(60)
    assert_stopped_cleanly(proc, log, "SIGINT", redis_port, f"--port {api_port}")
    assert not (Path(os.environ["XDG_CONFIG_HOME"]) / "smoothcert" / "credentials.json").exists()


def test_the_state_lock_names_its_holder_and_dies_with_it(tmp_path):
    from service.up import _hold_state, _Refused

    fd = _hold_state(tmp_path)
    with pytest.raises(_Refused, match=f"pid {os.getpid()}"):
        _hold_state(tmp_path)
    os.close(fd)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from service.up import _hold_state; _hold_state(Path(sys.argv[1])); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(_Refused, match=f"pid {holder.pid}"):
        _hold_state(tmp_path)
    holder.kill()  # SIGKILL: no clean-up at all, and still no stale lock
    holder.wait(10)
    os.close(_hold_state(tmp_path))


def test_credentials_are_never_written_over_a_running_stacks(tmp_path):
    import http.server

    from service.up import save_credentials

    class Live(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v2/health/live" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Live)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{server.server_address[1]}"
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "smoothcert" / "credentials.json"
    try:
        assert save_credentials(other, {"api_key": "theirs"}) == path
        assert save_credentials("http://127.0.0.1:1", {"api_key": "mine"}) is None  # they answer: kept
        assert json.loads(path.read_text()) == {"url": other, "api_key": "theirs"}
    finally:
        server.shutdown()
        server.server_close()
    assert save_credentials("http://127.0.0.1:1", {"api_key": "mine"}) == path  # they are gone: replaced
    assert json.loads(path.read_text()) == {"url": "http://127.0.0.1:1", "api_key": "mine"}
    assert path.stat().st_mode & 0o777 == 0o600


def test_up_describes_itself():
    out = subprocess.run([sys.executable, "-m", "smoothcert.cli", "up", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "refuses to start when the API port already answers" in " ".join(out.split())
    assert re.search(r"--port PORT\s+the API's port", out) and re.search(r"--host HOST\s+interface", out)


def test_register_model_provisions_the_registry(redis_url, redis_client):
    env = dict(os.environ, SMOOTHCERT_REDIS_URL=redis_url)
    out = subprocess.run([sys.executable, "-m", "smoothcert.cli", "register-model", "models/digits"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("registered digits (sha256:")
    assert redis_client.sismember("sc:models", "digits")


def test_api_command_runs_the_configured_number_of_processes(monkeypatch):
    def workers(command: list[str]) -> str:
        return command[command.index("--workers") + 1]

    monkeypatch.setenv("SMOOTHCERT_API_WORKERS", "3")
    assert workers(api_command("127.0.0.1", 8000)) == "3"
    assert workers(api_command("127.0.0.1", 8000, 5)) == "5"


def test_worker_command_consumes_its_devices_queues_only():
    for device in ("cpu", "cuda"):
        command = worker_command("w@%h", device)
        assert command[command.index("-Q") + 1] == worker_queues(device)
    assert worker_command("w@%h") == worker_command("w@%h", "cpu")  # as the reliability stacks call it


def test_up_runs_its_worker_on_the_configured_device_type(monkeypatch):
    for configured, device in (("cuda:1", "cuda"), ("cpu", "cpu"), ("CUDA", "cuda")):
        monkeypatch.setenv("SMOOTHCERT_DEVICE", configured)
        assert worker_device() == device


def test_up_never_keeps_the_memory_on_a_redis_that_would_lose_commits(tmp_path, capsys):
    """A distribution's Redis answering at the default URL (appendfsync everysec here) is
    passed over for a private, durable one; a Redis named explicitly is kept, with a warning."""
    from service.durability import durability_problems
    from service.store import Store
    from service.up import choose_redis
    from tests.redis_server import RedisServer

    (tmp_path / "lax").mkdir()
    lax = RedisServer(tmp_path / "lax", "--appendfsync", "everysec")
    lax.start()
    procs: list = []
    try:
        assert durability_problems(Store.from_url(lax.url).r)
        chosen = choose_redis(lax.url, False, tmp_path / "state", procs)
        assert chosen != lax.url and len(procs) == 1
        assert durability_problems(Store.from_url(chosen).r) == []
        assert "would not keep memory commits" in capsys.readouterr().out
        assert choose_redis(lax.url, True, tmp_path / "state", procs) == lax.url and len(procs) == 1
        assert "appendfsync is 'everysec'" in capsys.readouterr().err
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        lax.stop()
