"""The HTTP API under load, against the real stack: redis-server, a Celery worker, uvicorn.

The stack is started as `smoothcert up` starts it (the uvicorn and worker command lines of
`service.up`, SMOOTHCERT_API_WORKERS processes), on free ports, with a private Redis, the demo
model registered and API keys set; every process is killed at exit (also on Ctrl-C, errors).

1. Submission load: `--clients` asyncio clients, one keep-alive connection each, submit
   certifications of the demo model (`models/digits`, the ten `examples/digit-*.png` as JSON
   `image_b64`; small jobs, `--n0`/`--n`, so that completing them takes minutes, not hours),
   each with an `Idempotency-Key` (a lost connection or a 5xx/429 is retried with it). Every
   `--poll-every`-th submission a client also polls (GET) its oldest unfinished job. Phases:
   - warm-up: one submission per client, not measured (the first requests of a fresh API
     pay for connections, pools and lazy imports);
   - paced: `--paced-jobs` submissions offered at `--rate` per second in all (the target),
     each client on a fixed schedule; latency runs from the scheduled send time, so a server
     that falls behind is charged for the wait (no coordinated omission). The p99 target is
     judged here: the latency clients see at the target rate;
   - saturation: `--jobs` submissions back to back (or `--duration` seconds): the throughput
     target. Its latency is reported too, but with 100 clients and no pause it is ~100 /
     throughput by Little's law, whatever the server does;
   - completion: each client polls its unfinished jobs until they end, `--drain` s at most.
   Submission is measured apart from completion: the worker is up but consumes nothing
   until the measured phases end (Celery remote control), then works the queue off. On a
   small machine a busy worker takes 0.3-0.7 of a core from the API (in a deployment it has
   cores of its own); `--worker-during-submit` lets it run all along to measure them together.
   A lost job is a submission answered 202 that never reached a terminal state within the
   bound, disappeared, or that the store counted but no client was told of.
   Reported per phase: submissions/s, submit and poll latency p50/p95/p99/max, answers by
   status, and the CPU each process used (the load generator's included: on a small machine
   it competes with the server it measures; `other` is everything else on the machine).
2. Overhead: one n = 100,000 certification of examples/digit-7.png (fixed seed), submitted,
   then long-polled (`GET ...?wait=30`, repeated until it ends), after a warm-up job that
   loads the model into the worker. overhead = (submit→result wall time − the certificate's
   engine `seconds`) / wall time, median of `--repeats`. For reference, the same for an
   in-process `Certifier.certify` call at the worker's batch size.

3. `--compare-fsync`: the submission load (1.) twice, each on a fresh stack, once with Redis'
   `--appendfsync always` (fsync before every reply: production, service.up.redis_command)
   and once with `--appendfsync everysec`, otherwise identical; `--fsync-rounds` pairs, the
   order alternating. Prints the ratio always / everysec of the saturation submissions/s
   (median over rounds) as an INFO line, and the filesystem of Redis' data folder (`df -T`):
   what an fsync costs depends on it. No overhead phase.

Targets: ≥ 500 submissions/s, p99 submit latency ≤ 250 ms, no lost jobs, overhead ≤ 5 %.
The client is a minimal HTTP/1.1 client on asyncio streams (`--client raw`, the default;
uvloop when installed): ~10 µs of CPU per request where `--client httpx` (httpx.AsyncClient)
takes several times that (compare the "load generator" CPU). The exit code is 0 whatever the
outcome: this is a measurement, not a test.

    python benchmarks/api.py
    python benchmarks/api.py --jobs 2000 --paced-jobs 1000 --json /tmp/api.json
    python benchmarks/api.py --skip-overhead --worker-during-submit --client httpx
    python benchmarks/api.py --compare-fsync --jobs 2000 --paced-jobs 1000 --json /tmp/fsync.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import stack
from benchmarks.machine import cpu_model
from benchmarks.stack import USER
from service.store import TERMINAL, Store
from service.up import DEMO_BUNDLE, worker_command

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TARGET_RATE = 500.0  # accepted submissions per second
TARGET_P99_MS = 250.0
TARGET_OVERHEAD = 0.05
OVERHEAD_N = 100_000
OVERHEAD_SEED = 7
LONG_POLL_SECONDS = 30
WORKER_NAME = "bench@%h"


# --- the stack ------------------------------------------------------------------------


class Stack(stack.Stack):
    """The shared benchmark stack (benchmarks/stack.py) with one worker and uvicorn."""

    def __init__(self, logs: Path, *, api_workers: int | None, device: str, uvicorn_args: list[str],
                 redis_args: list[str] | tuple[str, ...] = ()):
        super().__init__(logs, device=device, redis_args=redis_args)
        self.api_workers, self.uvicorn_args = api_workers, uvicorn_args

    def start(self) -> None:
        super().start()
        self.worker("worker", worker_command(WORKER_NAME))
        self.api(self.uvicorn_args, workers=self.api_workers)

    def consume(self, queue: str, on: bool) -> None:
        """Start or stop the worker's consumption of `queue` (Celery remote control)."""
        from celery import Celery

        control = Celery("bench-control", broker=self.redis_url)
        try:
            node = f"{WORKER_NAME.split('@')[0]}@{socket.gethostname()}"
            call = control.control.add_consumer if on else control.control.cancel_consumer
            deadline = time.monotonic() + 60
            # A worker that answers /v2/health/ready may not listen to remote control yet.
            while not call(queue, destination=[node], reply=True, timeout=2):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker {node} did not answer {call.__name__}({queue!r})")
        finally:
            control.close()


