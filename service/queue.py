"""Task names and queues: the API enqueues by name, the workers register these names.

Each device type has its own queues, and a queue is consumed only by workers on its device
type, so the queue a job is sent to declares what it needs: the CPU queues keep the names
`certifications`, `predictions`, `evaluations`; the CUDA queues add `-cuda`. `route` picks
a job's queue at submit from its numeric mode and SMOOTHCERT_QUEUE_DEVICES (the device types
a deployment declares workers for, in order of preference), with the engine's own device
check (`smoothcert.modes`), so a job is never sent where no worker may run it. The Celery
Redis transport keeps one Redis list per queue (what KEDA's Redis list scaler reads).

Only celery is imported here, and the engine's torch-free `modes` when routing (it brings
SciPy, 0.6 s a process: the workers' `celery inspect ping` probes and Flower never route).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from functools import cached_property, lru_cache

from celery import Celery
from kombu.transport import redis as kombu_redis

CERTIFY_TASK = "smoothcert.certify"
PREDICT_TASK = "smoothcert.predict"
EVALUATE_TASK = "smoothcert.evaluate"
TASK_OF_KIND = {"certification": CERTIFY_TASK, "prediction": PREDICT_TASK, "evaluation": EVALUATE_TASK}
# Device types with queues of their own. A CUDA worker runs every numeric mode; a CPU worker
# every mode without a CUDA-only part (smoothcert.modes.CUDA_ONLY).
DEVICES = ("cpu", "cuda")
_PLURAL = {"certification": "certifications", "prediction": "predictions", "evaluation": "evaluations"}
SETTING = "SMOOTHCERT_QUEUE_DEVICES"


def queue_name(kind: str, device: str) -> str:
    """The queue of `kind` jobs for workers on `device`; the CPU's keep the historical names."""
    if device not in DEVICES:
        raise ValueError(f"no queues for device type {device!r}; device types are {', '.join(DEVICES)}")
    return _PLURAL[kind] if device == "cpu" else f"{_PLURAL[kind]}-{device}"


def device_queues(device: str) -> list[str]:
    """The queues a worker on `device` consumes, one per job kind."""
    return [queue_name(kind, device) for kind in TASK_OF_KIND]


# Every queue → the device type of the workers that consume it.
QUEUE_DEVICE = {q: device for device in DEVICES for q in device_queues(device)}
# Every queue → the kind of job it carries.
QUEUE_KIND = {queue_name(kind, device): kind for device in DEVICES for kind in TASK_OF_KIND}
# Each task's CPU queue: where `enqueue` sends a job given no queue (as before queues had
# devices), and the task's default queue in the workers' Celery app.
QUEUES = {task: queue_name(kind, "cpu") for kind, task in TASK_OF_KIND.items()}
# `-Q` of a CPU worker (`worker_queues("cpu")`), the historical name.
ALL_QUEUES = ",".join(device_queues("cpu"))


def worker_queues(device: str) -> str:
    """`celery worker -Q` for a worker on `device`: its device's queues and no other."""
    return ",".join(device_queues(device))


def device_type(device: str) -> str:
    """The type of a torch device name: "cuda:1" → "cuda"."""
    return device.split(":", 1)[0].strip().lower()


def check_devices(value: str | Iterable[str]) -> list[str]:
    """SMOOTHCERT_QUEUE_DEVICES as a list (from "cpu,cuda" or a list): known device types,
    at least one, none twice; ValueError naming the setting otherwise."""
    devices = [d.strip().lower() for d in (value.split(",") if isinstance(value, str) else value)]
    devices = [d for d in devices if d]
    unknown = [d for d in devices if d not in DEVICES]
    if unknown or not devices or len(set(devices)) != len(devices):
        raise ValueError(f"{SETTING} must name device types from {', '.join(DEVICES)}, each at most "
                         f"once, in order of preference (e.g. 'cpu' or 'cpu,cuda'); got {value!r}")
    return devices


class NoQueue(ValueError):
    """No queue this deployment declares can run the job; the message names the setting."""


def can_run(device: str, numeric_mode: str | None) -> bool:
    """Whether workers on `device` run jobs in `numeric_mode`: the check the worker itself
    makes before running one (`NumericMode.check_device`)."""
    from smoothcert.bounds import InvalidParameters
    from smoothcert.modes import parse_mode

    try:
        parse_mode(numeric_mode).check_device(device)
    except InvalidParameters:
        return False
    return True


