"""`smoothcert up`: the whole stack on one machine, for a laptop or a demo; and
`smoothcert register-model`, which provisions the registry of any stack.

Starts, in order: a private `redis-server` (if none answers at SMOOTHCERT_REDIS_URL, or if
the one that answers by default would not keep memory commits: `service.durability`), one
Celery worker on its device's queues (SMOOTHCERT_DEVICE, else CUDA when torch sees one), and
uvicorn, which routes jobs to that device only (SMOOTHCERT_QUEUE_DEVICES); registers the
bundled demo model; generates an admin and a user API key, prints them and writes them (with
the URL) to the credentials file the client CLI reads.

Guarantees:
- One `up` per state folder: it holds an exclusive `flock` on STATE/up.lock (with its pid)
  while it runs; the OS drops the lock when it dies, so a killed `up` leaves none behind.
  A second `up` on the same folder, or on an API port that already answers, refuses to
  start, says why (the pid, or the port) and touches nothing.
- The credentials file is written only once this stack is ready, never over the credentials
  of another stack that still answers.
- Ctrl-C or SIGTERM stops everything it started (the API and the worker, then Redis; each
  child in its own process group, killed with it after a grace period), with one line and
  no traceback; a second Ctrl-C kills at once.
Nothing heavy is imported until a command runs (no torch ever; no Redis, Celery or pydantic
for `smoothcert --help`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from service.store import Store

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "models" / "digits"
# Registered beside it: MNIST's standard demo model and its σ selector (docs/mnist.md).
DEMO_BUNDLES = (DEMO_BUNDLE, ROOT / "models" / "mnist", ROOT / "models" / "mnist-selector")
LOCK_FILE = "up.lock"
STOP_SECONDS = 10  # what a child gets to stop on SIGTERM before it is killed (a worker ends its jobs)


def credentials_path() -> Path:
    """Where `up` leaves the URL and keys for the client CLI (clients/_base.py reads it)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "smoothcert" / "credentials.json"


def register(subparsers) -> None:
    """Add `up` to the `smoothcert` command line (entry point group smoothcert.commands)."""
    up = subparsers.add_parser(
        "up", help="run Redis, a worker and the API locally, with the demo model",
        description="Run the whole stack on this machine: a private, durable redis-server unless a durable "
                    "one answers, one worker on this machine's device, the API and the demo models "
                    "`digits`, `mnist` and `mnist-selector`. Fresh API keys are printed and saved, with the URL, "
                    f"in {credentials_path()}, "
                    "where the client commands and the SDK find them. It refuses to start when the API "
                    "port already answers or another `up` holds the state folder. Ctrl-C or SIGTERM stops "
                    "everything it started.")
    up.add_argument("--host", default="127.0.0.1",
                    help="interface the API listens on (default 127.0.0.1: this machine only; 0.0.0.0: all)")
    up.add_argument("--port", type=int, default=8000,
                    help="the API's port (default 8000); refused when something already answers there")
    up.add_argument("--redis-url", default=None, help="default: SMOOTHCERT_REDIS_URL or redis://127.0.0.1:6379/0")
    up.add_argument("--state-dir", default=".smoothcert",
                    help="private Redis data, logs and the lock of this stack (default .smoothcert); "
                         "one `up` per folder")
    up.add_argument("--no-keys", action="store_true", help="run the API open, without API keys")
    up.add_argument("--model", action="append", default=[], metavar="BUNDLE",
                    help="register this bundle too (directory or .zip); the demo model always is")
    up.set_defaults(run=run)
    reg = subparsers.add_parser(
        "register-model", help="put bundles into the registry at SMOOTHCERT_REDIS_URL (operators)",
        description="Register bundles (directories or .zip) directly in Redis, under their model.json "
                    "names; for provisioning (docker compose's `models` service). Over HTTP, admins "
                    "use POST /v1/models (`smoothcert models upload`) instead.")
    reg.add_argument("bundles", nargs="+", metavar="BUNDLE")
    reg.set_defaults(run=run_register)


def run_register(args: argparse.Namespace) -> int:
    from service.config import Settings
    from service.store import Store

    settings = Settings()
    store = Store.from_url(settings.redis_url, prefix=settings.key_prefix)
    for bundle in args.bundles:
        name = register_bundle(store, bundle)
        print(f"registered {name} ({store.get_model(name).digest}) from {bundle}")
    return 0


