"""`smoothcert up`: the whole stack on one machine, for a laptop or a demo; and
`smoothcert register-model`, which provisions the registry of any stack.

Starts, in order: a private `redis-server` (if none answers at SMOOTHCERT_REDIS_URL, or if
the one that answers by default would not keep memory commits: `service.durability`), one
Celery worker on its device's queues (SMOOTHCERT_DEVICE, else CUDA when torch sees one), and
uvicorn, which routes jobs to that device only (SMOOTHCERT_QUEUE_DEVICES); registers the
bundled demo model; generates an admin and a user API key, prints them and writes them (with
the URL) to the credentials file the client CLI reads. Ctrl-C stops everything it started.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from service.config import Settings
from service.durability import durability_problems
from service.queue import cuda_visible, device_type, worker_queues
from service.store import Store
from smoothcert.archive import inspect_bundle, read_bundle_files, zip_bundle

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "models" / "digits"


def credentials_path() -> Path:
    """Where `up` leaves the URL and keys for the client CLI (clients/_base.py reads it)."""
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "smoothcert" / "credentials.json"


def register(subparsers) -> None:
    """Add `up` to the `smoothcert` command line (entry point group smoothcert.commands)."""
    up = subparsers.add_parser("up", help="run Redis, a worker and the API locally, with the demo model")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--redis-url", default=None, help="default: SMOOTHCERT_REDIS_URL or redis://127.0.0.1:6379/0")
    up.add_argument("--state-dir", default=".smoothcert", help="private Redis data and logs")
    up.add_argument("--no-keys", action="store_true", help="run the API open, without API keys")
    up.add_argument("--model", action="append", default=[], metavar="BUNDLE",
                    help="register this bundle too (directory or .zip); the demo model always is")
    up.set_defaults(run=run)
    reg = subparsers.add_parser(
        "register-model", help="put bundles into the registry at SMOOTHCERT_REDIS_URL (operators)",
        description="Register bundles (directories or .zip) directly in Redis, under their model.json "
                    "names; for provisioning (docker compose's `models` service). Over HTTP, admins "
                    "use POST /v1/models instead.")
    reg.add_argument("bundles", nargs="+", metavar="BUNDLE")
    reg.set_defaults(run=run_register)


def run_register(args: argparse.Namespace) -> int:
    settings = Settings()
    store = Store.from_url(settings.redis_url, prefix=settings.key_prefix)
    for bundle in args.bundles:
        name = register_bundle(store, bundle)
        print(f"registered {name} ({store.get_model(name).digest}) from {bundle}")
    return 0


def register_bundle(store: Store, source: str | os.PathLike) -> str:
    """Put a bundle (directory or zip) into the registry under its model.json name."""
    data = zip_bundle(source) if Path(source).is_dir() else Path(source).read_bytes()
    spec, _, digest = inspect_bundle(read_bundle_files(data))
    store.put_model(spec.name, digest, spec.to_json(), data)
    return spec.name


WORKER_THREADS = 8  # jobs one CPU worker runs at once (docker-compose.yml: 8 CPU, 16 CUDA)


def worker_command(name: str, device: str = "cpu") -> list[str]:
    """One Celery worker on the queues of `device` (a device type) and no other, its jobs as
    threads of one process so that their forward passes merge (smoothcert.batching), as
    docker-compose.yml runs it."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--loglevel=INFO",
            "-Q", worker_queues(device), "--pool=threads", f"--concurrency={WORKER_THREADS}", "-n", name]


def worker_device() -> str:
    """The device type `up`'s worker runs on: SMOOTHCERT_DEVICE's, else "cuda" when torch sees a
    CUDA device (asked in a child process: nothing here imports torch), else "cpu"."""
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
    workers = workers or Settings().api_workers
    return [sys.executable, "-m", "uvicorn", "service.main:app", "--host", host, "--port", str(port),
            "--workers", str(workers), "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_SECONDS)]


def _redis_answers(url: str) -> bool:
    return Store.from_url(url).ping()


def _free_local_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


def choose_redis(url: str, explicit: bool, state: Path, procs: list) -> str:
    """The Redis `up` uses: the one at `url` if it answers and keeps memory commits; a private
    one otherwise (at `url` when nothing answers there; on a free port when the default URL
    answers with a Redis that would lose commits, e.g. a distribution's with appendonly no).
    A Redis named explicitly is used as it is, with a warning: its memory jobs will fail with
    memory_unavailable until it is configured."""
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
    ))
    for _ in range(100):
        if _redis_answers(url):
            return
        time.sleep(0.1)
    sys.exit(f"smoothcert up: the private redis-server did not answer at {url}; see {state / 'redis.log'}")


def _wait_ready(url: str, procs: list, seconds: float = 120) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    explicit = bool(args.redis_url or os.environ.get("SMOOTHCERT_REDIS_URL"))
    redis_url = args.redis_url or Settings().redis_url
    keys = {} if args.no_keys else {"admin_key": secrets.token_urlsafe(24), "api_key": secrets.token_urlsafe(24)}
    procs: list[subprocess.Popen] = []
    # Explicit handlers: a shell may start us with SIGINT ignored, and SIGTERM (docker stop,
    # systemd) must stop the children as Ctrl-C does.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        redis_url = choose_redis(redis_url, explicit, state, procs)
        # One worker: the API declares its device alone, so no job waits on a queue nobody reads.
        device = worker_device()
        env = dict(os.environ, SMOOTHCERT_REDIS_URL=redis_url, SMOOTHCERT_QUEUE_DEVICES=device)
        if keys:
            env["SMOOTHCERT_ADMIN_KEYS"], env["SMOOTHCERT_API_KEYS"] = keys["admin_key"], keys["api_key"]
        store = Store.from_url(redis_url, prefix=Settings().key_prefix)
        names = [register_bundle(store, b) for b in [DEMO_BUNDLE, *args.model]]
        procs.append(subprocess.Popen(
            worker_command("smoothcert-up@%h", device),
            env=env | {"SMOOTHCERT_DEVICE": Settings().device or device}, cwd=ROOT,
            stdout=open(state / "worker.log", "ab"), stderr=subprocess.STDOUT,
        ))
        procs.append(subprocess.Popen(
            api_command(args.host, args.port),
            env=env, cwd=ROOT, stdout=open(state / "api.log", "ab"), stderr=subprocess.STDOUT,
        ))
        url = f"http://{args.host}:{args.port}"
        if not _wait_ready(url, procs):
            print(f"smoothcert up: the stack did not become ready; logs in {state}", file=sys.stderr)
            return 1
        path = credentials_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"url": url, **keys}, indent=2))
        path.chmod(0o600)
        print(f"smoothcert is up at {url} (docs: {url}/docs), models: {', '.join(names)}")
        if keys:
            print(f"  admin key: {keys['admin_key']}\n  user key:  {keys['api_key']}")
        print(f"  credentials for the CLI: {path}\n  logs: {state}\n"
              f"  try: smoothcert certify examples/digit-7.png --model digits --wait\n  Ctrl-C stops it.")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        print("smoothcert up: a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