def route(kind: str, numeric_mode: str | None, devices: Sequence[str]) -> str:
    """The queue of a `kind` job in `numeric_mode`: that of the first device type in `devices`
    (SMOOTHCERT_QUEUE_DEVICES, in order of preference) whose workers can run the mode.
    NoQueue when none can: the request is refused at submit, never failed by a worker.
    Depends on configuration only, not on which workers are up (they may be scaled to zero)."""
    return _route(kind, numeric_mode, tuple(devices))


@lru_cache(maxsize=1024)  # every submission routes (~10 µs uncached); modes come canonical and few
def _route(kind: str, numeric_mode: str | None, devices: tuple[str, ...]) -> str:
    from smoothcert.modes import parse_mode

    for device in devices:
        if can_run(device, numeric_mode):
            return queue_name(kind, device)
    mode = parse_mode(numeric_mode)
    raise NoQueue(f"numeric mode {mode.name!r} needs a CUDA device ({', '.join(mode.needs_cuda())}), and this "
                  f"deployment declares workers for {', '.join(devices)} only ({SETTING}); use a mode "
                  f"without {', '.join(mode.needs_cuda())}, or run CUDA workers and add 'cuda' to {SETTING}")


def cuda_visible() -> bool:
    """Whether torch sees a CUDA device, asked in a child process: the API and `up` never import
    torch, and a worker asking in its main process would initialise CUDA there, which a prefork
    pool's children could then not use."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def queues_beyond(device: str, queues: Iterable[str]) -> list[str]:
    """The queues among `queues` whose jobs a worker on `device` (a device type) cannot all
    run: another device type's, unless the worker is CUDA (which runs every mode). A CUDA
    worker on a CPU queue is allowed: its jobs then run, and are certified, on the GPU."""
    return [q for q in queues if q in QUEUE_DEVICE and QUEUE_DEVICE[q] != device and device != "cuda"]


def broker_options(visibility_timeout: int) -> dict:
    """Redis transport options shared by the producer (API) and the consumers (workers)."""
    return {"visibility_timeout": visibility_timeout}


class _PublishingChannel(kombu_redis.Channel):
    """kombu's Redis channel, keeping one client: kombu builds a new `redis.Redis` (with its
    ~170 response callbacks) for every message it publishes, most of what a publish costs.
    The client is thread-safe and draws on the channel's own connection pool, as before."""

    @cached_property
    def _publishing_client(self):
        return self._create_client()

    @contextmanager
    def conn_or_acquire(self, client=None):
        yield client or self._publishing_client


class PublishingTransport(kombu_redis.Transport):
    """kombu's Redis transport with `_PublishingChannel`: for the API, which only publishes."""

    Channel = _PublishingChannel


@lru_cache
def producer(broker_url: str, visibility_timeout: int) -> Celery:
    app = Celery("smoothcert-api", broker=broker_url)
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        app.conf.broker_transport = PublishingTransport
    app.conf.broker_transport_options = broker_options(visibility_timeout)
    app.conf.task_ignore_result = True
    return app


@lru_cache
def _publish_options(broker_url: str, visibility_timeout: int) -> dict:
    """`producer`'s publishing settings, read once: every read of a Celery setting costs
    about 4 µs, and these never change once the app is made."""
    conf = producer(broker_url, visibility_timeout).conf
    return {"delivery_mode": conf.task_default_delivery_mode, "retry": True,
            "retry_policy": conf.task_publish_retry_policy}


def enqueue(broker_url: str, visibility_timeout: int, kind: str, job_id: str, queue: str | None = None) -> None:
    """Send the job's task by name to `queue` (one of `kind`'s queues; None: its CPU queue);
    the message carries only the job id.

    What `send_task(task, args=[job_id], queue=...)` sends (Celery's task message, protocol 2,
    to the queue through the default exchange, with the same retry policy; results ignored),
    for 40% of its CPU: no routing, queue declaration, result bookkeeping or signals, which
    such a message does not need. Every submission pays this (benchmarks/api.py).
    """
    task = TASK_OF_KIND[kind]
    queue = queue or QUEUES[task]
    if QUEUE_KIND.get(queue) != kind:  # a message no worker would take for this task
        raise ValueError(f"{queue!r} is not a queue of {kind} jobs")
    app = producer(broker_url, visibility_timeout)
    message = app.amqp.as_task_v2(str(uuid.uuid4()), task, args=[job_id], kwargs={}, ignore_result=True,
                                  argsrepr=repr([job_id]), kwargsrepr="{}")
    with app.producer_or_acquire() as publisher:
        publisher.publish(message.body, exchange="", routing_key=queue, headers=message.headers,
                          serializer="json", declare=[], **_publish_options(broker_url, visibility_timeout),
                          **message.properties)
