"""Everything the API and the workers share in Redis, behind one small module.

Imports only redis and pydantic; no other module builds a Redis key. Guarantees:
- a job ends exactly once: the move to a terminal state is a Lua compare-and-set, so a
  redelivered task, a cancel and a time-out cannot each write a result; the same script
  counts the end (jobs_finished_total, answered_total), so a crash cannot lose or double it;
- a memory entry is committed at most once per job (Lua, keyed by job id), only on top of
  the log version the worker checked against, never past the configured capacity, and never
  past the committing API key's quota for the model (counted in the same script);
- a caller's rate tokens and open-job places are taken by one Lua script each, so callers
  racing for the last ones get exactly as many as there are;
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
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

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
    queue: str | None = None  # the broker queue it was sent to (service/queue.py); None: before queues had devices
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


class QueueFull(Exception):
    """`create_job` refused a job: `open_jobs` jobs are queued or running, the limit."""

    def __init__(self, open_jobs: int):
        super().__init__(f"{open_jobs} open jobs")
        self.open_jobs = open_jobs


class OutageRetry(Retry):
    """redis-py's Retry bounded by time instead of a count: a connection error or a timeout
    (redis-py's BusyLoadingError, Redis reloading its append-only file, is a connection
    error) is retried with capped exponential backoff until `seconds` have passed since the
    first failure, then raised. A retried command may have run once already (its answer was
    lost): the scripts the workers call are safe to repeat (a commit answers 'duplicate' for
    the same job, a finish 0 once the job ended, a start 'running'); a counter may count twice."""

    def __init__(self, seconds: float, *, base: float = 0.05, cap: float = 1.0):
        super().__init__(ExponentialBackoff(cap=cap, base=base), -1)
        self.seconds = seconds

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        self._backoff.reset()
        failures, deadline = 0, None
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                now = time.monotonic()
                deadline = deadline or now + self.seconds
                if now >= deadline:
                    raise error
                time.sleep(min(self._backoff.compute(failures), deadline - now))


@dataclass(frozen=True)
class CommitResult:
    """Outcome of a memory commit: committed (index), duplicate (this job's earlier index),
    conflict (the log grew: sync and retry), stale (the memory was reset), full, quota (the
    key has committed its quota to the model's memories; index: its count)."""

    status: Literal["committed", "duplicate", "conflict", "stale", "full", "quota"]
    index: int


# KEYS: job, open-jobs zset, metrics hash. ARGV: status, result, error, now, job id, required
# status ("" = any non-terminal), then counters to add 1 to. Returns 1 if this call ended the
# job, 0 if it had already ended or did not have the required status, -1 if there is no such
# job. The end and its counts (jobs_finished_total:<kind>:<status>, the extra counters) are
# one atomic step: a worker dying right after a job ended cannot lose or double a count.
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local s = redis.call('HGET', KEYS[1], 'status')
if s == 'succeeded' or s == 'failed' or s == 'cancelled' then return 0 end
if ARGV[6] ~= '' and s ~= ARGV[6] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'result', ARGV[2], 'error', ARGV[3], 'finished', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[5])
local record, kind = redis.call('HGET', KEYS[1], 'record'), 'unknown'
if record then kind = cjson.decode(record)['kind'] or 'unknown' end
redis.call('HINCRBYFLOAT', KEYS[3], 'jobs_finished_total:' .. kind .. ':' .. ARGV[1], 1)
for i = 7, #ARGV do redis.call('HINCRBYFLOAT', KEYS[3], ARGV[i], 1) end
return 1
"""

# KEYS: job, input, open-jobs zset, metrics hash[, idempotency key]. ARGV: job id, record,
# input, ttl, now, open-jobs limit (0: none), counter field, id the idempotency key may be
# taken from ('': none), expiry cut-off of the open-jobs zset. One round trip and atomic: a
# replayed key returns its job ({'existing', id}) before the limit is checked ({'full', open
# jobs}); else the job, its input and the key are stored together ({'created', id}).
_CREATE = """
if KEYS[5] then
  local existing = redis.call('GET', KEYS[5])
  if existing and existing ~= ARGV[8] then return {'existing', existing} end
end
local limit = tonumber(ARGV[6])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[9])
  local open = redis.call('ZCARD', KEYS[3])
  if open >= limit then return {'full', tostring(open)} end