def register_bundle(store: Store, source: str | os.PathLike) -> str:
    """Put a bundle (directory or zip) into the registry under its model.json name."""
    from smoothcert.archive import inspect_bundle, read_bundle_files, zip_bundle

    data = zip_bundle(source) if Path(source).is_dir() else Path(source).read_bytes()
    spec, _, digest = inspect_bundle(read_bundle_files(data))
    store.put_model(spec.name, digest, spec.to_json(), data)
    return spec.name


WORKER_THREADS = 8  # jobs one CPU worker runs at once (docker-compose.yml: 8 CPU, 16 CUDA)


def worker_command(name: str, device: str = "cpu") -> list[str]:
    """One Celery worker on the queues of `device` (a device type) and no other, its jobs as
    threads of one process so that their forward passes merge (smoothcert.batching), as
    docker-compose.yml runs it."""
    from service.queue import worker_queues

    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--loglevel=INFO",
            "-Q", worker_queues(device), "--pool=threads", f"--concurrency={WORKER_THREADS}", "-n", name]


def worker_device() -> str:
    """The device type `up`'s worker runs on: SMOOTHCERT_DEVICE's, else "cuda" when torch sees a
    CUDA device (asked in a child process: nothing here imports torch), else "cpu"."""
    from service.config import Settings
    from service.queue import cuda_visible, device_type

    configured = Settings().device
    if configured:
        return device_type(configured)
    return "cuda" if cuda_visible() else "cpu"


# A stop waits this long for open requests, then closes them: a long-poll (?wait= up to 30 s)
# must not hold a restart past an orchestrator's grace period (Docker's: 10 s). The SDK
# retries a poll whose connection was closed (RELIABILITY.md, API restart).
GRACEFUL_SHUTDOWN_SECONDS = 5


