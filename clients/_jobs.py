"""Handles on submitted jobs: `Job` (sync) and `AsyncJob`, and the polling loop they share.

`wait()` long-polls `GET …/{id}?wait=S` (S ≤ 30 whole seconds) until the job is terminal.
`Poller` holds that loop's decisions (how long to ask the server to hold, when to report
progress, when to give up) so the two handles only send and sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from clients._base import MAX_LONG_POLL, job_path
from clients._exceptions import JobTimeout
from clients._types import JobKind, JobStatus

if TYPE_CHECKING:
    from clients._client import AsyncClient, Client

__all__ = ["AsyncJob", "Job", "Poller"]

ProgressCallback = Callable[[JobStatus], object]
DEFAULT_POLL = 2.0


class Poller:
    """The decisions of one `wait()`.

    A round asks the server to hold the answer up to `poll` seconds. If the answer comes
    back early with nothing new (a server that ignores ?wait), the rest of the round is
    slept out, so no server is polled more often than every `poll` seconds while idle.
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
        """
        poller = Poller(self.id, timeout, poll, on_progress)
        while True:
            started = time.monotonic()
            status = self.status(wait=poller.window())
            pause = poller.observe(status, time.monotonic() - started)
            if pause is None:
                return status
            time.sleep(pause)

    def cancel(self) -> JobStatus:
        """Ask the server to cancel; the job stops between batches, so it may briefly
        remain running. Returns the status the server answered with. A job that already
        ended raises `ConflictError` (409)."""
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
            status = await self.status(wait=poller.window())
            pause = poller.observe(status, time.monotonic() - started)
            if pause is None:
                return status
            await asyncio.sleep(pause)

    async def cancel(self) -> JobStatus:
        """See `Job.cancel`."""
        status = await self._client._run(self._client._cancel_op(self.kind, self.id))
        return status if status is not None else await self.status()
