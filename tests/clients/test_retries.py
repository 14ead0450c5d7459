"""The retry policy: what is retried, how often, how long between tries, and that a retried
submission never makes a second job; for `Client` and `AsyncClient` alike, and the CLI.

`Flaky` wraps the fake server's transport and plays a script of faults, one per request:
a refused connection, a response lost after the server acted, a timeout, or a canned status.
Sleeps of the retry loop are recorded instead of slept (`sleeps`), except where a test needs
the real clock (deadlines of `wait`).
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

import clients._client
import clients._jobs
from clients import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    JobTimeout,
    RateLimitError,
    ServiceUnavailableError,
)
from clients._base import MAX_RETRY_AFTER
from clients.cli import main

from .conftest import BASE_URL
from .fake_server import FakeState, create_app, sync_transport

TENSOR = [[[0.5] * 8 for _ in range(8)]]
ERROR = {"error": {"code": "busy", "message": "try later"}}

Fault = str | int | tuple[int, dict[str, str]] | None


class Flaky(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Plays `faults` in order, one per request, then passes everything to the server:
    None passes; "refuse" (connection refused: the server never saw it), "lose" (the
    server handled it, then the connection broke), "timeout"; an int or (int, headers):
    that status, answered instead of the server."""

    def __init__(self, state: FakeState, faults: list[Fault], *, asynchronous: bool = False):
        self.faults = list(faults)
        self.seen: list[httpx.Request] = []
        app = create_app(state)
        self.inner: Any = httpx.ASGITransport(app=app) if asynchronous else sync_transport(app)

    def _next(self, request: httpx.Request) -> Fault:
        self.seen.append(request)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "refuse":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if fault == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        return fault

    @staticmethod
    def _answer(fault: Fault) -> httpx.Response | None:
        if isinstance(fault, int):
            return httpx.Response(fault, json=ERROR)
        if isinstance(fault, tuple):
            return httpx.Response(fault[0], json=ERROR, headers=fault[1])
        return None

    def _after(self, fault: Fault, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if fault == "lose":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._next(request)
        answer = self._answer(fault)
        return answer or self._after(fault, request, self.inner.handle_request(request))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._next(request)
        answer = self._answer(fault)
        if answer is not None:
            return answer
        response = await self.inner.handle_async_request(request)
        await response.aread()
        return self._after(fault, request, response)

    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.seen]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Record the clients' sleeps (retry delays, polling pauses) instead of sleeping them."""
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def async_sleep(seconds: float) -> None:
        slept.append(seconds)
        await real_async_sleep(0)

    real_async_sleep = asyncio.sleep
    for module in (clients._client, clients._jobs):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
        monkeypatch.setattr(module, "asyncio", types.SimpleNamespace(sleep=async_sleep))
    yield slept


def call(asynchronous: bool, state: FakeState, faults: list[Fault], action, **options):
    """Run `action(client)` (a coroutine function for the async client) against a Flaky
    fake server; returns (result or raised exception, the transport, the client)."""
    flaky = Flaky(state, faults, asynchronous=asynchronous)
    if not asynchronous:
        with Client(BASE_URL, transport=flaky, **options) as sc:
            try:
                return action(sc), flaky, sc
            except Exception as e:  # the tests assert on it
                return e, flaky, sc

    async def run() -> Any:
        async with AsyncClient(BASE_URL, transport=flaky, **options) as sc:
            try:
                return await action(sc), flaky, sc
            except Exception as e:
                return e, flaky, sc
    return asyncio.run(run())


def certify(asynchronous: bool):
    if asynchronous:
        async def act(sc: AsyncClient):
            return await sc.certify(TENSOR, model="digits")
        return act
    return lambda sc: sc.certify(TENSOR, model="digits")


def models(asynchronous: bool):
    if asynchronous:
        async def act(sc: AsyncClient):
            return await sc.models()
        return act
    return lambda sc: sc.models()


both = pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])


@both
def test_connection_refused_then_success(asynchronous, state, sleeps):
    job, flaky, sc = call(asynchronous, state, ["refuse", "refuse"], certify(asynchronous))
    assert job.id == state.last_job().id and len(state.jobs) == 1
    assert len(flaky.seen) == 3 and sc.retries == 2
    # Exponential backoff with jitter: 0.5 s then 1 s, each times a factor in [0.5, 1).
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] < 0.5 and 0.5 <= sleeps[1] < 1.0


