"""The real stack for the benchmarks and the reliability scenarios: a private redis-server,
Celery workers and (optionally) uvicorn, started as `smoothcert up` starts them, on free
ports, each in its own process group, all killed by `stop()` (use it as a context manager:
also on Ctrl-C and errors). Redis and the API can be stopped and started again on the same
port (the scenarios of RELIABILITY.md); Redis keeps its append-only file across restarts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.store import Store
from service.up import DEMO_BUNDLE, api_command, redis_command, register_bundle

ROOT = Path(__file__).resolve().parents[1]
ADMIN, USER = "bench-admin-key", "bench-user-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """redis-server (append-only fsynced before every reply, no eviction: as in production;
    `redis_args` are added after redis_command's and override them), the demo model
    registered, then whatever `worker()` and `api()` start."""

    def __init__(self, logs: Path, *, device: str = "cpu", env: dict[str, str] | None = None,
                 redis_args: list[str] | tuple[str, ...] = ()):
        self.logs, self.device = Path(logs), device
        self.redis_args = list(redis_args)
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = ""
        self.redis_url = ""
        self.extra_env = env or {}
        self.redis_port = 0
        self._api_args: tuple[list[str], dict[str, str]] | None = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self, **overrides: str) -> dict[str, str]:
        """The processes' environment: the stack's defaults, then `env` given at start (which
        may replace them, the API keys say), then `overrides`."""
        return {**os.environ, "SMOOTHCERT_REDIS_URL": self.redis_url, "SMOOTHCERT_ADMIN_KEYS": ADMIN,
                "SMOOTHCERT_API_KEYS": USER, "SMOOTHCERT_HEARTBEAT_SECONDS": "1", "SMOOTHCERT_DEVICE": self.device,
                **self.extra_env, **overrides}

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(self.logs / f"{name}.log", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.start_redis()
        store = self.store()
        register_bundle(store, DEMO_BUNDLE)
        store.r.close()

    def start_redis(self) -> None:
        """redis-server on `redis_port` (again, after `stop_redis`: it reloads its
        append-only file); returns once it answers."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on the PATH (apt-get install redis-server)")
        (self.logs / "redis").mkdir(parents=True, exist_ok=True)
        self.spawn("redis", redis_command(binary, self.redis_port, self.logs / "redis", "127.0.0.1", "--save", "",
                                          *self.redis_args), dict(os.environ))
        store = self.store()
        deadline = time.monotonic() + 30
        while not store.ping():
            if time.monotonic() > deadline or self.procs["redis"].poll() is not None:
                raise RuntimeError("redis-server did not start\n" + self.tail())
            time.sleep(0.05)
        store.r.close()

    def stop_redis(self, *, kill: bool = False) -> None:
        """Stop redis-server: SIGTERM (it writes its append-only file and exits, as an
        orchestrator's stop does) or, with `kill`, SIGKILL (what was not yet fsynced is lost)."""
        self.kill("redis", sig=signal.SIGKILL if kill else signal.SIGTERM)

    def store(self) -> Store:
        return Store.from_url(self.redis_url)

    def worker(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        """A Celery worker running `args` (a command line such as service.up.worker_command's)."""
        return self.spawn(name, args, self.env(**env))

    def api(self, extra_args: list[str] = (), workers: int | None = None, **env: str) -> str:
        """uvicorn serving the API; returns its URL once /v2/health/ready answers 200."""
        port = free_port()
        self._api_args = ([*api_command("127.0.0.1", port, workers), *extra_args], self.env(**env))
        self.url = f"http://127.0.0.1:{port}"
        return self.start_api()

    def start_api(self) -> str:
        """(Re)start the API `api()` configured, on the same port; returns once it is ready."""
        if self._api_args is None:
            raise RuntimeError("call api() first")
        self.spawn("api", *self._api_args)
        self.wait(lambda: _ready(self.url), 120, "the API to become ready")
        return self.url

    def wait(self, predicate, seconds: float, what: str) -> None:
        """Poll `predicate` until true; fail (with the logs) when a process dies or time runs out."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n" + self.tail())
            if predicate():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {seconds} s waiting for {what}\n" + self.tail())

    def tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in self.logs.glob("*.log"))

    def kill(self, name: str, sig: signal.Signals = signal.SIGTERM) -> None:
        """Signal the process group of `name` (SIGTERM: then SIGKILL after 20 s) and reap it."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.kill(name)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
