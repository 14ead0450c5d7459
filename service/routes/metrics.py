"""`GET /metrics`: Prometheus text format (0.0.4), written by hand (no client library).

Counters are the store's (`name:label:label`, written by the API and the workers); gauges
are read when scraped; the job latency is a histogram. Open without a key: scrapers carry
none, and nothing here names a job, a model input or a key.
"""

from __future__ import annotations

import math
import re

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from service.deps import SettingsDep, StoreDep
from service.errors import responses
from service.queue import QUEUE_DEVICE
from service.store import Store

router = APIRouter(tags=["metrics"])

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "smoothcert_"
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The label names of the store's counters, in the order their values follow the name.
LABELS = {"jobs_submitted_total": ("kind",), "jobs_finished_total": ("kind", "status"),
          "samples_total": ("kind",), "engine_seconds_total": ("kind",),
          "abstained_total": ("kind",), "answered_total": ("kind",),
          "memory_commit_retries_total": ("status",)}
HELP = {
    "jobs_submitted_total": "Jobs accepted by the API.",
    "jobs_finished_total": "Jobs that ended, by final status.",
    "samples_total": "Noise samples evaluated by the workers.",
    "engine_seconds_total": "Seconds the workers spent in the engine.",
    "abstained_total": "Answers that abstained.",
    "answered_total": "Answers given (abstentions included).",
    "memory_commit_retries_total": "Memory commits tried again: the log grew (conflict) or was reset (stale).",
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}"


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]

    def sample(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.lines.append(f"{PREFIX}{name}{_labels(labels or {})} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _split(counters: dict[str, float]) -> dict[str, list[tuple[dict[str, str], float]]]:
    """`name:v1:v2` → {name: [({label: v1, ...}, value)]}."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for key, value in sorted(counters.items()):
        name, *values = key.split(":")
        if not _NAME.fullmatch(name):
            continue  # not a metric name Prometheus accepts
        names = LABELS.get(name, ())
        labels = {names[i] if i < len(names) else f"label{i}": v for i, v in enumerate(values)}
        out.setdefault(name, []).append((labels, value))
    return out


def _by_kind(samples: list[tuple[dict[str, str], float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples:
        kind = labels.get("kind", "all")
        totals[kind] = totals.get(kind, 0.0) + value
    return totals


def render(store: Store, live_window: float) -> str:
    data = store.metrics()
    w = _Writer()
    w.family("queue_depth", "gauge", "Tasks waiting in each broker queue.")
    for queue in sorted(QUEUE_DEVICE):  # every device's queues, also those of workers scaled to zero
        w.sample("queue_depth", store.queue_depth(queue), {"queue": queue})
    w.family("open_jobs", "gauge", "Jobs queued or running.")
    w.sample("open_jobs", store.open_jobs())
    w.family("workers_live", "gauge", "Workers with a recent heartbeat.")
    w.sample("workers_live", len(store.live_workers(live_window)))

    counters = _split(data["counters"])
    for name, samples in counters.items():
        w.family(name, "counter", HELP.get(name, f"Counter {name}."))
        for labels, value in samples:
            w.sample(name, value, labels)

    samples, seconds = _by_kind(counters.get("samples_total", [])), _by_kind(counters.get("engine_seconds_total", []))
    w.family("samples_per_second", "gauge", "Samples per engine second since the counters began.")
    for kind in sorted(samples):
        if seconds.get(kind, 0) > 0:
            w.sample("samples_per_second", samples[kind] / seconds[kind], {"kind": kind})
    abstained, answered = _by_kind(counters.get("abstained_total", [])), _by_kind(counters.get("answered_total", []))
    w.family("abstention_ratio", "gauge", "Abstentions per answer since the counters began.")
    for kind in sorted(answered):
        if answered[kind] > 0:
            w.sample("abstention_ratio", abstained.get(kind, 0.0) / answered[kind], {"kind": kind})

    latency = data["latency"]
    w.family("job_latency_seconds", "histogram", "Seconds from submission to the end of a job.")
    cumulative = 0.0
    for bound in (*Store.LATENCY_BUCKETS, math.inf):
        cumulative += latency.get("+Inf" if math.isinf(bound) else str(bound), 0.0)
        w.sample("job_latency_seconds_bucket", cumulative, {"le": _num(bound)})
    w.sample("job_latency_seconds_sum", latency.get("sum", 0.0))
    w.sample("job_latency_seconds_count", cumulative)
    return w.text()


@router.get("/metrics", response_class=PlainTextResponse, name="get_metrics",
            responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text"},
                       **responses(503)})
def metrics(settings: SettingsDep, store: StoreDep) -> PlainTextResponse:
    """Queue depths, open jobs, job counters, latency histogram, throughput, abstentions."""
    text = render(store, 3 * settings.heartbeat_seconds)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)
