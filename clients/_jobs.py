"""Handles on submitted jobs: `Job` (sync) and `AsyncJob`, and the polling loop they share.

`wait()` long-polls `GET …/{id}?wait=S` (S ≤ 30 whole seconds) until the job is terminal,
riding out an outage of the API (a restart) up to its timeout. `Poller` holds that loop's
decisions (how long to ask the server to hold, when to report progress, how long to wait
after a failure, when to give up) so the two handles only send and sleep.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from clients._base import MAX_LONG_POLL, Op, job_path
from clients._exceptions import APIConnectionError, APIStatusError, JobTimeout, SmoothcertError
from clients._types import JobKind, JobStatus

if TYPE_CHECKING:
    from clients._base import BaseClient
    from clients._client import AsyncClient, Client

__all__ = ["AsyncJob", "Job", "Poller"]

ProgressCallback = Callable[[JobStatus], object]
DEFAULT_POLL = 2.0
MAX_OUTAGE = 300.0  # seconds of failures in a row that wait(timeout=None) rides out


class Poller:
    """The decisions of one `wait()`.

    A round asks the server to hold the answer up to `poll` seconds. If the answer comes
    back early with nothing new (a server that ignores ?wait), the rest of the round is
    slept out, so no server is polled more often than every `poll` seconds while idle.
    A round that fails transiently is tried again after the client's retry delay (backoff
    capped at `poll`, or the server's Retry-After) until the deadline, or, without one,
    until the failures have lasted `MAX_OUTAGE` seconds in a row.
    """

    def __init__(self, job_id: str, timeout: float | None, poll: float,
                 on_progress: ProgressCallback | None):
        if not poll > 0:
            raise ValueError(f"poll must be positive, not {poll!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be None or ≥ 0, not {timeout!r}")
        self.job_id, self.timeout, self.on_progress = job_id, timeout, on_progress
        self.poll = min(poll, MAX_LONG_POLL)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.last: JobStatus | None = None
        self._seen: object = None
        self.failures = 0  # failed rounds in a row
        self._failing_since: float | None = None

    def window(self) -> int:
        """Seconds for ?wait=: whole, since the server may declare the parameter an integer."""
        if self.deadline is None:
            return int(self.poll)
        return max(0, int(min(self.poll, self.deadline - time.monotonic())))

    def observe(self, status: JobStatus, elapsed: float) -> float | None:
        """Record an answer that took `elapsed` s: None if terminal, else seconds to sleep.

        Calls `on_progress` when the status or progress changed. Raises `JobTimeout` once
        the deadline has passed.
        """
        self.failures, self._failing_since = 0, None
        seen = (status.status, status.progress)
        changed, self._seen, self.last = seen != self._seen, seen, status
        if changed and self.on_progress is not None:
            self.on_progress(status)
        if status.done:
            return None
        pause = 0.0 if changed else max(0.0, self.poll - elapsed)
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise JobTimeout(self.job_id, self.timeout or 0.0, status)
            pause = min(pause, left)
        return pause

    def failed(self, client: BaseClient, op: Op[JobStatus], error: SmoothcertError) -> float:
        """After a round (`op`) failed with `error`: seconds to sleep before the next one.
        The delay is the client's (`retry_delay`), bounded by this wait rather than by
        `max_retries` (unless that is 0: no retries at all). Raises `error` when it is not
        to be retried or, without a deadline, once the failures have lasted MAX_OUTAGE;
        `JobTimeout` (from `error`) once the deadline has passed."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        limit = math.inf if client.max_retries else 0
        delay = client.retry_delay(op, self.failures, error, limit=limit, cap=self.poll)
        if delay is None or (self.deadline is None and now - self._failing_since > MAX_OUTAGE):
            raise error
        if self.deadline is not None:
            left = self.deadline - now
            if left <= 0:
                raise JobTimeout(self.job_id, self.timeout or 0.0, self.last) from error
            delay = min(delay, left)
        client.note_retry(op, self.failures, error, delay)
        self.failures += 1
        return delay


