"""Real servers for the tests: a private `redis-server` on a free port (no mocks of Redis)."""

from __future__ import annotations

import shutil
import socket

import pytest

# Nothing outside the standard library and pytest at import time: the engine's tests
# (tests/smoothcert) then run where only torch is installed, e.g. on a lent GPU machine.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the tests take it from here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server started for this test session, with append-only persistence as in
    production, stopped at the end."""
    from tests.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on the PATH; `make test` installs it with apt-get")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture()
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def kserve_server(tmp_path_factory):
    """A real Open Inference Protocol v2 server on loopback (KServe's ModelServer), serving
    the exact-answer models of tests/remote_server.py; skipped where kserve is not installed."""
    pytest.importorskip("kserve")
    from tests.remote_server import RemoteServer

    server = RemoteServer(tmp_path_factory.mktemp("kserve"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _private_config(tmp_path, monkeypatch):
    """No test reads or writes the developer's ~/.config/smoothcert (credentials of `up`)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in ("SMOOTHCERT_URL", "SMOOTHCERT_API_KEY"):
        monkeypatch.delenv(name, raising=False)