end
if KEYS[5] then redis.call('SET', KEYS[5], ARGV[1], 'EX', ARGV[4]) end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', 'queued')
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[4], ARGV[7], 1)
return {'created', ARGV[1]}
"""

# KEYS: job. ARGV: now. Records that the job's task was sent to the broker (field 'enqueued'),
# only while the job exists: an expired job must not come back as a hash with no TTL.
_MARK_QUEUED = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'enqueued', ARGV[1]) end
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

# KEYS: log, job→index hash, epoch, the model's owner→commits hash, the model's namespace
# set. ARGV: expected epoch, expected length, job id, entry, capacity, owner, quota (0: none),
# namespace. Distances are never computed here: the worker checked the rule against the
# first `expected length` entries; the script only appends if nothing was added since, and
# counts the entry against the owner's quota in the same step.
_COMMIT = """
local done = redis.call('HGET', KEYS[2], ARGV[3])
if done then return {'duplicate', tonumber(done)} end
local epoch = tonumber(redis.call('GET', KEYS[3]) or '0')
if epoch ~= tonumber(ARGV[1]) then return {'stale', epoch} end
local n = redis.call('LLEN', KEYS[1])
if n ~= tonumber(ARGV[2]) then return {'conflict', n} end
if n >= tonumber(ARGV[5]) then return {'full', n} end
local used = tonumber(redis.call('HGET', KEYS[4], ARGV[6]) or '0')
if tonumber(ARGV[7]) > 0 and used >= tonumber(ARGV[7]) then return {'quota', used} end
redis.call('RPUSH', KEYS[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], n)
redis.call('HINCRBY', KEYS[4], ARGV[6], 1)
redis.call('SADD', KEYS[5], ARGV[8])
return {'committed', n}
"""


# KEYS: a caller's token bucket. ARGV: rate (tokens per second), burst (bucket size), cost.
# Redis's clock, so every API process agrees. Returns 0 if the tokens were taken, else the
# microseconds until they will be there (nothing is taken).
_TAKE_TOKENS = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil or at == nil then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000000)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = math.ceil((cost - tokens) / rate * 1000000) end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait
"""

# KEYS: a caller's open-jobs zset (job ids, and reservations 'r:...'). ARGV: limit, the new
# reservation, now, ttl, then members to drop (ended jobs, lapsed reservations). Returns the
# number of open jobs and reservations, the new one included if it was made (≤ limit), or
# -1 - that number if the caller is at its limit (nothing added).
_RESERVE = """
for i = 5, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[1]) then return -1 - open end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return open + 1
"""