@both
def test_every_attempt_of_a_submission_sends_the_same_idempotency_key(asynchronous, state, sleeps):
    job, flaky, sc = call(asynchronous, state, ["refuse", "timeout", "lose", "refuse"], certify(asynchronous),
                          max_retries=5)
    keys = flaky.keys()
    assert len(keys) == 5 and keys[0] and len(set(keys)) == 1
    # "lose": the server made the job and the answer was lost; the retry got that same job.
    assert len(state.jobs) == 1 and job.id == state.last_job().id and sc.retries == 4


@both
def test_retry_after_is_honoured(asynchronous, state, sleeps):
    faults = [(503, {"Retry-After": "3"}), (429, {"Retry-After": "2"}), 502, 504]
    result, flaky, sc = call(asynchronous, state, faults, models(asynchronous), max_retries=4)
    assert [m.name for m in result] == ["digits", "broken", "stuck"]
    assert sleeps[:2] == [3.0, 2.0] and 1.0 <= sleeps[2] < 2.0 and 2.0 <= sleeps[3] < 4.0
    assert sc.retries == 4


@both
def test_a_retry_after_over_the_cap_is_raised_at_once(asynchronous, state, sleeps):
    long = str(int(MAX_RETRY_AFTER) + 1)
    error, flaky, sc = call(asynchronous, state, [(429, {"Retry-After": long})], models(asynchronous))
    assert isinstance(error, RateLimitError) and error.retry_after == MAX_RETRY_AFTER + 1
    assert len(flaky.seen) == 1 and sleeps == [] and sc.retries == 0


@both
def test_max_retries_0_raises_at_once(asynchronous, state, sleeps):
    for fault, cls in [("refuse", APIConnectionError), ("timeout", APITimeoutError),
                       (503, ServiceUnavailableError)]:
        error, flaky, sc = call(asynchronous, state, [fault], certify(asynchronous), max_retries=0)
        assert type(error) is cls and len(flaky.seen) == 1 and sleeps == [] and sc.retries == 0
    assert state.jobs == {}


@both
def test_the_last_attempts_error_is_raised_after_max_retries(asynchronous, state, sleeps):
    error, flaky, sc = call(asynchronous, state, ["refuse"] * 10, models(asynchronous), max_retries=2)
    assert isinstance(error, APIConnectionError) and "Connection refused" in str(error)
    assert len(flaky.seen) == 3 and len(sleeps) == 2 and sc.retries == 2


@both
def test_what_is_never_retried(asynchronous, state, sleeps):
    # Answers that would come again: 400, 409, 500.
    for status, cls in [(400, BadRequestError), (409, ConflictError), (500, InternalServerError)]:
        error, flaky, _ = call(asynchronous, state, [status], certify(asynchronous))
        assert type(error) is cls and len(flaky.seen) == 1
    # Requests that are not safe to repeat: a model upload (a POST without a key), a deletion.
    bundle = b"PK\x05\x06" + b"\0" * 18  # an empty zip; never reaches the server
    if asynchronous:
        async def upload(sc): return await sc.upload_model(bundle)
        async def delete(sc): return await sc.delete_model("digits")
    else:
        def upload(sc): return sc.upload_model(bundle)
        def delete(sc): return sc.delete_model("digits")
    for action in (upload, delete):
        error, flaky, sc = call(asynchronous, state, ["refuse"], action)
        assert isinstance(error, APIConnectionError) and len(flaky.seen) == 1 and sc.retries == 0
    assert sleeps == []


def test_cancel_is_retried(state, sleeps):
    flaky = Flaky(state, [])
    with Client(BASE_URL, transport=flaky) as sc:
        job = sc.certify(TENSOR, model="stuck")
        flaky.faults = ["refuse", 503]
        assert job.cancel().status == "cancelled"
    assert [r.method for r in flaky.seen] == ["POST", "DELETE", "DELETE", "DELETE"] and sc.retries == 2
    # That a repeated cancel (after a lost answer) is harmless on the real API:
    # test_contract.py::test_cancel_twice_answers_the_status.


def test_max_retries_must_be_a_count():
    for bad in (-1, 1.5, None, True):
        with pytest.raises(ValueError, match="max_retries"):
            Client(BASE_URL, max_retries=bad)


# Job.wait rides out an outage


