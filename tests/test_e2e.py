"""End to end against real processes: redis-server, a Celery worker, uvicorn; the SDK and CLI.

The demo model is registered as `smoothcert up` registers it, and the answers are checked
against what the engine gives for the same request in this process.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from clients import Client, NotFoundError, PermissionDeniedError
from service.queue import ALL_QUEUES
from service.store import Store
from service.up import DEMO_BUNDLE, register_bundle

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
ADMIN, USER, OTHER = "admin-key-e2e", "user-key-e2e", "other-key-e2e"


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _env(redis_url: str) -> dict:
    return dict(os.environ, SMOOTHCERT_REDIS_URL=redis_url, SMOOTHCERT_ADMIN_KEYS=ADMIN,
                SMOOTHCERT_API_KEYS=f"{USER},{OTHER}", SMOOTHCERT_HEARTBEAT_SECONDS="1", SMOOTHCERT_DEVICE="cpu")


def _worker(name: str, env: dict, log: Path) -> subprocess.Popen:
    return _spawn([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--loglevel=INFO",
                   "-Q", ALL_QUEUES, "--concurrency=1", "-n", f"{name}@%h"], env, log)


@pytest.fixture(scope="module")
def stack(redis_url, tmp_path_factory):
    """uvicorn + one Celery worker on the test Redis, the demo model registered."""
    logs = tmp_path_factory.mktemp("e2e-logs")
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    register_bundle(Store.from_url(redis_url), DEMO_BUNDLE)
    env = _env(redis_url)
    port = free_port()
    procs = [
        _worker("e2e", env, logs / "worker.log"),
        _spawn([sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", str(port)],
               env, logs / "api.log"),
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert all(p.poll() is None for p in procs), _logs(logs)
            time.sleep(0.5)
        else:
            pytest.fail("the stack did not become ready\n" + _logs(logs))
        yield url
    finally:
        for p in procs:
            _stop(p)


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in folder.glob("*.log"))


def test_certify_an_example_digit(stack):
    with Client(stack, api_key=USER) as client:
        job = client.certify(ROOT / "examples" / "digit-7.png", model="digits", sigma=0.25, n=2000, seed=3)
        status = job.wait(timeout=120)
    assert status.status == "succeeded", status.raw
    result = status.result
    assert result.prediction == 7 and result.label == "7" and not result.abstained
    assert 0 < result.radius < 0.25 * 4 and result.bound == "cohen" and result.n == 2000
    assert result.model.name == "digits" and result.model.digest.startswith("sha256:")


def test_sigma_search_with_memory_answers_a_repeat_from_memory(stack):
    with Client(stack, api_key=USER) as client:
        first = client.certify(ROOT / "examples" / "digit-3.png", model="digits",
                               sigma_search={"method": "ddrs", "steps": 10}, n=2000).wait(timeout=120)
        again = client.certify(ROOT / "examples" / "digit-3.png", model="digits",
                               sigma_search="ddrs", n=2000).wait(timeout=120)
        memory = client.model_memory("digits")
    assert first.status == again.status == "succeeded"
    assert first.result.memory.used and first.result.memory.outcome in ("new", "shrunk")
    assert again.result.memory.outcome == "inside" and again.result.prediction == first.result.prediction
    # The answer names the certificate it rests on, and reports that certificate's sampling.
    assert again.result.memory.root_job == first.id and again.result.sigma == first.result.sigma
    assert again.result.guarantee["scope"] == "memory" and first.result.seed_source == "server"
    assert memory.entries >= 1


def test_predict_and_cancel(stack):
    with Client(stack, api_key=USER) as client:
        p = client.predict(ROOT / "examples" / "digit-0.png", model="digits", n=500).wait(timeout=120)
        assert p.status == "succeeded" and p.result.prediction == 0
        slow = client.certify(ROOT / "examples" / "digit-1.png", model="digits", n=1_000_000, batch_size=100)
        deadline = time.monotonic() + 60
        while slow.status().status == "queued" and time.monotonic() < deadline:
            time.sleep(0.2)
        slow.cancel()
        final = slow.wait(timeout=60)
    assert final.status == "cancelled"


def test_keys_scope_jobs_and_uploads(stack):
    with Client(stack, api_key=USER) as user, Client(stack, api_key=OTHER) as other:
        job = user.certify(ROOT / "examples" / "digit-5.png", model="digits", n=200, alpha=0.01)
        with pytest.raises(NotFoundError):
            other.job(job.id).status()
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            for f in DEMO_BUNDLE.iterdir():
                zf.write(f, f.name)
        with pytest.raises(PermissionDeniedError):
            user.upload_model(buffer.getvalue())
    with Client(stack, api_key=ADMIN) as admin:
        admin.upload_model(buffer.getvalue())
        assert "digits" in [m.name for m in admin.models()]


def test_health_and_metrics(stack):
    assert httpx.get(f"{stack}/v2/health/live").status_code == 200
    assert httpx.get(f"{stack}/v2/health/ready").status_code == 200
    text = httpx.get(f"{stack}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert "smoothcert_jobs" in text


def test_cli_certify_wait(stack):
    """Several inputs, submitted together: one readable line each (radius rounded down), the
    progress on stderr ending full; --json gives the certificate as the server sent it."""
    env = dict(os.environ, SMOOTHCERT_URL=stack, SMOOTHCERT_API_KEY=USER)
    digits = [str(ROOT / "examples" / f"digit-{d}.png") for d in (9, 4)]
    command = [sys.executable, "-m", "smoothcert.cli", "certify", "--model", "digits", "--n", "1000", "--wait"]
    out = subprocess.run(command + digits, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(", radius")[0] for line in lines] == ["digit-9.png: class 9 (9)", "digit-4.png: class 4 (4)"]
    assert all(re.search(r"radius \d\.\d{4} \(σ 0\.25, n 1000, α 0\.001\), memory off$", line) for line in lines)
    assert out.stderr.count("(estimation 1,000/1,000)") == 2, out.stderr
    out = subprocess.run(command + digits[:1] + ["--json"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["prediction"] == 9, out.stderr


def test_sdk_page_examples_run(stack, monkeypatch, capsys):
    from .test_readme import python_block, replaced

    page = ROOT / "docs" / "sdk.md"
    monkeypatch.setenv("SMOOTHCERT_URL", stack)
    monkeypatch.setenv("SMOOTHCERT_API_KEY", USER)
    monkeypatch.chdir(ROOT)
    code = replaced(python_block("## Certify", page), ('sigma_search="ddrs")', 'sigma_search="ddrs", n=2000)'))
    exec(compile(code, "sdk.md", "exec"), {})  # noqa: S102 - our own docs
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "7" and float(last[1]) > 0 and last[2] in ("new", "inside", "shrunk")
    code = replaced(python_block("## Async", page), ("n=10_000", "n=1000"))
    exec(compile(code, "sdk.md", "exec"), {})  # noqa: S102
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) > 0


def test_evaluation_job_over_http(stack):
    import numpy as np

    from smoothcert.data import load_data

    data = load_data("sklearn-digits", "test")
    buffer = io.BytesIO()
    np.savez(buffer, x=data.x[:4], y=data.y[:4])
    headers = {"Authorization": f"Bearer {USER}"}
    r = httpx.post(f"{stack}/v1/evaluations", headers=headers,
                   data={"model": "digits", "n": "500", "alpha": "0.01", "seed": "1"},
                   files={"dataset": ("test.npz", buffer.getvalue())})
    assert r.status_code == 202, r.text
    url = f"{stack}{r.headers['location']}"
    deadline = time.monotonic() + 120
    while (job := httpx.get(f"{url}?wait=10", headers=headers, timeout=30).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
    assert job["status"] == "succeeded", job
    assert job["result"]["count"] == 4 and job["result"]["clean_accuracy"] >= 0.75
    curve = httpx.get(f"{url}/curve.png", headers=headers)
    assert curve.status_code == 200 and curve.content.startswith(b"\x89PNG")


def test_a_selector_answers_the_same_in_any_order_on_two_workers(stack, redis_url, tmp_path):
    """The MNIST σ selector certifies the same six images, with the same seeds, in two orders
    submitted at once to two Celery worker processes; every pair of certificates is identical
    (no memory: an answer cannot depend on what was certified before it, or where)."""
    register_bundle(Store.from_url(redis_url), ROOT / "models" / "mnist-selector")
    second = _worker("e2e-second", _env(redis_url), tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 90
        while b" ready." not in (tmp_path / "second.log").read_bytes():
            assert time.monotonic() < deadline and second.poll() is None, (tmp_path / "second.log").read_text()
            time.sleep(0.5)
        digits = (0, 3, 4, 6, 8, 9)
        with Client(stack, api_key=USER) as client:
            submit = lambda d: client.certify(ROOT / "examples" / f"mnist-{d}.png",  # noqa: E731
                                              model="mnist-selector", n=1000, seed=40 + d)
            jobs = [(d, submit(d)) for pair in zip(digits, reversed(digits), strict=True) for d in pair]
            done = [(d, job.wait(timeout=180)) for d, job in jobs]
    finally:
        _stop(second)
    answers: dict[int, list[dict]] = {}
    for d, status in done:
        assert status.status == "succeeded", status.raw
        result = dict(status.raw["result"])
        result.pop("seconds", None)
        result["selector"] = dict(result["selector"], estimator={
            k: v for k, v in result["selector"]["estimator"].items() if k != "seconds"})
        answers.setdefault(d, []).append(result)
    for d in digits:
        first, again = answers[d]
        assert first == again, d
        assert first["prediction"] == d and first["guarantee"]["scope"] == "selector"
    ran = (tmp_path / "second.log").read_text().count("succeeded in")
    assert 0 < ran < 2 * len(digits), f"the second worker ran {ran} of {2 * len(digits)} jobs"
