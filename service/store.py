"""Everything the API and the workers share in Redis, behind one small module.

Imports only redis and pydantic; no other module builds a Redis key. Guarantees:
- a job ends exactly once: the move to a terminal state is a Lua compare-and-set, so a
  redelivered task, a cancel and a time-out cannot each write a result;
- a memory entry is committed at most once per job (Lua, keyed by job id), only on top of
  the log version the worker checked against, and never past the configured capacity;
- jobs and their inputs expire `job_ttl_seconds` after creation; memories never expire.
Memory entries are opaque bytes here; the workers encode and decode them.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import redis
from pydantic import BaseModel

JobKind = Literal["certification", "prediction", "evaluation"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL = ("succeeded", "failed", "cancelled")


class Progress(BaseModel):
    stage: str
    samples_done: int = 0
    samples_total: int = 0


class JobRecord(BaseModel):
    """A job as stored: the validated request is fixed at creation; the rest moves."""

    id: str
    kind: JobKind
    owner: str | None = None  # the id of the API key that created it
    model: str
    digest: str
    request: dict[str, Any]
    created: float
    status: JobState = "queued"
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    started: float | None = None
    finished: float | None = None


class ModelRecord(BaseModel):
    name: str
    digest: str
    spec: dict[str, Any]  # model.json
    size: int  # bundle bytes
    created: float


@dataclass(frozen=True)
class CommitResult:
    """Outcome of a memory commit: committed (index), duplicate (this job's earlier index),
    conflict (the log grew: sync and retry), stale (the memory was reset), full."""

    status: Literal["committed", "duplicate", "conflict", "stale", "full"]
    index: int


# KEYS: job, open-jobs zset. ARGV: status, result, error, now, job id, required status ("" = any
# non-terminal). Returns 1 if this call ended the job, 0 if it had already ended or did not
# have the required status, -1 if there is no such job.
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return 0 end
if ARGV[6] ~= '' and s ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'result', ARGV[2], 'error', ARGV[3], 'finished', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[5])
return 1
"""

# KEYS: job. ARGV: now. Moves queued → running (a redelivered running job stays running).
# Returns the status after the call, or '' if there is no such job.
_START = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return '' end
if s == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[1])
  return 'running'
end
return s
"""

# KEYS: job. ARGV: progress JSON. Progress is written only while the job runs.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
  return 1
end
return 0
"""

# KEYS: log, job→index hash, epoch. ARGV: expected epoch, expected length, job id, entry,
# capacity. Distances are never computed here: the worker checked the rule against the
# first `expected length` entries; the script only appends if nothing was added since.
_COMMIT = """
local done = redis.call('HGET', KEYS[2], ARGV[3])
if done then return {'duplicate', tonumber(done)} end
local epoch = tonumber(redis.call('GET', KEYS[3]) or '0')
if epoch ~= tonumber(ARGV[1]) then return {'stale', epoch} end
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[2]) then return {'conflict', n} end
if n >= tonumber(ARGV[5]) then return {'full', n} end
redis.call('RPUSH', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], n)
return {'committed', n}
"""