def api_command(host: str, port: int, workers: int | None = None) -> list[str]:
    """uvicorn serving the API with `workers` processes (default SMOOTHCERT_API_WORKERS), as
    docker-compose.yml runs it; the benchmarks run this too."""
    from service.config import Settings

    workers = workers or Settings().api_workers
    return [sys.executable, "-m", "uvicorn", "service.main:app", "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_SECONDS)]


def _redis_answers(url: str) -> bool:
    from service.store import Store

    return Store.from_url(url).ping()


def _free_local_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def choose_redis(url: str, explicit: bool, state: Path, procs: list) -> str:
    """The Redis `up` uses: the one at `url` if it answers and keeps memory commits; a private
    one otherwise (at `url` when nothing answers there; on a free port when the default URL
    answers with a Redis that would lose commits, e.g. a distribution's with appendonly no).
    A Redis named explicitly is used as it is, with a warning: its memory jobs will fail with
    memory_unavailable until it is configured."""
    from service.config import Settings
    from service.durability import durability_problems
    from service.store import Store

    if not _redis_answers(url):
        _start_redis(url, state, procs)
        return url
    problems = durability_problems(Store.from_url(url).r, check=Settings().memory_durability_check)
    if not problems:
        return url
    if explicit:
        print(f"smoothcert up: warning: the Redis at {url} would not keep memory commits "
              f"({'; '.join(problems)}); certifications with the memory will fail", file=sys.stderr)
        return url
    private = _free_local_url()
    print(f"smoothcert up: the Redis at {url} would not keep memory commits ({'; '.join(problems)}); "
          f"starting a private one at {private}")
    _start_redis(private, state, procs)
    return private


def redis_command(binary: str, port: int, folder: Path, host: str = "127.0.0.1", *extra: str) -> list[str]:
    """redis-server as smoothcert needs it (docs/deployment.md): append-only persistence in `folder`,
    fsynced before every reply (`appendfsync always`), and no eviction. An acknowledged memory
    commit then survives a crash of Redis or of its machine; with Redis' default `everysec` a
    crash loses up to the last second of them, and an evicted entry breaks consistency
    silently. `service.durability` refuses a server without these settings. `up`, the benchmark
    and reliability stacks, and the tests' servers all start it with this; `extra` comes last
    and so overrides (redis-server takes the last value of a repeated option)."""
    return [binary, "--port", str(port), "--bind", host, "--dir", str(folder), "--appendonly", "yes",
            "--appendfsync", "always", "--maxmemory-policy", "noeviction", *extra]


def _start_redis(url: str, state: Path, procs: list) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(f"smoothcert up: nothing answers at {url} and redis-server is not installed")
    parsed = urlparse(url)
    (state / "redis").mkdir(parents=True, exist_ok=True)
    procs.append(subprocess.Popen(
        redis_command(binary, parsed.port or 6379, state / "redis", parsed.hostname or "127.0.0.1"),
        stdout=open(state / "redis.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C in the terminal reaches `up` alone: it stops Redis last
    ))
    for _ in range(100):
        if _redis_answers(url):
            return
        time.sleep(0.1)
    sys.exit(f"smoothcert up: the private redis-server did not answer at {url}; see {state / 'redis.log'}")


class _StopRequest:
    """The signal handler of `up`: it records SIGINT/SIGTERM and never raises, so a stop can
    never land between a child's start and its bookkeeping; `up` checks it at safe points.
    A second signal asks for a forced stop (kill at once)."""

    def __init__(self) -> None:
        self.signals: list[str] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.signals.append(signal.Signals(signum).name)

    @property
    def requested(self) -> bool:
        return bool(self.signals)

    @property
    def forced(self) -> bool:
        return len(self.signals) > 1


class _Refused(Exception):
    """`up` will not start: the message says why and what to do."""


def _hold_state(state: Path) -> int:
    """Take STATE/up.lock (an exclusive flock, with this pid in it) and return its descriptor,
    held until this process exits; _Refused names the pid of the `up` that holds it."""
    import fcntl

    path = state / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise _Refused(f"another `smoothcert up` (pid {holder}) is running on the state folder {state}; "
                       f"stop it (Ctrl-C where it runs, or kill {holder}), or give this one its own "
                       "--state-dir and --port") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _port_answers(host: str, port: int) -> bool:
    """Whether something accepts connections at the API's address (0.0.0.0 and :: checked
    on loopback)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=1):
            return True
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/live", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _wait_ready(url: str, procs: list, stop: _StopRequest, seconds: float = 120) -> str:
    """"ready", "exited" (a child died), "stopped" (a signal) or "timeout"."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if stop.requested:
            return "stopped"
        if any(p.poll() is not None for p in procs):
            return "exited"
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return "ready"
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return "timeout"


def save_credentials(url: str, keys: dict[str, str]) -> Path | None:
    """Write {"url", "admin_key", "api_key"} to the credentials file, readable by this user
    only from its first byte, replaced atomically. Returns None, writing nothing, when the
    file holds another stack's URL and that stack answers (its users keep their keys)."""
    path = credentials_path()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    other = saved.get("url") if isinstance(saved, dict) else None
    if other and other != url and _answers(other):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"url": url, **keys}, indent=2) + "\n")
    os.replace(partial, path)
    return path


