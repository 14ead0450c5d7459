"""Queues by device (service/queue.py): a job goes to the queue of the first declared device
type that can run its numeric mode, a request no declared queue can run is refused at submit
(and nothing is stored or queued), and a worker refuses to consume queues its device cannot
run."""

from __future__ import annotations

import os
import subprocess
import sys
from itertools import combinations

import pytest
from fastapi.testclient import TestClient

from service import queue
from service.config import Settings
from service.main import create_app
from smoothcert.bounds import InvalidParameters
from smoothcert.modes import DTYPES, FLAGS, parse_mode
from tests.service.conftest import PREFIX, ROOT, make_settings, nothing_stored, npy_b64, register
from tests.service.test_certifications import X, broker_messages

CPU_QUEUES = ["certifications", "predictions", "evaluations"]
CUDA_QUEUES = ["certifications-cuda", "predictions-cuda", "evaluations-cuda"]
MODES = ["+".join((d, *f)) for d in DTYPES for r in range(len(FLAGS) + 1) for f in combinations(FLAGS, r)
         if not {"compile", "cuda_graphs"} <= set(f)]


def test_each_device_has_its_own_queues():
    assert queue.device_queues("cpu") == CPU_QUEUES  # the names queues had before devices
    assert queue.device_queues("cuda") == CUDA_QUEUES
    assert queue.worker_queues("cuda") == ",".join(CUDA_QUEUES)
    assert queue.ALL_QUEUES == ",".join(CPU_QUEUES)  # noqa: SIM300 (what workers consumed before devices)
    assert dict.fromkeys(CPU_QUEUES, "cpu") | dict.fromkeys(CUDA_QUEUES, "cuda") == queue.QUEUE_DEVICE
    assert set(queue.QUEUES.values()) == set(CPU_QUEUES)  # a task's default queue: its CPU one
    with pytest.raises(ValueError, match="no queues for device type 'tpu'"):
        queue.queue_name("certification", "tpu")


@pytest.mark.parametrize(("mode", "devices", "expected"), [
    (None, ["cpu"], "certifications"),
    ("bf16+channels_last", ["cpu"], "certifications"),
    ("fp32", ["cpu", "cuda"], "certifications"),
    ("fp16", ["cpu", "cuda"], "certifications-cuda"),
    ("fp32+cuda_graphs", ["cpu", "cuda"], "certifications-cuda"),
    ("fp32", ["cuda", "cpu"], "certifications-cuda"),  # the order is the preference
    ("fp32", ["cuda"], "certifications-cuda"),
])
def test_route_takes_the_first_declared_device_that_runs_the_mode(mode, devices, expected):
    assert queue.route("certification", mode, devices) == expected


@pytest.mark.parametrize("mode", ["fp16", "fp32+cuda_graphs", "fp16+fuse+channels_last"])
def test_a_mode_no_declared_device_runs_is_refused_naming_the_setting(mode):
    with pytest.raises(queue.NoQueue, match="needs a CUDA device .*SMOOTHCERT_QUEUE_DEVICES"):
        queue.route("prediction", mode, ["cpu"])


@pytest.mark.parametrize("devices", [["cpu"], ["cuda"], ["cpu", "cuda"], ["cuda", "cpu"]])
def test_routing_agrees_with_the_workers_own_device_check(devices):
    """For every kind and mode: a job is queued only where `NumericMode.check_device` (what the
    worker checks before running it) passes, and refused only when it passes nowhere declared."""
    def runs(mode: str, device: str) -> bool:
        try:
            parse_mode(mode).check_device(device)
        except InvalidParameters:
            return False
        return True

    for kind in queue.TASK_OF_KIND:
        for mode in MODES:
            try:
                target = queue.route(kind, mode, devices)
            except queue.NoQueue:
                assert not any(runs(mode, d) for d in devices), (kind, mode)
                continue
            assert queue.QUEUE_KIND[target] == kind and runs(mode, queue.QUEUE_DEVICE[target]), (kind, mode)
            assert queue.QUEUE_DEVICE[target] == next(d for d in devices if runs(mode, d))


def test_the_setting_is_checked_at_start(monkeypatch):
    assert Settings().queue_devices == ["cpu"]
    monkeypatch.setenv("SMOOTHCERT_QUEUE_DEVICES", " CPU, cuda ")
    assert Settings().queue_devices == ["cpu", "cuda"]
    for bad in ("tpu", "", "cpu,cpu", "cpu;cuda"):
        monkeypatch.setenv("SMOOTHCERT_QUEUE_DEVICES", bad)
        with pytest.raises(ValueError, match="SMOOTHCERT_QUEUE_DEVICES must name device types"):
            Settings()


