"""Error mapping and lenient parsing, against canned responses (httpx.MockTransport), one
attempt each (`max_retries=0`: test_retries.py has the retries)."""

from __future__ import annotations

import asyncio
import email.utils
import time

import httpx
import pytest

import clients
from clients import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    Client,
    InternalServerError,
    RateLimitError,
    ServiceUnavailableError,
    SmoothcertError,
)

from .conftest import BASE_URL

ERROR_BODY = {"error": {"code": "some_code", "message": "what went wrong"}}
BY_STATUS = [
    (400, clients.BadRequestError), (401, clients.AuthenticationError), (403, clients.PermissionDeniedError),
    (404, clients.NotFoundError), (409, clients.ConflictError), (413, clients.PayloadTooLargeError),
    (422, clients.UnprocessableEntityError), (429, RateLimitError), (500, InternalServerError),
    (502, InternalServerError), (503, ServiceUnavailableError), (418, APIStatusError),
]


def canned(*args, **kwargs) -> httpx.MockTransport:
    """A transport answering every request with httpx.Response(*args, **kwargs)."""
    return httpx.MockTransport(lambda request: httpx.Response(*args, **kwargs))


@pytest.mark.parametrize(("status", "cls"), BY_STATUS)
def test_each_status_raises_its_class(status, cls):
    with Client(BASE_URL, max_retries=0, transport=canned(status, json=ERROR_BODY)) as sc, pytest.raises(cls) as info:
        sc.model("digits")
    err = info.value
    assert type(err) is cls and isinstance(err, APIStatusError) and isinstance(err, SmoothcertError)
    assert (err.status_code, err.code, err.message) == (status, "some_code", "what went wrong")
    assert err.response.status_code == status and "what went wrong" in str(err)


@pytest.mark.parametrize(("status", "cls"), BY_STATUS)
def test_the_async_client_raises_the_same(status, cls):
    async def call() -> None:
        async with AsyncClient(BASE_URL, max_retries=0, transport=canned(status, json=ERROR_BODY)) as sc:
            await sc.models()

    with pytest.raises(cls) as info:
        asyncio.run(call())
    assert type(info.value) is cls and info.value.code == "some_code"


def test_every_5xx_is_an_internal_server_error():
    assert issubclass(ServiceUnavailableError, InternalServerError)


@pytest.mark.parametrize(("response", "code", "message"), [
    (httpx.Response(404, json={"detail": "Not Found"}), None, "Not Found"),
    (httpx.Response(422, json={"detail": [{"loc": ["body", "sigma"], "msg": "must be > 0"},
                                          {"loc": ["query", "wait"], "msg": "≤ 30"}]}),
     None, "sigma: must be > 0; query.wait: ≤ 30"),
    (httpx.Response(502, text="<html>Bad Gateway</html>"), None, "<html>Bad Gateway</html>"),
    (httpx.Response(500), None, "Internal Server Error"),
    (httpx.Response(400, json={"error": {"code": "bad"}}), "bad", "bad"),
])
def test_fastapi_and_proxy_error_bodies(response, code, message):
    with Client(BASE_URL, max_retries=0, transport=httpx.MockTransport(lambda r: response)) as sc, \
            pytest.raises(APIStatusError) as info:
        sc.models()
    assert (info.value.code, info.value.message) == (code, message)


def test_rate_limit_carries_retry_after():
    with Client(BASE_URL, max_retries=0, transport=canned(429, json=ERROR_BODY, headers={"Retry-After": "7"})) as sc, \
            pytest.raises(RateLimitError) as info:
        sc.models()
    assert info.value.retry_after == 7.0
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    with Client(BASE_URL, max_retries=0, transport=canned(429, headers={"Retry-After": date})) as sc, \
            pytest.raises(RateLimitError) as info:
        sc.models()
    assert 50 < info.value.retry_after <= 60


@pytest.mark.parametrize(("raised", "cls"), [(httpx.ConnectError("refused"), APIConnectionError),
                                             (httpx.ReadTimeout("slow"), APITimeoutError)])
def test_network_failures(raised, cls):
    def fail(request: httpx.Request) -> httpx.Response:
        raise raised

    with Client(BASE_URL, max_retries=0, transport=httpx.MockTransport(fail)) as sc, pytest.raises(cls):
        sc.health()


def test_a_2xx_that_is_not_json_is_a_clear_error():
    with Client(BASE_URL, max_retries=0, transport=canned(200, text="<html>login</html>")) as sc, \
            pytest.raises(SmoothcertError, match="not JSON"):
        sc.models()


def test_odd_job_bodies_are_read_leniently():
    body = {"status": "failed", "progress": {"stage": "estimation", "samples_done": 5, "samples_total": 0,
                                             "eta": 3}, "error": "worker lost", "result": "n/a", "new": 1}
    with Client(BASE_URL, max_retries=0, transport=canned(200, json=body)) as sc:
        status = sc.job("j-9").status()
    assert (status.id, status.status, status.result, status.raw["new"]) == ("j-9", "failed", None, 1)
    assert status.progress.extra == {"eta": 3} and status.progress.fraction is None
    assert status.error.message == "worker lost"
    with Client(BASE_URL, max_retries=0, transport=canned(200, json={"id": "j", "status": "succeeded", "result": {
            "prediction": None, "model": "digits", "memory": False}})) as sc:
        cert = sc.job("j").status().result
    assert cert.abstained and cert.model.name == "digits" and cert.memory.used is False


def test_long_polls_extend_the_http_timeout():
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "j", "status": "succeeded"})

    with Client(BASE_URL, timeout=10, transport=httpx.MockTransport(handle)) as sc:
        sc.job("j").wait(poll=25)
        sc.job("j").status()
    assert seen[0].url.params["wait"] == "25" and seen[0].extensions["timeout"]["read"] == 35
    assert "wait" not in seen[1].url.params and seen[1].extensions["timeout"]["read"] == 10


def test_cancel_with_an_empty_answer_reads_the_status():
    def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, json={"id": "j", "status": "cancelled"})

    with Client(BASE_URL, max_retries=0, transport=httpx.MockTransport(handle)) as sc:
        assert sc.job("j").cancel().status == "cancelled"
