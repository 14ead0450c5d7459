"""/v2/health/live, /v2/health/ready and the Prometheus text at /metrics."""

from __future__ import annotations

import re

from tests.service.conftest import image

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.e+-]+|[+-]Inf|NaN)$')


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value}, checking the 0.0.4 text format line by line."""
    assert text.endswith("\n")
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            match = SAMPLE.match(line)
            assert match, line
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
            family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
            assert match.group(1) in types or family in types, line
    return samples


def test_live_and_ready(client, store):
    assert client.get("/v2/health/live").json() == {"status": "live", "live": True, "ready": None, "redis": None,
                                                     "workers": None}
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and "heartbeat" in r.json()["error"]["message"]
    store.heartbeat("worker-1")
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready", "live": None, "ready": True, "redis": True,
                                                 "workers": 1}


def test_metrics(client, store):
    body = {"model": "digits", "input": {"tensor": image().tolist()}, "n": 1000}
    ids = [client.post("/v1/certifications", json=body).json()["id"] for _ in range(3)]
    store.start_job(ids[0])
    store.finish_job(ids[0], "succeeded", result={})
    client.delete(f"/v1/certifications/{ids[1]}")
    store.count("samples_total:certification", 5000)
    store.count("engine_seconds_total:certification", 2.0)
    store.count("answered_total:certification", 4)
    store.count("abstained_total:certification", 1)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(r.text)
    assert m['smoothcert_queue_depth{queue="certifications"}'] == 3
    assert m['smoothcert_queue_depth{queue="predictions"}'] == 0
    assert m["smoothcert_open_jobs"] == 1
    assert m['smoothcert_jobs_submitted_total{kind="certification"}'] == 3
    assert m['smoothcert_jobs_finished_total{kind="certification",status="succeeded"}'] == 1
    assert m['smoothcert_jobs_finished_total{kind="certification",status="cancelled"}'] == 1
    assert m['smoothcert_samples_per_second{kind="certification"}'] == 2500
    assert m['smoothcert_abstention_ratio{kind="certification"}'] == 0.25
    assert m['smoothcert_job_latency_seconds_bucket{le="+Inf"}'] == m["smoothcert_job_latency_seconds_count"] == 2
    buckets = [v for k, v in m.items() if k.startswith("smoothcert_job_latency_seconds_bucket")]
    assert buckets == sorted(buckets) and m["smoothcert_job_latency_seconds_sum"] >= 0