@both
def test_wait_polls_through_an_outage_longer_than_max_retries(asynchronous, state, sleeps):
    outage = ["refuse"] * 6 + [503, "lose", "timeout", 502]

    def wait(sc: Client):
        job = sc.certify(TENSOR, model="digits")
        flaky.faults = list(outage)
        return job.wait(timeout=60)

    async def async_wait(sc: AsyncClient):
        job = await sc.certify(TENSOR, model="digits")
        flaky.faults = list(outage)
        return await job.wait(timeout=60)

    flaky = Flaky(state, [], asynchronous=asynchronous)
    if asynchronous:
        async def run():
            async with AsyncClient(BASE_URL, transport=flaky, max_retries=1) as sc:
                return await async_wait(sc), sc
        status, sc = asyncio.run(run())
    else:
        with Client(BASE_URL, transport=flaky, max_retries=1) as sc:
            status = wait(sc)
    assert status.status == "succeeded" and len(state.jobs) == 1
    assert sc.retries == len(outage)  # 10 retries with max_retries=1: the wait's own budget
    # The backoff grows (0.5 s, 1 s, 2 s, ... times jitter) but, while waiting, never past the
    # poll interval (2 s): uncapped, the 6th try in a row would wait 8 s times [0.5, 1).
    assert 0.25 <= sleeps[0] < 0.5 and 0.5 <= sleeps[1] < 1.0 and all(s <= 2.0 for s in sleeps)


def test_wait_gives_up_at_its_timeout_while_the_server_is_down(state):
    flaky = Flaky(state, [])
    with Client(BASE_URL, transport=flaky) as sc:
        job = sc.certify(TENSOR, model="digits")
        flaky.faults = ["refuse"] * 10_000
        started = time.monotonic()
        with pytest.raises(JobTimeout) as info:
            job.wait(timeout=0.5, poll=0.1)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert isinstance(info.value.__cause__, APIConnectionError) and sc.retries >= 3


def test_wait_without_timeout_gives_up_after_max_outage(state, monkeypatch):
    monkeypatch.setattr(clients._jobs, "MAX_OUTAGE", 0.3)
    flaky = Flaky(state, [])
    with Client(BASE_URL, transport=flaky) as sc:
        job = sc.certify(TENSOR, model="digits")
        flaky.faults = ["refuse"] * 10_000
        started = time.monotonic()
        with pytest.raises(APIConnectionError):
            job.wait(poll=0.05)
    assert 0.3 <= time.monotonic() - started < 2.0


@both
def test_wait_with_max_retries_0_raises_at_once(asynchronous, state, sleeps):
    flaky = Flaky(state, [], asynchronous=asynchronous)

    async def run():
        async with AsyncClient(BASE_URL, transport=flaky, max_retries=0) as sc:
            job = await sc.certify(TENSOR, model="digits")
            flaky.faults = ["refuse"]
            await job.wait(timeout=60)

    if asynchronous:
        with pytest.raises(APIConnectionError):
            asyncio.run(run())
    else:
        with Client(BASE_URL, transport=flaky, max_retries=0) as sc:
            job = sc.certify(TENSOR, model="digits")
            flaky.faults = ["refuse"]
            with pytest.raises(APIConnectionError):
                job.wait(timeout=60)
    assert len(flaky.seen) == 2 and sleeps == []


def test_wait_raises_other_errors_at_once(state, sleeps):
    flaky = Flaky(state, [])
    with Client(BASE_URL, transport=flaky) as sc:
        job = sc.certify(TENSOR, model="digits")
        flaky.faults = [500]
        with pytest.raises(InternalServerError):
            job.wait(timeout=60)
    assert len(flaky.seen) == 2 and sc.retries == 0


# The CLI


def test_the_cli_retries_then_reports_an_unreachable_server(sleeps, capsys):
    seen = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        raise httpx.ConnectError("connection refused")

    assert main(["models", "--server", "http://down:1"], transport=httpx.MockTransport(refuse)) == 1
    assert capsys.readouterr().err == "smoothcert: cannot reach http://down:1: connection refused\n"
    assert len(seen) == 4 and len(sleeps) == 3  # the default max_retries, 3


def test_the_cli_waits_through_an_api_restart(state, sleeps, capsys, tmp_path):
    image = tmp_path / "x.npy"
    np.save(image, np.full((1, 8, 8), 0.5, np.float32))
    flaky = Flaky(state, [None, "refuse", "refuse", "refuse", "refuse", "refuse"])
    code = main(["certify", str(image), "--model", "digits", "--wait", "--json", "--server", BASE_URL], transport=flaky)
    out, err = capsys.readouterr()
    assert code == 0 and '"radius": 0.41' in out and len(state.jobs) == 1, err
    assert [r.method for r in flaky.seen][:6] == ["POST"] + ["GET"] * 5