def test_enqueue_sends_to_the_queue_given_or_the_kinds_cpu_queue(redis_url, redis_client):
    queue.enqueue(redis_url, 60, "certification", "a" * 32)
    queue.enqueue(redis_url, 60, "certification", "b" * 32, "certifications-cuda")
    assert broker_messages(redis_client) == [("smoothcert.certify", ["a" * 32])]
    assert broker_messages(redis_client, "certifications-cuda") == [("smoothcert.certify", ["b" * 32])]
    with pytest.raises(ValueError, match="not a queue of prediction jobs"):
        queue.enqueue(redis_url, 60, "prediction", "c" * 32, "certifications-cuda")


def submit(client: TestClient, path: str, mode: str):
    return client.post(path, json={"model": "digits", "input": {"npy_b64": npy_b64(X)}, "numeric_mode": mode})


@pytest.mark.parametrize("path", ["/v1/certifications", "/v1/predictions"])
def test_a_cuda_only_request_is_refused_at_submit_where_only_cpu_workers_are_declared(client, store, redis_client,
                                                                                       path):
    r = submit(client, path, "fp16+channels_last")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "numeric_mode_unavailable" and "SMOOTHCERT_QUEUE_DEVICES" in error["message"]
    assert nothing_stored(store, redis_client) and not any(redis_client.llen(q) for q in CUDA_QUEUES)
    assert submit(client, path, "bf16").status_code == 202  # a CPU runs it


def test_oip_infer_is_refused_the_same_way(client, store, redis_client):
    tensor = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}
    r = client.post("/v2/models/digits/infer", json={"inputs": [tensor], "parameters": {"numeric_mode": "fp16"}})
    assert 400 <= r.status_code < 500 and "SMOOTHCERT_QUEUE_DEVICES" in r.text, r.text
    assert nothing_stored(store, redis_client)


@pytest.mark.parametrize(("devices", "mode", "expected"), [
    (["cpu", "cuda"], "fp16", "certifications-cuda"),
    (["cpu", "cuda"], "fp32", "certifications"),
    (["cuda"], "fp32", "certifications-cuda"),
])
def test_a_job_is_queued_and_recorded_on_its_devices_queue(redis_url, store, redis_client, devices, mode, expected):
    register(store)
    with TestClient(create_app(make_settings(redis_url, queue_devices=devices), store)) as client:
        r = submit(client, "/v1/certifications", mode)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert broker_messages(redis_client, expected) == [("smoothcert.certify", [job_id])]
    assert sum(redis_client.llen(q) for q in queue.QUEUE_DEVICE) == 1  # nowhere else
    assert store.get_job(job_id).queue == expected  # for the recovery pass


def test_an_idempotent_replay_queues_where_the_first_attempt_chose(redis_url, store, redis_client):
    """A job stored by an API that died before queueing it is queued by the replay of its
    Idempotency-Key on the queue stored with it, whatever this API's setting is now."""
    register(store)
    body = {"model": "digits", "input": {"npy_b64": npy_b64(X)}, "numeric_mode": "fp32", "seed": 1}
    with TestClient(create_app(make_settings(redis_url, queue_devices=["cuda"]), store)) as client:
        job_id = client.post("/v1/certifications", json=body, headers={"Idempotency-Key": "k"}).json()["id"]
    redis_client.delete("certifications-cuda")  # as if the API had died between storing and queueing
    redis_client.hdel(f"{PREFIX}:job:{job_id}", "enqueued")
    with TestClient(create_app(make_settings(redis_url, queue_devices=["cpu", "cuda"]), store)) as client:
        r = client.post("/v1/certifications", json=body, headers={"Idempotency-Key": "k"})
    assert r.status_code == 202 and r.json()["id"] == job_id, r.text
    assert broker_messages(redis_client, "certifications-cuda") == [("smoothcert.certify", [job_id])]
    assert broker_messages(redis_client) == []  # where fp32 would go now


def celery_worker(device: str | None, queues: str, redis_url: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SMOOTHCERT_DEVICE"} | {"SMOOTHCERT_REDIS_URL": redis_url}
    if device is not None:
        env["SMOOTHCERT_DEVICE"] = device
    return subprocess.run([sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queues,
                           "--pool=solo", "-n", "refuse@%h"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.timeout(240)
def test_a_worker_that_cannot_run_cuda_refuses_the_cuda_queues(redis_url):
    out = celery_worker("cpu", "certifications,certifications-cuda", redis_url)
    assert out.returncode != 0
    assert "refusing to consume certifications-cuda" in out.stderr and "SMOOTHCERT_DEVICE=cpu" in out.stderr
    if queue.cuda_visible():
        pytest.skip("this machine has a CUDA device: the case without one cannot be run here")
    out = celery_worker(None, queue.worker_queues("cuda"), redis_url)
    assert out.returncode != 0 and "no CUDA device is visible" in out.stderr