# --- CPU accounting -------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid → (parent pid, user + system CPU seconds) of every live process."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after the command name, which may hold spaces
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


class CpuMeter:
    """CPU seconds of each stack process (with its live descendants), of this process (the
    load generator) and of the whole machine, between `start()` and `stop()`."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def _sample(self) -> dict[str, float]:
        if not Path("/proc/stat").exists():
            return {}
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        out = {}
        for name, proc in self.stack.procs.items():
            total, todo = 0.0, [proc.pid]
            while todo:
                pid = todo.pop()
                total += table.get(pid, (0, 0.0))[1]
                todo += children.get(pid, [])
            out[name] = total
        own = os.times()
        out["load generator"] = own.user + own.system
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        out["machine"] = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        out["wall"] = time.perf_counter()
        return out

    def start(self) -> None:
        self.begin = self._sample()

    def stop(self) -> dict[str, float]:
        """Average cores used by each, over the interval (`other`: everything else)."""
        end = self._sample()
        if not end:
            return {}
        wall = end.pop("wall") - self.begin["wall"]
        used = {k: (end[k] - self.begin.get(k, 0.0)) / wall for k in end}
        ours = sum(v for k, v in used.items() if k != "machine")
        used["other"] = max(0.0, used["machine"] - ours)
        return {k: round(v, 3) for k, v in used.items()}


# --- HTTP clients ---------------------------------------------------------------------


class ConnectionLost(Exception):
    pass


class RawClient:
    """HTTP/1.1 on one keep-alive asyncio connection; enough for this API (JSON bodies with a
    Content-Length). Much cheaper per request than httpx, so that the load generator takes
    as little as possible of the cores it shares with the server."""

    def __init__(self, url: str, api_key: str):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.auth = f"Authorization: Bearer {api_key}\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        content = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.auth}{content}{extra}\r\n"
        try:
            self.writer.write(head.encode() + body)
            raw = await self.reader.readuntil(b"\r\n\r\n")
            status = int(raw[9:12])
            lower = raw.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ConnectionLost(f"an answer without Content-Length: {raw[:200]!r}")
            length = int(lower[at + 17:lower.index(b"\r\n", at + 2)])
            data = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise ConnectionLost(str(exc) or type(exc).__name__) from exc
        if b"\r\nconnection: close" in lower:
            await self.close()
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class HttpxClient:
    def __init__(self, url: str, api_key: str):
        import httpx

        self.httpx = httpx
        self.client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"},
                                        timeout=60, limits=httpx.Limits(max_connections=1))

    async def request(self, method: str, target: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if body:
            headers["Content-Type"] = "application/json"
        try:
            r = await self.client.request(method, target, content=body or None, headers=headers)
        except self.httpx.HTTPError as exc:
            raise ConnectionLost(str(exc) or type(exc).__name__) from exc
        return r.status_code, r.content

    async def close(self) -> None:
        await self.client.aclose()


def make_client(kind: str, url: str, api_key: str):
    return RawClient(url, api_key) if kind == "raw" else HttpxClient(url, api_key)


# --- submission load ------------------------------------------------------------------


@dataclass
class Phase:
    """What the clients saw in one phase (latencies in seconds)."""

    name: str
    rate: float | None = None  # offered submissions/s (None: as fast as answered)
    submit_latency: list[float] = field(default_factory=list)
    poll_latency: list[float] = field(default_factory=list)
    submit_status: dict[str, int] = field(default_factory=dict)
    poll_status: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    first_sent: float = float("inf")
    last_answered: float = 0.0
    late: int = 0  # paced: submissions sent after their scheduled time
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(self.last_answered - self.first_sent, 1e-9)


@dataclass
class Jobs:
    accepted: dict[str, str] = field(default_factory=dict)  # job id → last status seen
    duplicates: int = 0  # two Idempotency-Keys answered with one job id
    connection_errors: int = 0
    retries: int = 0
    drained_at: float = 0.0


def _count(table: dict[str, int], key: Any) -> None:
    table[str(key)] = table.get(str(key), 0) + 1


class Load:
    """`--clients` clients, each with one connection, going through the phases together:
    warm-up (one submission each, not measured), paced (the target rate, offered on a fixed
    schedule), saturation (back to back), then polling their jobs to their ends."""

    def __init__(self, args: argparse.Namespace, url: str):
        self.args, self.url = args, url
        images = sorted(EXAMPLES.glob("digit-*.png"))
        self.bodies = [json.dumps({
            "model": "digits", "input": {"image_b64": base64.b64encode(p.read_bytes()).decode()},
            "n0": args.n0, "n": args.n,
        }).encode() for p in images]
        self.jobs = Jobs()
        self.run = uuid.uuid4().hex[:8]
        self.sent = 0
        self.phases: list[Phase] = []

    def _key(self) -> tuple[int, str]:
        self.sent += 1
        return self.sent, f"bench-{self.run}-{self.sent}"

    async def _submit(self, client, phase: Phase, scheduled: float | None) -> str | None:
        """POST one certification, retried with the same Idempotency-Key on a lost connection
        or a 5xx/429 (as a careful client does); the job id or None. Latency runs from the
        scheduled time when there is one (a late send is the server's delay too)."""
        index, key = self._key()
        body = self.bodies[index % len(self.bodies)]
        for attempt in range(5):
            start = time.perf_counter()
            phase.first_sent = min(phase.first_sent, start if scheduled is None else scheduled)
            try:
                status, data = await client.request("POST", "/v1/certifications", body, {"Idempotency-Key": key})
            except ConnectionLost:
                self.jobs.connection_errors += 1
                self.jobs.retries += attempt < 4
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            done = time.perf_counter()
            phase.submit_latency.append(done - (start if scheduled is None else scheduled))
            _count(phase.submit_status, status)
            phase.last_answered = max(phase.last_answered, done)
            if status == 202:
                job_id = json.loads(data)["id"]
                if job_id in self.jobs.accepted:
                    self.jobs.duplicates += 1
                self.jobs.accepted.setdefault(job_id, "queued")
                phase.accepted += 1
                return job_id
            if status >= 500 or status == 429:
                self.jobs.retries += attempt < 4
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            return None  # a 4xx other than 429: the request itself is refused; not retried
        return None

    async def _poll(self, client, job_id: str, phase: Phase | None) -> str | None:
        start = time.perf_counter()
        try:
            status, data = await client.request("GET", f"/v1/certifications/{job_id}")
        except ConnectionLost:
            self.jobs.connection_errors += 1
            return None
        if phase is not None:
            phase.poll_latency.append(time.perf_counter() - start)
            _count(phase.poll_status, status)
        if status == 404:
            self.jobs.accepted[job_id] = "missing"
            return "missing"
        if status != 200:
            return None
        state = json.loads(data)["status"]
        self.jobs.accepted[job_id] = state
        return state

    async def _iterate(self, client, phase: Phase, open_jobs: list[str], iteration: int,
                       scheduled: float | None) -> None:
        job_id = await self._submit(client, phase, scheduled)
        if job_id is not None:
            open_jobs.append(job_id)
        poll_now = self.args.poll_every and iteration % self.args.poll_every == 0 and open_jobs
        if poll_now and await self._poll(client, open_jobs[0], phase) in (*TERMINAL, "missing"):
            open_jobs.pop(0)

    async def _paced(self, client, number: int, phase: Phase, open_jobs: list[str], count: int) -> None:
        """This client's share of `count` submissions at `phase.rate`, on a fixed schedule."""
        clients = self.args.clients
        period = clients / phase.rate
        start = time.perf_counter() + period * number / clients  # the clients take turns
        for k in range(count // clients + (number < count % clients)):
            scheduled = start + k * period
            wait = scheduled - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                phase.late += 1
            await self._iterate(client, phase, open_jobs, k + 1, scheduled)

    async def _saturate(self, client, phase: Phase, open_jobs: list[str], count: int, deadline: float) -> None:
        """Submissions back to back until `count` in all (shared) or the deadline."""
        iteration = 0
        while self.taken < count and time.perf_counter() < deadline:
            self.taken += 1
            iteration += 1
            await self._iterate(client, phase, open_jobs, iteration, None)

    async def client(self, number: int, go: list[asyncio.Event], done: list[asyncio.Event],
                     left: list[int]) -> None:
        client = make_client(self.args.client, self.url, USER)
        open_jobs: list[str] = []
        try:
            for i, phase in enumerate(self.phases):
                await go[i].wait()
                try:
                    if phase.name == "warm-up":
                        await self._iterate(client, phase, open_jobs, 1, None)
                    elif phase.rate is not None:
                        await self._paced(client, number, phase, open_jobs, self.args.paced_jobs)
                    else:
                        await self._saturate(client, phase, open_jobs, self.args.jobs,
                                             time.perf_counter() + self.args.duration)
                finally:
                    left[i] -= 1
                    if left[i] == 0:
                        done[i].set()
            await go[len(self.phases)].wait()
            # Drain: the oldest unfinished job first (the queue is FIFO), then the next.
            while open_jobs and time.perf_counter() < self.drain_deadline:
                state = await self._poll(client, open_jobs[0], None)
                if state in (*TERMINAL, "missing"):
                    open_jobs.pop(0)
                else:
                    await asyncio.sleep(self.args.drain_poll)
        finally:
            await client.close()

    async def run_all(self, meter: CpuMeter, held: Stack | None) -> list[Phase]:
        """The phases in turn (CPU metered per phase); a held worker is let go before the drain."""
        self.phases = [Phase("warm-up")]
        if self.args.paced_jobs:
            self.phases.append(Phase("paced", rate=self.args.rate))
        if self.args.jobs:
            self.phases.append(Phase("saturation"))
        self.taken = 0
        n = len(self.phases)
        go = [asyncio.Event() for _ in range(n + 1)]
        done = [asyncio.Event() for _ in range(n)]
        left = [self.args.clients] * n
        tasks = [asyncio.ensure_future(self.client(i, go, done, left)) for i in range(self.args.clients)]
        try:
            for i, phase in enumerate(self.phases):
                meter.start()
                go[i].set()
                await done[i].wait()
                phase.cpu = meter.stop()
            if held is not None:
                await asyncio.to_thread(held.consume, "certifications", True)
            self.drain_deadline = time.perf_counter() + self.args.drain
            meter.start()
            go[n].set()
            await asyncio.gather(*tasks)
            self.drain_cpu = meter.stop()
        finally:
            for task in tasks:
                task.cancel()
        self.jobs.drained_at = time.perf_counter()
        return self.phases


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --- overhead ---------------------------------------------------------------------------


def _json_request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 60,
                  headers: dict[str, str] | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {USER}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def certify_over_http(url: str, image: Path, n: int, seed: int) -> dict[str, Any]:
    """Submit, then long-poll until the job ends; the times the client saw and the job."""
    body = {"model": "digits", "input": {"image_b64": base64.b64encode(image.read_bytes()).decode()},
            "n": n, "seed": seed}
    start = time.perf_counter()
    start_wall = time.time()
    status, answer = _json_request(f"{url}/v1/certifications", "POST", body)
    submitted = time.perf_counter()
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {answer}")
    while True:
        status, job = _json_request(f"{url}/v1/certifications/{answer['id']}?wait={LONG_POLL_SECONDS}",
                                    timeout=LONG_POLL_SECONDS + 30)
        if status != 200:
            raise RuntimeError(f"poll answered {status}: {job}")
        if job["status"] in TERMINAL:
            break
    end = time.perf_counter()
    if job["status"] != "succeeded":
        raise RuntimeError(f"the job ended {job['status']}: {job.get('error')}")
    wall, engine = end - start, job["result"]["seconds"]
    # Server clocks (time.time() on the same machine) split the wall time into its parts.
    return {
        "wall": wall, "engine": engine, "overhead": (wall - engine) / wall,
        "submit": submitted - start,
        "queued": job["started"] - job["created"],
        "created_after_start": job["created"] - start_wall,
        "run_minus_engine": job["finished"] - job["started"] - engine,
        "noticed_after_finish": (start_wall + wall) - job["finished"],
        "prediction": job["result"]["prediction"], "radius": job["result"]["radius"],
        "batch_size": job["result"].get("batch_size"),
    }


def certify_in_process(image: Path, n: int, seed: int, repeats: int, device: str,
                       batch_size: int | None, threads: int | None) -> list[dict[str, float]]:
    import torch  # only here: the load generator above must not pay for it

    if threads is not None:
        torch.set_num_threads(threads)

    from smoothcert.bundle import load_bundle
    from smoothcert.certifier import Certifier
    from smoothcert.imageio import decode_image

    certifier = Certifier(load_bundle(DEMO_BUNDLE, device=device), device=device)
    x = decode_image(image.read_bytes(), channels=certifier.spec.input_shape[0])
    options = {} if batch_size is None else {"batch_size": batch_size}
    certifier.certify(x, n=n, seed=seed, **options)  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        cert = certifier.certify(x, n=n, seed=seed, **options)
        wall = time.perf_counter() - start
        runs.append({"wall": wall, "engine": cert.seconds, "overhead": (wall - cert.seconds) / wall,
                     "prediction": cert.prediction, "radius": cert.radius,
                     "batch_size": getattr(cert, "batch_size", None)})
    del torch
    return runs


# --- report ---------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered), "count": len(ordered)}


def _ms(stats: dict[str, float]) -> str:
    if not stats:
        return "none"
    return (f"p50 {stats['p50'] * 1e3:.1f} ms, p95 {stats['p95'] * 1e3:.1f} ms, p99 {stats['p99'] * 1e3:.1f} ms, "
            f"max {stats['max'] * 1e3:.1f} ms ({stats['count']} requests)")


def verdict(ok: bool, what: str, measured: str, target: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {what}: {measured} (target {target})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--paced-jobs", type=int, default=3000,
                        help="submissions of the paced phase (0: skip it)")
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="submissions/s offered in the paced phase")
    parser.add_argument("--jobs", type=int, default=5000, help="submissions of the saturation phase (0: skip it)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the saturation phase at most")
    parser.add_argument("--drain", type=float, default=600.0,
                        help="seconds after the last submission for every job to end")
    parser.add_argument("--poll-every", type=int, default=4,
                        help="a client polls its oldest unfinished job every k-th submission (0: never)")
    parser.add_argument("--drain-poll", type=float, default=0.5, help="seconds between polls of an unfinished job")
    parser.add_argument("--n0", type=int, default=10, help="selection samples of a load job")
    parser.add_argument("--n", type=int, default=100, help="estimation samples of a load job")
    parser.add_argument("--worker-during-submit", action="store_true",
                        help="the worker consumes while submissions are measured (default: it waits "
                             "for the measured phases to end, and the API has the cores)")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    parser.add_argument("--api-workers", type=int, default=None,
                        help="uvicorn --workers (default: SMOOTHCERT_API_WORKERS, as `smoothcert up` runs it)")
    parser.add_argument("--uvicorn-arg", action="append", default=[], metavar="ARG",
                        help="an extra uvicorn argument (repeatable), e.g. --uvicorn-arg=--no-access-log")
    parser.add_argument("--repeats", type=int, default=3, help="timed n = 100,000 certifications")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--compare-fsync", action="store_true",
                        help="the submission load with Redis --appendfsync always, then everysec (fresh stacks), "
                             "and their ratio; no overhead phase")
    parser.add_argument("--fsync-rounds", type=int, default=1,
                        help="with --compare-fsync: pairs of runs, the order alternating")
    parser.add_argument("--device", default="cpu", help="the worker's and the in-process reference's device")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the in-process reference (default 1: on the small "
                             "batches the worker picks on a busy 2-core machine, two threads ran 3-10x slower)")
    parser.add_argument("--logs", type=Path, default=None, help="keep the stack's logs in this folder")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every number here")
    args = parser.parse_args(argv)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also in a log file
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "targets": {"submissions_per_s": TARGET_RATE, "p99_submit_ms": TARGET_P99_MS, "lost_jobs": 0,
                    "overhead": TARGET_OVERHEAD},
    }
    logs = args.logs or Path(tempfile.mkdtemp(prefix="smoothcert-bench-api-"))
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(logs, api_workers=args.api_workers, device=args.device, uvicorn_args=args.uvicorn_arg)
    lines: list[str] = []
    print(f"API benchmark: {args.clients} clients ({args.client}), certify n0={args.n0} n={args.n}: warm-up, "
          f"{args.paced_jobs} paced at {args.rate:.0f}/s, {args.jobs} back to back (<= {args.duration:.0f} s); "
          f"overhead at n={OVERHEAD_N}, {args.repeats} repeats")
    print(f"cpu:     {cpu_model()} ({os.cpu_count()} logical cores)")
    print(f"python:  {platform.python_version()} on {platform.system()} {platform.release()}")
    if args.compare_fsync:
        lines = compare_fsync(args, logs, report)
        if args.logs is None:
            shutil.rmtree(logs, ignore_errors=True)
        return finish(args, lines, report)
    try:
        stack.start()
        api_line = " ".join(stack.procs["api"].args[2:])
        print(f"stack:   {stack.url}, redis {stack.redis_url}, logs {logs}\n         {api_line}")
        report["api_command"] = api_line
        if not args.skip_load:
            lines += load_phase(args, stack, report)
        if not args.skip_overhead:
            lines += overhead_phase(args, stack, report)
    except KeyboardInterrupt:
        print("interrupted; stopping the stack", file=sys.stderr)
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}\n{stack.tail()}", file=sys.stderr)
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stack.stop()
        if args.logs is None:
            shutil.rmtree(logs, ignore_errors=True)
    return finish(args, lines, report)


