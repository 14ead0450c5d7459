"""A private redis-server on a free port, with append-only persistence as in production: the
test session's server (conftest.py), and the servers the outage tests stop and start again on
the same port."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from service.up import redis_command
from tests.conftest import free_port


class RedisServer:
    """redis-server on a free port, state in `folder`; `stop()` (SIGTERM: it writes its
    append-only file) and `start()` again reload it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not on the PATH"
        self.proc = subprocess.Popen(redis_command(binary, self.port, self.folder, "127.0.0.1", "--save", ""),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
