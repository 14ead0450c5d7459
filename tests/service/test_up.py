"""`smoothcert up` from nothing: a private Redis, a worker, the API, the demo model, keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients import Client, UnprocessableEntityError
from service.queue import worker_queues
from service.up import api_command, worker_command, worker_device

from ..conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_up_runs_the_stack_and_stops_it_all(tmp_path):
    redis_port, api_port = free_port(), free_port()
    env = dict(os.environ, SMOOTHCERT_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "smoothcert.cli", "up", "--port", str(api_port), "--state-dir", str(tmp_path / "state")],
        env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "is up" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        saved = json.loads((Path(os.environ["XDG_CONFIG_HOME"]) / "smoothcert" / "credentials.json").read_text())
        assert saved["url"] == f"http://127.0.0.1:{api_port}" and saved["api_key"] and saved["admin_key"]
        with Client() as client:  # picks up the URL and key that `up` left
            status = client.certify(ROOT / "examples" / "digit-4.png", model="digits", n=1000).wait(timeout=60)
            assert status.status == "succeeded" and status.result.prediction == 4
            if worker_device() == "cpu":  # `up` declares its one worker's device to the API
                with pytest.raises(UnprocessableEntityError, match="SMOOTHCERT_QUEUE_DEVICES"):
                    client.certify(ROOT / "examples" / "digit-4.png", model="digits", n=1000, numeric_mode="fp16")
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(30)
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", f"{redis_port}|--port {api_port}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"


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