def finish(args: argparse.Namespace, lines: list[str], report: dict) -> int:
    """Print the verdict lines and write the numbers (`--json`)."""
    if lines:
        print()
        print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=float))
        print(f"numbers written to {args.json}")
    return 0


def filesystem(path: Path) -> str:
    """`df -T`'s device, type and mount point of the filesystem holding `path`."""
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    device, fstype, *_, mount = out.strip().splitlines()[-1].split()
    return f"{fstype} ({device} on {mount})"


FSYNC_MODES = ("always", "everysec")


def compare_fsync(args: argparse.Namespace, logs: Path, report: dict[str, Any]) -> list[str]:
    """The submission load on a fresh stack per run, Redis `--appendfsync` always and everysec in
    turn (the first of each pair alternating); the ratio of their saturation submissions/s."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in FSYNC_MODES}
    lines: list[str] = []
    print(f"redis data: {filesystem(logs)}, under {logs}")
    report["redis_data_filesystem"] = filesystem(logs)
    try:
        for round_ in range(args.fsync_rounds):
            for mode in FSYNC_MODES if round_ % 2 == 0 else FSYNC_MODES[::-1]:
                folder = logs / f"{mode}-{round_ + 1}"
                folder.mkdir(parents=True, exist_ok=True)
                stack = Stack(folder, api_workers=args.api_workers, device=args.device,
                              uvicorn_args=args.uvicorn_arg, redis_args=["--appendfsync", mode])
                try:
                    stack.start()
                    store = stack.store()
                    confirmed = store.r.config_get("appendfsync")["appendfsync"]
                    store.r.close()
                    print(f"\n=== round {round_ + 1}: redis appendfsync {confirmed} (CONFIG GET), {stack.url}")
                    sub: dict[str, Any] = {}
                    lines += [f"[appendfsync {mode}, round {round_ + 1}] {line}"
                              for line in load_phase(args, stack, sub)]
                    runs[mode].append({"appendfsync": confirmed, **sub["load"]})
                finally:
                    stack.stop()
    except KeyboardInterrupt:
        print("interrupted; stopping the stack", file=sys.stderr)
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["fsync"] = {"runs": runs}
    saturation = {mode: [r["phases"]["saturation"] for r in runs[mode] if "saturation" in r["phases"]]
                  for mode in FSYNC_MODES}
    rates = {mode: [p["submissions_per_s"] for p in saturation[mode]] for mode in FSYNC_MODES}
    # On a shared small machine the other processes' CPU decides the rate: shown with each run.
    other = {mode: [p["cpu_cores"].get("other", float("nan")) for p in saturation[mode]] for mode in FSYNC_MODES}
    if all(rates.values()) and len(rates["always"]) == len(rates["everysec"]):
        always, everysec = (statistics.median(rates[m]) for m in FSYNC_MODES)
        ratio = always / everysec
        report["fsync"].update({"saturation_per_s": rates, "saturation_other_cpu_cores": other,
                                "median_always": always, "median_everysec": everysec,
                                "ratio_always_over_everysec": ratio})
        runs_text = ", ".join(f"{rates[m][i]:.1f} ({m}, other processes {other[m][i]:.2f} cores)"
                              for i in range(len(rates["always"])) for m in FSYNC_MODES)
        lines.append(f"INFO appendfsync always / everysec, saturation submissions/s: {always:.1f} / {everysec:.1f} "
                     f"= {ratio:.3f} (median of {len(rates['always'])} round(s): {runs_text}; "
                     f"redis data on {report['redis_data_filesystem']})")
    return lines


def load_phase(args: argparse.Namespace, stack: Stack, report: dict[str, Any]) -> list[str]:
    load = Load(args, stack.url)
    meter = CpuMeter(stack)
    held = not args.worker_during_submit
    if held:
        stack.consume("certifications", False)
    print(f"worker:  {'consumes nothing until the measured phases end' if held else 'consumes all along'}")
    phases = run_async(load.run_all(meter, stack if held else None))
    jobs = load.jobs
    store = Store.from_url(stack.redis_url)
    open_after, queued_messages = store.open_jobs(), store.queue_depth("certifications")
    submitted_total = store.metrics()["counters"].get("jobs_submitted_total:certification", 0)
    store.r.close()

    states: dict[str, int] = {}
    for state in jobs.accepted.values():
        _count(states, state)
    accepted = len(jobs.accepted)
    lost = sum(n for s, n in states.items() if s not in TERMINAL)
    server_errors = sum(n for p in phases for table in (p.submit_status, p.poll_status)
                        for s, n in table.items() if s.startswith("5"))
    out: dict[str, Any] = {}
    for phase in phases:
        submit, poll = percentiles(phase.submit_latency), percentiles(phase.poll_latency)
        rate = phase.accepted / phase.seconds
        requests = len(phase.submit_latency) + len(phase.poll_latency)
        api_ms = phase.cpu.get("api", 0.0) * phase.seconds / max(requests, 1) * 1e3
        print()
        offered = f", offered {phase.rate:.0f}/s ({phase.late} sent late)" if phase.rate else ""
        print(f"{phase.name}: {phase.accepted} jobs accepted in {phase.seconds:.2f} s = {rate:.1f} submissions/s"
              f"{offered}")
        print(f"  submit latency: {_ms(submit)}")
        print(f"  poll latency:   {_ms(poll)}")
        print(f"  answers to submits {dict(sorted(phase.submit_status.items()))}, to polls "
              f"{dict(sorted(phase.poll_status.items()))}")
        print(f"  CPU, average cores in use: {_cpu(phase.cpu)}; API CPU per request {api_ms:.2f} ms")
        out[phase.name] = {"accepted": phase.accepted, "seconds": phase.seconds, "submissions_per_s": rate,
                           "offered_per_s": phase.rate, "late": phase.late, "submit_latency_s": submit,
                           "poll_latency_s": poll, "submit_status": phase.submit_status,
                           "poll_status": phase.poll_status, "cpu_cores": phase.cpu,
                           "api_cpu_ms_per_request": api_ms}
    measured = [p for p in phases if p.name != "warm-up"]
    last = max(p.last_answered for p in phases)
    drain_seconds = jobs.drained_at - last
    print()
    print(f"completion: every accepted job polled to its end; the last {drain_seconds:.1f} s after the last "
          f"submission; {jobs.connection_errors} connection errors, {jobs.retries} retries, "
          f"{jobs.duplicates} duplicate ids")
    print(f"  final states {dict(sorted(states.items()))}; open jobs in Redis afterwards {open_after}, "
          f"messages left in the queue {queued_messages}, jobs the store counted {submitted_total:.0f}")
    print(f"  CPU during completion: {_cpu(load.drain_cpu)}")
    report["load"] = {
        "phases": out, "accepted": accepted, "final_states": states, "lost_jobs": lost,
        "connection_errors": jobs.connection_errors, "retries": jobs.retries, "duplicate_ids": jobs.duplicates,
        "drain_seconds": drain_seconds, "open_jobs_after": open_after, "queue_messages_after": queued_messages,
        "store_submitted_total": submitted_total, "cpu_cores_completion": load.drain_cpu,
        "server_errors": server_errors,
    }
    lines = []
    by_name = {p.name: p for p in measured}
    if "saturation" in by_name:
        sat = by_name["saturation"]
        rate = sat.accepted / sat.seconds
        lines.append(verdict(rate >= TARGET_RATE, "submissions/s (saturation)", f"{rate:.1f}", f">= {TARGET_RATE:.0f}"))
    if "paced" in by_name:
        paced = by_name["paced"]
        p99 = percentiles(paced.submit_latency).get("p99", float("inf")) * 1e3
        rate = paced.accepted / paced.seconds
        lines.append(verdict(p99 <= TARGET_P99_MS and rate >= 0.95 * paced.rate,
                             f"p99 submit latency at {paced.rate:.0f} submissions/s offered",
                             f"{p99:.1f} ms, {rate:.1f}/s served", f"<= {TARGET_P99_MS:.0f} ms"))
    if "saturation" in by_name:
        p99 = percentiles(by_name["saturation"].submit_latency).get("p99", float("inf")) * 1e3
        lines.append(f"info p99 submit latency at saturation: {p99:.1f} ms ({args.clients} clients back to back: "
                     f"latency ≈ clients / throughput)")
    lines += [
        verdict(lost == 0 and accepted > 0 and submitted_total == accepted, "lost jobs",
                f"{lost} of {accepted} accepted (the store counted {submitted_total:.0f})", "0"),
        verdict(server_errors == 0, "5xx answers", f"{server_errors}", "0"),
    ]
    return lines


def _cpu(used: dict[str, float]) -> str:
    if not used:
        return "not measured (no /proc)"
    names = ("api", "worker", "redis", "load generator", "other")
    return ", ".join(f"{n} {used[n]:.2f}" for n in names if n in used) + f"; machine {used['machine']:.2f}"


def overhead_phase(args: argparse.Namespace, stack: Stack, report: dict[str, Any]) -> list[str]:
    image = EXAMPLES / "digit-7.png"
    print()
    print(f"overhead: n={OVERHEAD_N} certification of {image.name}, submit then GET ?wait={LONG_POLL_SECONDS} "
          f"until it ends; 1 warm-up, {args.repeats} timed")
    certify_over_http(stack.url, image, OVERHEAD_N, OVERHEAD_SEED)  # loads the model in the worker
    runs = []
    for i in range(args.repeats):
        run = certify_over_http(stack.url, image, OVERHEAD_N, OVERHEAD_SEED)
        runs.append(run)
        print(f"  http {i + 1}: wall {run['wall']:.3f} s, engine {run['engine']:.3f} s, overhead "
              f"{run['overhead'] * 100:.2f}% (submit {run['submit'] * 1e3:.1f} ms, "
              f"queued {run['queued'] * 1e3:.1f} ms, "
              f"worker outside the engine {run['run_minus_engine'] * 1e3:.1f} ms, noticed "
              f"{run['noticed_after_finish'] * 1e3:.1f} ms after the end; batch size {run['batch_size']})")
    # The batch size the worker used (it may choose one itself), so that both run the same passes.
    local = certify_in_process(image, OVERHEAD_N, OVERHEAD_SEED, args.repeats, args.device, runs[-1]["batch_size"],
                               args.threads)
    for i, run in enumerate(local):
        print(f"  in-process {i + 1}: wall {run['wall']:.3f} s, engine {run['engine']:.3f} s, "
              f"overhead {run['overhead'] * 100:.2f}% (batch size {run['batch_size']}, {args.threads} threads)")
    http = statistics.median(r["overhead"] for r in runs)
    in_process = statistics.median(r["overhead"] for r in local)
    engine_http = statistics.median(r["engine"] for r in runs)
    engine_local = statistics.median(r["engine"] for r in local)
    print(f"  median overhead: over HTTP {http * 100:.2f}%, in process {in_process * 100:.2f}%; median engine "
          f"seconds: worker {engine_http:.3f}, in process {engine_local:.3f}")
    report["overhead"] = {"n": OVERHEAD_N, "http_runs": runs, "in_process_runs": local,
                          "http_median": http, "in_process_median": in_process,
                          "engine_seconds_worker_median": engine_http, "engine_seconds_in_process_median": engine_local}
    return [verdict(http <= TARGET_OVERHEAD, f"end-to-end overhead, n={OVERHEAD_N}",
                    f"{http * 100:.2f}% (in process {in_process * 100:.2f}%)", f"<= {TARGET_OVERHEAD * 100:.0f}%")]


if __name__ == "__main__":
    sys.exit(main())
