"""Fixtures: a fresh fake server per test, and SDK clients wired to it in process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from clients import AsyncClient, Client

from .fake_server import FakeState, create_app, sync_transport

BASE_URL = "http://testserver"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own server settings must not leak into the tests.
    monkeypatch.delenv("SMOOTHCERT_URL", raising=False)
    monkeypatch.delenv("SMOOTHCERT_API_KEY", raising=False)


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def transport(state: FakeState) -> httpx.MockTransport:
    return sync_transport(create_app(state))


@pytest.fixture
def client(transport: httpx.MockTransport) -> Iterator[Client]:
    with Client(BASE_URL, transport=transport) as c:
        yield c


def async_client(state: FakeState, **kwargs) -> AsyncClient:
    """An AsyncClient on the fake app through httpx's own ASGITransport."""
    return AsyncClient(BASE_URL, transport=httpx.ASGITransport(app=create_app(state)), **kwargs)