def _spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Its own session: a terminal's Ctrl-C reaches `up` alone, which stops the children in
    # order, and killing the group also kills what the child started (uvicorn's workers).
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    if proc.poll() is None:  # not reaped: its pid, and so its group, is still its own
        try:
            os.killpg(proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(signum)


def _stop_all(procs: list[subprocess.Popen], names: list[str], stop: _StopRequest) -> None:
    """Stop the API and the worker, then Redis (the worker may need it to end its jobs): SIGTERM
    to each group, SIGKILL after STOP_SECONDS or at once on a second signal."""
    others = [p for p, n in zip(procs, names, strict=True) if n != "Redis"]
    redis = [p for p, n in zip(procs, names, strict=True) if n == "Redis"]
    for group in (others, redis):
        for p in group:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for p in group:
            while p.poll() is None and time.monotonic() < deadline and not stop.forced:
                time.sleep(0.1)
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
                p.wait()


def run(args: argparse.Namespace) -> int:
    stop = _StopRequest()
    # Our own handlers: a shell may start us with SIGINT ignored, SIGTERM (docker stop,
    # systemd) must stop the children as Ctrl-C does, and neither may raise mid-step.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    state = Path(args.state_dir).resolve()
    url = f"http://{args.host}:{args.port}"
    try:
        state.mkdir(parents=True, exist_ok=True)
        lock = _hold_state(state)
        if _port_answers(args.host, args.port):
            raise _Refused(f"something already answers on {args.host}:{args.port} (another stack? {url}/docs); "
                           "stop it, or choose another port with --port")
    except (_Refused, OSError) as e:
        print(f"smoothcert up: not started: {e}", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen] = []
    names: list[str] = []
    try:
        return _run(args, state, url, stop, procs, names)
    except SystemExit as e:  # _start_redis's refusals
        print(e.code if isinstance(e.code, str) else "smoothcert up: stopping", file=sys.stderr)
        return 1
    finally:
        names += ["Redis"] * (len(procs) - len(names))  # a Redis started before a failure
        _stop_all(procs, names, stop)
        os.close(lock)
        how = f" on {stop.signals[0]}" if stop.requested else ""
        print(f"smoothcert up: stopped{how}" + (f" ({', '.join(reversed(names))})" if names else ""),
              file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, state: Path, url: str, stop: _StopRequest,
         procs: list[subprocess.Popen], names: list[str]) -> int:
    from service.config import Settings
    from service.store import Store

    explicit = bool(args.redis_url or os.environ.get("SMOOTHCERT_REDIS_URL"))
    redis_url = choose_redis(args.redis_url or Settings().redis_url, explicit, state, procs)
    names += ["Redis"] * len(procs)
    keys = {} if args.no_keys else {"admin_key": secrets.token_urlsafe(24), "api_key": secrets.token_urlsafe(24)}
    # One worker: the API declares its device alone, so no job waits on a queue nobody reads.
    device = worker_device()
    env = dict(os.environ, SMOOTHCERT_REDIS_URL=redis_url, SMOOTHCERT_QUEUE_DEVICES=device)
    if keys:
        env["SMOOTHCERT_ADMIN_KEYS"], env["SMOOTHCERT_API_KEYS"] = keys["admin_key"], keys["api_key"]
    store = Store.from_url(redis_url, prefix=Settings().key_prefix)
    models = [register_bundle(store, b) for b in [*DEMO_BUNDLES, *args.model]]
    if stop.requested:
        return 0
    procs.append(_spawn(worker_command("smoothcert-up@%h", device),
                        env | {"SMOOTHCERT_DEVICE": Settings().device or device}, state / "worker.log"))
    names.append("worker")
    procs.append(_spawn(api_command(args.host, args.port), env, state / "api.log"))
    names.append("API")
    print(f"smoothcert up: starting at {url} (logs in {state})", flush=True)
    outcome = _wait_ready(url, procs, stop)
    if outcome == "stopped":
        return 0
    if outcome != "ready":
        dead = [f"{n} ({state / (n.lower() + '.log')})" for p, n in zip(procs, names, strict=True)
                if p.poll() is not None]
        why = f"exited: {', '.join(dead)}" if dead else "did not become ready in 120 s"
        print(f"smoothcert up: the stack did not start, {why}; logs in {state}", file=sys.stderr)
        return 1
    path = save_credentials(url, keys)  # only now, and only by the `up` that holds the lock
    print(f"smoothcert is up at {url} (docs: {url}/docs), models: {', '.join(models)}")
    if keys:
        print(f"  admin key: {keys['admin_key']}\n  user key:  {keys['api_key']}")
    if path is not None:
        print(f"  credentials for the CLI and the SDK: {path}")
    else:
        print(f"  {credentials_path()} was left as it is: it holds the keys of another stack, which is "
              f"running; use this one with --server {url} --key KEY (or $SMOOTHCERT_URL and $SMOOTHCERT_API_KEY)")
    print(f"  logs: {state}\n  try: smoothcert certify examples/digit-7.png --model digits --wait\n"
          "       smoothcert certify examples/mnist-3.png --model mnist-selector --wait\n"
          "  Ctrl-C stops it.", flush=True)
    while not stop.requested:
        dead = [n for p, n in zip(procs, names, strict=True) if p.poll() is not None]
        if dead:
            print(f"smoothcert up: the {', '.join(dead)} exited (see {state}); stopping", file=sys.stderr)
            return 1
        time.sleep(0.5)
    return 0