class Store:
    """Typed access to the shared state; one instance per process (it holds a pool)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "sc", job_ttl_seconds: int = 86400):
        self.r = client
        self.p = prefix
        self.ttl = job_ttl_seconds
        self._create = client.register_script(_CREATE)
        self._finish = client.register_script(_FINISH)
        self._start = client.register_script(_START)
        self._progress = client.register_script(_PROGRESS)
        self._commit = client.register_script(_COMMIT)
        self._take_tokens = client.register_script(_TAKE_TOKENS)
        self._reserve = client.register_script(_RESERVE)
        self._mark_queued = client.register_script(_MARK_QUEUED)

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float | None = 10.0, retry_seconds: float = 0.0,
                 **kwargs) -> Store:
        """A store on a new connection pool; calls fail after `socket_timeout` seconds
        instead of hanging on a Redis that went away. With `retry_seconds` (the workers'),
        a call that meets a connection error or a timeout is retried with backoff for about
        that long (`OutageRetry`), so that a Redis restart pauses the caller instead of
        failing it; without, redis-py's few quick retries (the API: answer 503 at once)."""
        retry = {"retry": OutageRetry(retry_seconds)} if retry_seconds > 0 else {}
        client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5, **retry)
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
        # Every key of one model's memories shares the digest's hash tag (one cluster slot), so
        # a commit can count the owner's quota, kept per model, in the same script.
        digest, _, rest = namespace.partition("/")
        return f"{self.p}:mem:{{{digest}}}:{rest}:{part}"

    def _model_mem(self, digest: str, part: str) -> str:
        return f"{self.p}:mem:{{{digest}}}::{part}"

    # --- jobs -------------------------------------------------------------------------

    def create_job(
        self, kind: JobKind, *, model: str, digest: str, request: dict[str, Any],
        input_bytes: bytes, owner: str | None = None, idempotency_key: str | None = None,
        max_open: int | None = None, queue: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a queued job and its input; returns (job, created). One round trip.

        With an idempotency key, a retry by the same owner returns the first job (created
        False) and stores nothing; a key whose job has expired starts anew. With `max_open`,
        a new job is refused with QueueFull when that many jobs are open (a replay is not).
        `queue` is recorded with it, for the recovery pass to send it to the same queue.
        """
        job_id = uuid.uuid4().hex
        job = JobRecord(id=job_id, kind=kind, owner=owner, model=model, digest=digest,
                        request=request, created=time.time(), queue=queue)
        static = job.model_dump_json(include={"id", "kind", "owner", "model", "digest", "request", "created",
                                              "queue"})
        keys = [self._job(job_id), self._input(job_id), self._open(), f"{self.p}:metrics"]
        if idempotency_key is not None:
            keys.append(self._idem(owner, idempotency_key))
        replace = ""
        for _ in range(5):
            status, value = self._create(keys=keys, args=[
                job_id, static, input_bytes, self.ttl, job.created, max_open or 0,
                f"jobs_submitted_total:{kind}", replace, job.created - self.ttl])
            status, value = status.decode(), value.decode()
            if status == "created":
                return job, True
            if status == "full":
                raise QueueFull(int(value))
            first = self.get_job(value)
            if first is not None:
                return first, False
            replace = value  # the first job expired: take the key over, if it still names that job
        raise redis.RedisError(f"idempotency key {idempotency_key!r} kept moving; retry")

    def _idem(self, owner: str | None, key: str) -> str:
        return f"{self.p}:idem:{owner or '-'}:{key}"

    def release_idempotency_key(self, owner: str | None, key: str, job_id: str) -> None:
        """Forget key → job_id (if it still points there), so that a retry after a failure
        to enqueue creates a new job instead of returning the failed one."""
        idem = self._idem(owner, key)
        if self.r.get(idem) == job_id.encode():
            self.r.delete(idem)

    def mark_enqueued(self, job_id: str) -> None:
        """Record that the job's task is in the broker (see `was_enqueued`)."""
        self._mark_queued(keys=[self._job(job_id)], args=[time.time()])

    def was_enqueued(self, job_id: str) -> bool:
        """Whether the job's task was sent: a queued job that was not is one whose API process
        died between storing and queueing it; a replay of its Idempotency-Key queues it."""
        return bool(self.r.hexists(self._job(job_id), "enqueued"))

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

    def statuses(self, job_ids: list[str]) -> dict[str, str | None]:
        """Each job's status (None: no such job), in one round trip."""
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._job(job_id), "status")
            return {j: s.decode() if s else None for j, s in zip(job_ids, pipe.execute(), strict=True)}

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
        error: dict | None = None, only_if: JobState | None = None, counters: tuple[str, ...] | list[str] = (),
    ) -> bool:
        """End the job once; True if this call ended it. `only_if` requires a current status.
        The end counts jobs_finished_total:<kind>:<status> and each of `counters` (by 1) in
        the same atomic step; the latency histogram is observed after it."""
        if status not in TERMINAL:
            raise ValueError(f"{status} is not a terminal state")
        ended = self._finish(
            keys=[self._job(job_id), self._open(), f"{self.p}:metrics"],
            args=[status, json.dumps(result) if result is not None else "",
                  json.dumps(error) if error is not None else "", time.time(), job_id, only_if or "",
                  *counters],
        )
        if ended == 1:
            job = self.get_job(job_id)
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
        raw = self.get_model_json(name)
        return ModelRecord.model_validate_json(raw) if raw else None

    def get_model_json(self, name: str) -> bytes | None:
        """`name`'s registry record as stored (a `ModelRecord`'s JSON), unparsed: for a caller
        that keeps what it parsed from the same bytes (the submit path, `service.jobs`)."""
        return self.r.get(f"{self.p}:model:{name}") or None

    def list_models(self) -> list[ModelRecord]:
        names = sorted(n.decode() for n in self.r.smembers(f"{self.p}:models"))
        return [m for m in (self.get_model(n) for n in names) if m is not None]

    def get_bundle(self, digest: str) -> bytes | None:
        return self.r.get(f"{self.p}:bundle:{digest}")

    def has_bundle(self, digest: str) -> bool:
        return bool(self.r.exists(f"{self.p}:bundle:{digest}"))

    def delete_model(self, name: str) -> ModelRecord | None:
        """Unregister `name` (None if it was not registered). Its bundle goes too unless another
        name is registered with the same digest; jobs that name the digest then fail when a
        worker looks for it. The memory stays: it belongs to the digest, and a re-upload of the
        same bundle must find its committed certificates (memories never expire)."""
        models, key = f"{self.p}:models", f"{self.p}:model:{name}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    # A concurrent upload changes a watched key (the bundle, the name set or a
                    # record) and makes EXEC fail: then look again.
                    pipe.watch(models, key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        return None
                    record = ModelRecord.model_validate_json(raw)
                    bundle = f"{self.p}:bundle:{record.digest}"
                    others = [f"{self.p}:model:{n.decode()}" for n in pipe.smembers(models) if n.decode() != name]
                    pipe.watch(bundle, *others)
                    shared = any(ModelRecord.model_validate_json(r).digest == record.digest
                                 for r in (pipe.mget(others) if others else []) if r is not None)
                    pipe.multi()
                    pipe.delete(key)
                    pipe.srem(models, name)
                    if not shared:
                        pipe.delete(bundle)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    # --- the certificate memory -----------------------------------------------------

    def memory_epoch(self, namespace: str) -> int:
        return int(self.r.get(self._mem(namespace, "epoch")) or 0)

    def memory_entries(self, namespace: str, start: int = 0, stop: int | None = None) -> list[bytes]:
        """Entries start ≤ i < stop (to the end when stop is None): a worker pulls only what it
        does not have, a page at a time."""
        if stop is not None and stop <= start:
            return []
        return self.r.lrange(self._mem(namespace, "log"), start, -1 if stop is None else stop - 1)

    def memory_entry_of(self, namespace: str, job_id: str) -> int | None:
        """The index of the entry this job committed, if it did (a redelivered job returns it)."""
        index = self.r.hget(self._mem(namespace, "jobs"), job_id)
        return int(index) if index is not None else None

    def memory_job_index(self, namespace: str) -> dict[str, int]:
        """job id → index of the entry it committed, for every entry of the log."""
        return {k.decode(): int(v) for k, v in self.r.hgetall(self._mem(namespace, "jobs")).items()}

    def memory_size(self, namespace: str) -> tuple[int, int]:
        """(entries, bytes) of the log."""
        key = self._mem(namespace, "log")
        n = int(self.r.llen(key))
        return n, int(self.r.memory_usage(key) or 0) if n else 0

    def _commit_keys(self, namespace: str) -> list[str]:
        digest = namespace.partition("/")[0]
        return [self._mem(namespace, "log"), self._mem(namespace, "jobs"), self._mem(namespace, "epoch"),
                self._model_mem(digest, "owners"), self._model_mem(digest, "namespaces")]

    def memory_commit(
        self, namespace: str, *, epoch: int, length: int, job_id: str, entry: bytes, capacity: int,
        owner: str | None = None, quota: int = 0,
    ) -> CommitResult:
        """Append `entry` if the log is still (epoch, length), below `capacity`, and `owner`
        (an API key id; None: the open API's one caller) has committed fewer than `quota`
        entries to this model's memories (0: no quota)."""
        status, index = self._commit(
            keys=self._commit_keys(namespace),
            args=[epoch, length, job_id, entry, capacity, owner or "-", quota, namespace],
        )
        return CommitResult(status.decode(), int(index))

    def memory_commit_many(
        self, namespace: str, *, epoch: int, length: int, entries: list[tuple[str, bytes]], capacity: int,
        owner: str | None = None, quota: int = 0,
    ) -> list[CommitResult]:
        """`memory_commit` of (job id, entry) pairs in one round trip, for bulk loading: the k-th
        is committed on top of length + k by the same compare-and-set, so a log that moved on
        refuses the rest ("conflict"). The rule is the caller's business, as with memory_commit."""
        keys = self._commit_keys(namespace)
        with self.r.pipeline(transaction=False) as pipe:
            for k, (job_id, entry) in enumerate(entries):
                self._commit(keys=keys, args=[epoch, length + k, job_id, entry, capacity, owner or "-", quota,
                                              namespace], client=pipe)
            replies = pipe.execute()
        return [CommitResult(status.decode(), int(index)) for status, index in replies]

    def memory_commits_of(self, digest: str, owner: str | None) -> int:
        """Entries `owner` has committed to the memories of the model with this digest."""
        return int(self.r.hget(self._model_mem(digest, "owners"), owner or "-") or 0)

    def memory_namespaces(self, digest: str) -> list[str]:
        """Every namespace (numeric mode, device type, α) the model's memories were written in."""
        return sorted(m.decode() for m in self.r.smembers(self._model_mem(digest, "namespaces")))

    def memory_reset(self, namespace: str) -> None:
        """Drop every entry of one namespace; workers see the new epoch and rebuild their copy."""
        with self.r.pipeline() as pipe:
            pipe.delete(self._mem(namespace, "log"), self._mem(namespace, "jobs"))
            pipe.incr(self._mem(namespace, "epoch"))
            pipe.execute()

    def memory_reset_model(self, digest: str) -> list[str]:
        """Drop every memory of the model (all numeric modes, devices and levels) and its keys'
        quota counts; returns the namespaces reset."""
        namespaces = self.memory_namespaces(digest)
        with self.r.pipeline() as pipe:
            for namespace in namespaces:
                pipe.delete(self._mem(namespace, "log"), self._mem(namespace, "jobs"))
                pipe.incr(self._mem(namespace, "epoch"))
            pipe.delete(self._model_mem(digest, "owners"))
            pipe.execute()
        return namespaces

    # --- per-caller limits ------------------------------------------------------------

    def _caller(self, part: str, owner: str | None) -> str:
        return f"{self.p}:{part}:{owner or '-'}"

    def take_tokens(self, owner: str | None, *, rate: float, burst: int, cost: int = 1) -> float:
        """Take `cost` tokens from the caller's bucket (refilled at `rate` per second up to
        `burst`): 0.0 if taken, else the seconds until they will be there. Atomic: callers
        racing for the last tokens get exactly as many as there are."""
        wait = self._take_tokens(keys=[self._caller("rate", owner)], args=[rate, burst, cost])
        return int(wait) / 1e6

    RESERVATION_SECONDS = 60.0  # a reservation never settled (its API process died) lapses

    def reserve_job_slot(self, owner: str | None, limit: int) -> str | None:
        """A place among the caller's at most `limit` open jobs, held by a reservation to pass
        to `settle_job_slot` once the job is created (or not); None when `limit` are open.
        Jobs that ended or expired stop counting here (they are looked up, then dropped in the
        same script that counts, so racing callers never get more than `limit` places)."""
        key, now = self._caller("open", owner), time.time()
        members = self.r.zrange(key, 0, -1, withscores=True)
        jobs = [m for m, _ in members if not m.startswith(b"r:")]
        with self.r.pipeline(transaction=False) as pipe:
            for m in jobs:
                pipe.hget(self._job(m.decode()), "status")
            statuses = pipe.execute()
        drop = [m for m, s in zip(jobs, statuses, strict=True) if s is None or s.decode() in TERMINAL]
        drop += [m for m, score in members if m.startswith(b"r:") and score < now - self.RESERVATION_SECONDS]
        reservation = f"r:{uuid.uuid4().hex}"
        placed = self._reserve(keys=[key], args=[limit, reservation, now, self.ttl, *drop])
        return reservation if int(placed) > 0 else None

    def settle_job_slot(self, owner: str | None, reservation: str, job_id: str | None) -> None:
        """Replace the reservation by the job it was for, or give it back (job_id None)."""
        key = self._caller("open", owner)
        with self.r.pipeline() as pipe:
            pipe.zrem(key, reservation)
            if job_id is not None:
                pipe.zadd(key, {job_id: time.time()})
                pipe.expire(key, self.ttl)
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

    # --- recovery of lost broker messages (workers/recovery.py) ----------------------

    def server_id(self) -> str:
        """The Redis server's run id: it changes when Redis restarts."""
        return str(self.r.info("server").get("run_id", ""))

    def claim(self, name: str, seconds: float) -> bool:
        """Take the named lease for `seconds` if no one holds it (one worker does a chore)."""
        return bool(self.r.set(f"{self.p}:lease:{name}", b"1", nx=True, px=max(1, int(seconds * 1000))))

    def queued_jobs(self, created_before: float) -> list[tuple[str, JobKind]]:
        """(id, kind) of the open jobs still queued that were created before `created_before`."""
        ids = [m.decode() for m in self.r.zrangebyscore(self._open(), "-inf", created_before)]
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._job(job_id), "status", "record")
            rows = pipe.execute()
        return [(job_id, json.loads(record)["kind"]) for job_id, (status, record) in zip(ids, rows, strict=True)
                if status == b"queued" and record]

    def broker_messages(self, queues: list[str], unacked_key: str = "unacked") -> bytes:
        """Every task message the broker holds, as one blob: waiting in `queues` (the Redis
        transport's lists) or delivered and not yet acknowledged (its `unacked` hash), read
        in one transaction, so a message moving from the one to the other is seen."""
        with self.r.pipeline(transaction=True) as pipe:
            for queue in queues:
                pipe.lrange(queue, 0, -1)
            pipe.hvals(unacked_key)
            replies = pipe.execute()
        return b"\n".join(m for reply in replies for m in reply)
