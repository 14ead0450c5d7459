"""Settings shared by the API and the workers: environment variables prefixed SMOOTHCERT_.

Defaults run locally with no configuration. Invalid values fail at start-up, not on the
first request. List settings take a comma-separated string (SMOOTHCERT_API_KEYS=a,b).
SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS is a testing hook (workers/failpoints.py), off by default.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Positive = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMOOTHCERT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "sc"

    # API keys: with none configured the API is open; otherwise every request needs one, a key
    # sees only its own jobs, and admin keys may upload models and reset memories.
    api_keys: Annotated[list[str], NoDecode] = []
    admin_keys: Annotated[list[str], NoDecode] = []

    # Limits: every one is explicit and answered with a 4xx naming it.
    max_body_bytes: Positive = 8 * 2**20
    max_bundle_bytes: Positive = 256 * 2**20
    max_pixels: Positive = 1024 * 1024
    max_n: Positive = 1_000_000
    max_n0: Positive = 100_000
    max_batch_size: Positive = 20_000
    max_queue: Positive = 10_000
    max_wait_seconds: Annotated[float, Field(gt=0, le=300)] = 30.0
    max_dataset_bytes: Positive = 64 * 2**20
    max_evaluation_examples: Positive = 10_000
    # The laxest level a certificate may have: α above it is refused (near 1 a bound carries
    # no information, and the memory would hand that on to every later caller).
    max_alpha: Annotated[float, Field(gt=0, le=0.5, allow_inf_nan=False)] = 0.05

    # Per API key (one shared bucket when the API is open), kept in Redis so that every API
    # process counts together; 0 turns a limit off. Off by default: one deployment's fair
    # share is not another's, and the tests and benchmarks submit in bursts. A production
    # deployment with tenants sets them (SECURITY.md). The rate is a token bucket for job
    # submissions (POST /v1/certifications, /v1/predictions, /v1/evaluations, OIP infer):
    # `rate_limit_burst` at once, then `rate_limit_per_second`; burst 0 means one second's
    # worth. Over it: 429 with Retry-After. `max_open_jobs_per_key` bounds a key's queued and
    # running jobs, so one tenant cannot fill the queue (`max_queue`) for everyone.
    rate_limit_per_second: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    rate_limit_burst: Annotated[int, Field(ge=0)] = 0
    max_open_jobs_per_key: Annotated[int, Field(ge=0)] = 0

    # uvicorn worker processes serving the API (`smoothcert up`, docker-compose.yml). The API
    # keeps no state of its own (Redis holds it), and one process tops out near one core: on
    # two cores, two processes take about 1.6 times the submissions of one (benchmarks/api.py).
    api_workers: Positive = 2

    # Jobs and their inputs expire this long after they are created.
    job_ttl_seconds: Positive = 24 * 3600
    # A job running longer fails with a clear reason; the broker's visibility timeout is
    # set above it so that a live job is never handed to a second worker.
    job_time_limit_seconds: Positive = 3600

    # Workers.
    device: str | None = None  # "cpu", "cuda"; None: CUDA when present

    # The certificate memory (docs/memory.md). One memory per model digest, numeric mode, device
    # type and α; with the memory on, α must be one of `memory_alphas` (a short list, so that
    # memories do not splinter), n at least `memory_min_n` (an abstention committed for a few
    # samples would shrink every later ball around it), and each API key commits at most
    # `memory_quota_per_key` entries to one model's memories (so that no key fills the
    # capacity for everyone). Memories are shared by every key: docs/guarantees.md §3 says why.
    memory_capacity: Positive = 1_000_000
    memory_alphas: Annotated[list[float], NoDecode] = [0.001, 0.01, 0.05]
    memory_min_n: Positive = 1000
    memory_quota_per_key: Annotated[int, Field(ge=0)] = 100_000
    # Workers refuse the memory unless Redis is durable (appendonly yes, appendfsync always,
    # noeviction, a master): an acknowledged commit lost in a crash breaks consistency
    # silently. False only where Redis is durable by means the check cannot see.
    memory_durability_check: bool = True

    # Remote base classifiers (bundle kind "remote": a model served over the Open Inference
    # Protocol v2; docs/bundles.md). Only endpoints under one of `remote_endpoints` may be
    # registered or called (http(s)://host:port[/prefix]; empty: none); `remote_tokens` maps an
    # endpoint origin ("https://host:port") to the bearer token sent to it, as JSON; a secret:
    # never in a bundle. `remote_ca_file`: a CA bundle for TLS (default: the system's).
    remote_endpoints: Annotated[list[str], NoDecode] = []
    remote_tokens: dict[str, str] = {}
    remote_ca_file: str | None = None
    # Jobs running as threads of one worker (`--pool threads`) share one sampling thread that
    # merges their batches (smoothcert.batching); off: each job runs its own passes. None: on
    # for CUDA workers, off on CPUs, where merged passes measured slower than each job's own
    # (BENCHMARKS.md, section 2).
    cross_batching: bool | None = None
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 5.0
    # How long a worker's Redis calls keep retrying through an outage (a Redis restart)
    # before giving up; a job paused that long is then left for redelivery, never failed.
    # The API does not wait: it answers 503 at once.
    redis_retry_seconds: Annotated[float, Field(ge=0)] = 60.0
    # Testing hook, never for production (workers/failpoints.py): a worker sleeps this long
    # right after a job's memory commit, before its result is written, so that the
    # reliability scenario reliability/worker_crash.py can kill it inside that window.
    pause_after_commit_seconds: Annotated[float, Field(ge=0, le=60)] = 0.0

    @field_validator("api_keys", "admin_keys", "memory_alphas", "remote_endpoints", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @model_validator(mode="after")
    def _memory_levels(self) -> Settings:
        if not self.memory_alphas:
            raise ValueError("memory_alphas must name at least one level")
        for alpha in self.memory_alphas:
            if not (math.isfinite(alpha) and 0 < alpha <= self.max_alpha):
                raise ValueError(f"memory_alphas: {alpha} is not in (0, max_alpha = {self.max_alpha}]")
        self.memory_alphas = sorted(set(self.memory_alphas))
        return self

    @model_validator(mode="after")
    def _admins_are_keys(self) -> Settings:
        # An admin key is also an ordinary key: listing it once is enough.
        self.api_keys = list(dict.fromkeys([*self.api_keys, *self.admin_keys]))
        return self

    # How long the broker waits before handing an unacknowledged task (its worker died) to
    # another worker; None: the job time limit plus five minutes.
    visibility_timeout_seconds: Positive | None = None

    # Queues by device (service/queue.py; docs/deployment.md, "Scaling out"). Each device type
    # has its own queues, consumed only by workers on it; this names the device types this
    # deployment runs workers for, in order of preference ("cpu", "cuda", "cpu,cuda"). A job
    # goes to the queue of the first that can run its numeric mode (fp16 and +cuda_graphs need
    # CUDA), and a request none can run is refused at submit (422 numeric_mode_unavailable)
    # rather than failed late by a worker. Configuration, not the live workers: it holds while
    # an autoscaler has scaled a device's workers to zero. The order also picks the device, and
    # so the memory (docs/memory.md), of jobs that every device could run.
    queue_devices: Annotated[list[str], NoDecode] = ["cpu"]

    @field_validator("queue_devices", mode="before")
    @classmethod
    def _queue_devices(cls, value):
        from service.queue import check_devices  # the one place for queues (it imports celery)

        return check_devices(value)

    @property
    def rate_burst(self) -> int:
        """The bucket size: `rate_limit_burst`, or one second's worth of the rate (at least 1)."""
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_second))

    @property
    def visibility_timeout(self) -> int:
        return self.visibility_timeout_seconds or self.job_time_limit_seconds + 300


@lru_cache
def get_settings() -> Settings:
    return Settings()