class Store:
    """Typed access to the shared state; one instance per process (it holds a pool)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sc", job_ttl_seconds: int = 86400):
        self.r = client
        self.p = prefix
        self.ttl = job_ttl_seconds
        self._finish = client.register_script(_FINISH)
        self._start = client.register_script(_START)
        self._progress = client.register_script(_PROGRESS)
        self._commit = client.register_script(_COMMIT)

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float | None = 10.0, **kwargs) -> Store:
        """A store on a new connection pool; calls fail after `socket_timeout` seconds
        instead of hanging on a Redis that went away."""
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5)
        return cls(client, **kwargs)

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    # --- keys -------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def _input(self, job_id: str) -> str:
        return f"{self.p}:input:{job_id}"

    def _cancel(self, job_id: str) -> str:
        return f"{self.p}:cancel:{job_id}"

    def _open(self) -> str:
        return f"{self.p}:jobs:open"

    def _mem(self, namespace: str, part: str) -> str:
        return f"{self.p}:mem:{{{namespace}}}:{part}"

    # --- jobs -------------------------------------------------------------------------

    def create_job(
        self, kind: JobKind, *, model: str, digest: str, request: dict[str, Any],
        input_bytes: bytes, owner: str | None = None, idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a queued job and its input; returns (job, created).

        With an idempotency key, a retry by the same owner returns the first job (created
        False) and stores nothing.
        """
        job_id = uuid.uuid4().hex
        if idempotency_key is not None:
            idem = self._idem(owner, idempotency_key)
            if not self.r.set(idem, job_id, nx=True, ex=self.ttl):
                existing = self.r.get(idem)
                job = self.get_job(existing.decode()) if existing else None
                if job is not None:
                    return job, False
                self.r.set(idem, job_id, ex=self.ttl)  # the first job expired: start anew
        job = JobRecord(id=job_id, kind=kind, owner=owner, model=model, digest=digest,
                        request=request, created=time.time())
        static = job.model_dump_json(include={"id", "kind", "owner", "model", "digest", "request", "created"})
        with self.r.pipeline() as pipe:
            pipe.hset(self._job(job_id), mapping={"record": static, "status": "queued"})
            pipe.expire(self._job(job_id), self.ttl)
            pipe.set(self._input(job_id), input_bytes, ex=self.ttl)
            pipe.zadd(self._open(), {job_id: job.created})
            pipe.execute()
        self.count(f"jobs_submitted_total:{kind}")
        return job, True

    def _idem(self, owner: str | None, key: str) -> str:
        return f"{self.p}:idem:{owner or '-'}:{key}"

    def release_idempotency_key(self, owner: str | None, key: str, job_id: str) -> None:
        """Forget key → job_id (if it still points there), so that a retry after a failure
        to enqueue creates a new job instead of returning the failed one."""
        idem = self._idem(owner, key)
        if self.r.get(idem) == job_id.encode():
            self.r.delete(idem)

    def get_job(self, job_id: str) -> JobRecord | None:
        raw = self.r.hgetall(self._job(job_id))
        if not raw or b"record" not in raw:
            return None
        data = json.loads(raw[b"record"])
        data["status"] = raw[b"status"].decode()
        for field in ("progress", "result", "error"):
            value = raw.get(field.encode())
            data[field] = json.loads(value) if value else None
        for field in ("started", "finished"):
            value = raw.get(field.encode())
            data[field] = float(value) if value else None
        return JobRecord.model_validate(data)

    def get_input(self, job_id: str) -> bytes | None:
        return self.r.get(self._input(job_id))

    def put_artifact(self, job_id: str, name: str, data: bytes) -> None:
        """A file a job produced (an evaluation's curve.png, results.tsv); expires with the job."""
        self.r.set(f"{self.p}:artifact:{job_id}:{name}", data, ex=self.ttl)

    def get_artifact(self, job_id: str, name: str) -> bytes | None:
        return self.r.get(f"{self.p}:artifact:{job_id}:{name}")

    def open_jobs(self) -> int:
        """Jobs queued or running (what the queue-length limit counts). A job whose record
        expired without ending (Redis lost it mid-way) stops counting after the TTL."""
        self.r.zremrangebyscore(self._open(), "-inf", time.time() - self.ttl)
        return int(self.r.zcard(self._open()))

    def start_job(self, job_id: str) -> str | None:
        """queued → running; returns the status now (terminal: the caller must not run it)."""
        status = self._start(keys=[self._job(job_id)], args=[time.time()])
        return status.decode() if status else None

    def set_progress(self, job_id: str, stage: str, done: int, total: int) -> None:
        value = Progress(stage=stage, samples_done=done, samples_total=total).model_dump_json()
        self._progress(keys=[self._job(job_id)], args=[value])

    def finish_job(
        self, job_id: str, status: JobState, *, result: dict | None = None,
        error: dict | None = None, only_if: JobState | None = None,
    ) -> bool:
        """End the job once; True if this call ended it. `only_if` requires a current status."""
        if status not in TERMINAL:
            raise ValueError(f"{status} is not a terminal state")
        ended = self._finish(
            keys=[self._job(job_id), self._open()],
            args=[status, json.dumps(result) if result is not None else "",
                  json.dumps(error) if error is not None else "", time.time(), job_id, only_if or ""],
        )
        if ended == 1:
            job = self.get_job(job_id)
            self.count(f"jobs_finished_total:{job.kind if job else 'unknown'}:{status}")
            if job is not None and job.finished is not None:
                self.observe_latency(job.finished - job.created)
        return ended == 1

    def request_cancel(self, job_id: str) -> bool:
        """Flag the job for cancellation; a queued job is cancelled at once. True if the
        job had not ended."""
        self.r.set(self._cancel(job_id), b"1", ex=self.ttl)
        if self.finish_job(job_id, "cancelled", error={"code": "cancelled", "message": "cancelled by the client"},
                           only_if="queued"):
            return True
        job = self.get_job(job_id)
        return job is not None and job.status not in TERMINAL

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self._cancel(job_id)))

    # --- model registry -------------------------------------------------------------

    def put_model(self, name: str, digest: str, spec: dict, bundle: bytes) -> ModelRecord:
        """Register (or replace) `name` → the bundle with `digest`; bundles are kept by digest."""
        record = ModelRecord(name=name, digest=digest, spec=spec, size=len(bundle), created=time.time())
        with self.r.pipeline() as pipe:
            pipe.set(f"{self.p}:bundle:{digest}", bundle)
            pipe.set(f"{self.p}:model:{name}", record.model_dump_json())
            pipe.sadd(f"{self.p}:models", name)
            pipe.execute()
        return record

    def get_model(self, name: str) -> ModelRecord | None:
        raw = self.r.get(f"{self.p}:model:{name}")
        return ModelRecord.model_validate_json(raw) if raw else None

    def list_models(self) -> list[ModelRecord]:
        names = sorted(n.decode() for n in self.r.smembers(f"{self.p}:models"))
        return [m for m in (self.get_model(n) for n in names) if m is not None]

    def get_bundle(self, digest: str) -> bytes | None:
        return self.r.get(f"{self.p}:bundle:{digest}")

    # --- the certificate memory -----------------------------------------------------

    def memory_epoch(self, namespace: str) -> int:
        return int(self.r.get(self._mem(namespace, "epoch")) or 0)

    def memory_entries(self, namespace: str, start: int = 0) -> list[bytes]:
        """Entries from index `start` on: a worker pulls only what it does not have."""
        return self.r.lrange(self._mem(namespace, "log"), start, -1)

    def memory_entry_of(self, namespace: str, job_id: str) -> int | None:
        """The index of the entry this job committed, if it did (a redelivered job returns it)."""
        index = self.r.hget(self._mem(namespace, "jobs"), job_id)
        return int(index) if index is not None else None

    def memory_size(self, namespace: str) -> tuple[int, int]:
        """(entries, bytes) of the log."""
        key = self._mem(namespace, "log")
        n = int(self.r.llen(key))
        return n, int(self.r.memory_usage(key) or 0) if n else 0

    def memory_commit(
        self, namespace: str, *, epoch: int, length: int, job_id: str, entry: bytes, capacity: int
    ) -> CommitResult:
        status, index = self._commit(
            keys=[self._mem(namespace, "log"), self._mem(namespace, "jobs"), self._mem(namespace, "epoch")],
            args=[epoch, length, job_id, entry, capacity],
        )
        return CommitResult(status.decode(), int(index))

    def memory_reset(self, namespace: str) -> None:
        """Drop every entry; workers see the new epoch and rebuild their copy."""
        with self.r.pipeline() as pipe:
            pipe.delete(self._mem(namespace, "log"), self._mem(namespace, "jobs"))
            pipe.incr(self._mem(namespace, "epoch"))
            pipe.execute()

    # --- workers and metrics --------------------------------------------------------

    def heartbeat(self, worker: str) -> None:
        self.r.zadd(f"{self.p}:workers", {worker: time.time()})

    def live_workers(self, within_seconds: float) -> list[str]:
        since = time.time() - within_seconds
        return [w.decode() for w in self.r.zrangebyscore(f"{self.p}:workers", since, "+inf")]

    def count(self, metric: str, by: float = 1) -> None:
        self.r.hincrbyfloat(f"{self.p}:metrics", metric, by)

    LATENCY_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

    def observe_latency(self, seconds: float) -> None:
        bucket = next((str(b) for b in self.LATENCY_BUCKETS if seconds <= b), "+Inf")
        with self.r.pipeline() as pipe:
            pipe.hincrby(f"{self.p}:latency", bucket, 1)
            pipe.hincrbyfloat(f"{self.p}:latency", "sum", seconds)
            pipe.execute()

    def metrics(self) -> dict[str, dict[str, float]]:
        """Counters and latency buckets, for the API's /metrics."""
        def read(key: str) -> dict[str, float]:
            return {k.decode(): float(v) for k, v in self.r.hgetall(key).items()}
        return {"counters": read(f"{self.p}:metrics"), "latency": read(f"{self.p}:latency")}

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in a Celery queue (the Redis transport keeps a list per queue)."""
        return int(self.r.llen(queue))
