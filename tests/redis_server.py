"""A private redis-server on a free port, configured as in production (service.up.redis_command:
append-only, fsynced before every reply, no eviction): the test session's server (conftest.py),
and the servers the outage tests stop and start again on the same port.

Its data stays under pytest's tmp_path, on disk: `appendfsync always` there slowed the service
tests by about a tenth and the worker tests not measurably (BENCHMARKS.md, section 5), too
little for a tmpfs folder."""

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

    def __init__(self, folder: Path, *extra: str, config_file: Path | None = None):
        """`extra`: more redis-server options, after (so overriding) redis_command's;
        `config_file`: a redis.conf read first (for directives the command line may refuse)."""
        self.folder = folder
        self.extra, self.config_file = extra, config_file
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not on the PATH"
        command = redis_command(binary, self.port, self.folder, "127.0.0.1", "--save", "", *self.extra)
        if self.config_file is not None:
            command.insert(1, str(self.config_file))  # redis-server takes it as its first argument only
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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