class _JobHandle:
    """What both handles hold: the job's id, kind, path and the answer to its submission."""

    def __init__(self, id: str, kind: JobKind, submitted: JobStatus | None = None):
        self.id, self.kind, self.submitted = id, kind, submitted
        self.path = job_path(kind, id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, kind={self.kind!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _JobHandle) and (self.id, self.kind) == (other.id, other.kind)

    def __hash__(self) -> int:
        return hash((self.id, self.kind))


class Job(_JobHandle):
    """A certification or prediction job on the server, driven by a `Client`."""

    def __init__(self, client: Client, id: str, kind: JobKind, submitted: JobStatus | None = None):
        super().__init__(id, kind, submitted)
        self._client = client

    def status(self, *, wait: int | None = None) -> JobStatus:
        """The job's status now, or after the server held the request up to `wait` s."""
        return self._client._run(self._client._status_op(self.kind, self.id, wait))

    def wait(self, timeout: float | None = None, *, poll: float = DEFAULT_POLL,
             on_progress: ProgressCallback | None = None) -> JobStatus:
        """Block until the job is succeeded, failed or cancelled, and return that status.

        A failed job is returned, not raised: call `.raise_for_status()` for that.
        `on_progress(status)` is called on every change seen. Each round lasts up to `poll`
        seconds (capped at 30), held by the server's long-poll; a terminal status ends it
        at once. Raises `JobTimeout` after `timeout` seconds (None: no limit); the job
        itself goes on.

        A round that fails transiently (connection refused or dropped, a timeout, HTTP
        429/502/503/504), as while the API restarts, is tried again with backoff until
        `timeout`, however many tries that takes (with `timeout=None`: until the failures
        have lasted 300 s in a row; with the client's `max_retries=0`: never). Other errors
        are raised at once.
        """
        poller = Poller(self.id, timeout, poll, on_progress)
        while True:
            started = time.monotonic()
            op = self._client._status_op(self.kind, self.id, poller.window())
            try:
                status = self._client._run(op, retries=0)
            except (APIConnectionError, APIStatusError) as error:
                time.sleep(poller.failed(self._client, op, error))
                continue
            pause = poller.observe(status, time.monotonic() - started)
            if pause is None:
                return status
            time.sleep(pause)

    def cancel(self) -> JobStatus:
        """Ask the server to cancel; the job stops between batches, so it may briefly
        remain running. Returns the status the server answered with. A job that already
        ended answers its final status (a server that calls that a conflict raises
        `ConflictError`, 409)."""
        status = self._client._run(self._client._cancel_op(self.kind, self.id))
        return status if status is not None else self.status()


class AsyncJob(_JobHandle):
    """`Job` for `AsyncClient`: the same methods, awaitable."""

    def __init__(self, client: AsyncClient, id: str, kind: JobKind, submitted: JobStatus | None = None):
        super().__init__(id, kind, submitted)
        self._client = client

    async def status(self, *, wait: int | None = None) -> JobStatus:
        """See `Job.status`."""
        return await self._client._run(self._client._status_op(self.kind, self.id, wait))

    async def wait(self, timeout: float | None = None, *, poll: float = DEFAULT_POLL,
                   on_progress: ProgressCallback | None = None) -> JobStatus:
        """See `Job.wait`."""
        poller = Poller(self.id, timeout, poll, on_progress)
        while True:
            started = time.monotonic()
            op = self._client._status_op(self.kind, self.id, poller.window())
            try:
                status = await self._client._run(op, retries=0)
            except (APIConnectionError, APIStatusError) as error:
                await asyncio.sleep(poller.failed(self._client, op, error))
                continue
            pause = poller.observe(status, time.monotonic() - started)
            if pause is None:
                return status
            await asyncio.sleep(pause)

    async def cancel(self) -> JobStatus:
        """See `Job.cancel`."""
        status = await self._client._run(self._client._cancel_op(self.kind, self.id))
        return status if status is not None else await self.status()
