"""API restart: the API process is restarted, several times, gracefully (SIGTERM) and not
(SIGKILL), while concurrent SDK clients submit certifications and wait on them (issue 6).

How: a private stack (Redis, one Celery worker, uvicorn via `Stack.api`). `--clients` threads,
each with its own `Client`, and `--async-clients` coroutines, each with its own `AsyncClient`,
take submissions from one counter until `--jobs` are made: each certifies an example digit
(fixed σ, memory off, its own seed) with the SDK's defaults (no Idempotency-Key given: the
SDK makes one up per call) and waits on the job (`Job.wait`, long-polling). At thresholds of
submissions the API is restarted on the same port (`stack.kill("api", sig)`, then
`stack.start_api()`), SIGTERM and SIGKILL alternately; a SIGKILL is aimed at a moment when a
submission is in flight (sent, not yet answered), so that some die mid-request. httpx event
hooks on every client record each attempt (method, Idempotency-Key, time) and what is in
flight.

What it proves, from the clients' own outcomes and Redis state:
- every client finished every submission without an exception reaching it (no
  `APIConnectionError`, no `JobTimeout`), though each restart refused or broke requests;
- every submission made exactly one job: each sent one Idempotency-Key on all its attempts;
  Redis holds exactly one job per submission (no job twice for a seed) and one idempotency
  key per submission, naming the job the client got, even for POSTs whose answer was lost
  (a job created by an earlier attempt than the one answered);
- every job succeeded, in Redis and as the client saw it;
- the certificates are those of the same requests made without restarts (same seed): a
  sample is submitted again once the API is stable, and the results (every field but the
  time taken) compared.
It reports the restarts (signal, seconds to stop, to start, down), the retries the clients
made (the SDK's counter; attempts by method from the hook), client-visible errors and the
time from the last restart to the last job's end (the drain).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from benchmarks.stack import USER, Stack
from clients import AsyncClient, Client
from reliability.report import Report, main, run_scenario, scenario_parser
from service.store import Store
from service.up import worker_command

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "examples").glob("digit-*.png"))


def parser() -> argparse.ArgumentParser:
    p = scenario_parser(__doc__, deadline=1200.0)
    p.add_argument("--jobs", type=int, default=240, help="certifications submitted in all")
    p.add_argument("--clients", type=int, default=16, help="threads, each with its own Client")
    p.add_argument("--async-clients", type=int, default=8, help="coroutines, each with its own AsyncClient")
    p.add_argument("--restarts", type=int, default=6, help="API restarts, SIGTERM and SIGKILL alternately")
    p.add_argument("--n", type=int, default=2000, help="samples per certification")
    p.add_argument("--batch-size", type=int, default=200, help="batch size of every certification")
    p.add_argument("--poll", type=float, default=2.0, help="Job.wait's poll (the long-poll's length)")
    p.add_argument("--max-retries", type=int, default=10,
                   help="the clients' max_retries (covers a submission made while the API is down: "
                        "backoff 0.5, 1, 2, 4, 8, 8, ... s times [0.5, 1): 10 tries cover at least 28 s "
                        "down); waits are bounded by their timeout, not by this")
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn processes")
    p.add_argument("--sample", type=int, default=12,
                   help="certificates compared with the same request made without restarts")
    return p


@dataclass
class Submission:
    index: int
    client: str
    job_id: str | None = None
    keys: list[str] = field(default_factory=list)  # the Idempotency-Key of each POST attempt
    post_times: list[float] = field(default_factory=list)  # time.time() of each POST attempt
    status: str | None = None
    result: dict | None = None
    error: str | None = None
    ended: float = 0.0  # monotonic


@dataclass
class Restart:
    sig: str
    stop_s: float  # signal → the process group reaped
    start_s: float  # restarted → /v2/health/ready answers 200
    down_s: float
    open_jobs: int  # jobs queued or running when the signal went
    waiting: int  # clients inside Job.wait when the signal went
    posts_in_flight: int  # submissions sent and not yet answered when the signal went


class Load:
    """The clients: submissions from one counter, each client's attempts recorded."""

    def __init__(self, args: argparse.Namespace, url: str):
        self.args, self.url = args, url
        self.lock = threading.Lock()
        self.next_index = 0
        self.subs: dict[int, Submission] = {}
        self.current: dict[str, Submission] = {}  # client → the submission it is making
        self.waiting: set[str] = set()
        self.in_flight: dict[str, str | None] = {}  # client → method of its unanswered request
        self.attempts: Counter = Counter()  # "POST", "GET", "DELETE"
        self.retries: dict[str, int] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + args.deadline

    def params(self, index: int) -> dict[str, Any]:
        return {"sigma": 0.25, "n0": 100, "n": self.args.n, "batch_size": self.args.batch_size,
                "memory": False, "seed": self.args.seed * 100_000 + index}

    def image(self, index: int) -> Path:
        return IMAGES[index % len(IMAGES)]

    def take(self, client: str) -> Submission | None:
        with self.lock:
            if self.stop.is_set() or self.next_index >= self.args.jobs or time.monotonic() > self.deadline:
                return None
            sub = Submission(self.next_index, client)
            self.next_index += 1
            self.subs[sub.index] = self.current[client] = sub
            return sub

    def submitted(self) -> int:
        with self.lock:
            return self.next_index

    def posts_in_flight(self) -> int:
        with self.lock:
            return sum(m == "POST" for m in self.in_flight.values())

    def answered(self, client: str) -> None:
        with self.lock:
            self.in_flight[client] = None

    def record(self, client: str, request: httpx.Request) -> None:
        with self.lock:
            self.attempts[request.method] += 1
            self.in_flight[client] = request.method  # each client has one request out at a time
            if request.method == "POST":
                sub = self.current[client]
                sub.keys.append(request.headers.get("idempotency-key", ""))
                sub.post_times.append(time.time())

    def timeout(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def finish(self, sub: Submission, status: Any = None, error: BaseException | None = None) -> None:
        with self.lock:
            sub.ended = time.monotonic()
            if error is not None:
                sub.error = f"{type(error).__name__}: {error}"
                self.errors.append(f"submission {sub.index} ({sub.client}): {sub.error}")
            else:
                sub.status, sub.result = status.status, status.raw.get("result")

    def sync_client(self, name: str) -> None:
        with Client(self.url, api_key=USER, max_retries=self.args.max_retries) as sc:
            sc._http.event_hooks = {"request": [lambda r: self.record(name, r)],
                                    "response": [lambda r: self.answered(name)]}
            while (sub := self.take(name)) is not None:
                try:
                    job = sc.certify(self.image(sub.index), model="digits", **self.params(sub.index))
                    sub.job_id = job.id
                    with self.lock:
                        self.waiting.add(name)
                    status = job.wait(self.timeout(), poll=self.args.poll)
                    self.finish(sub, status)
                except Exception as e:  # what the scenario must never see
                    self.finish(sub, error=e)
                finally:
                    with self.lock:
                        self.waiting.discard(name)
            self.retries[name] = sc.retries

    async def async_client(self, name: str) -> None:
        async def hook(request: httpx.Request) -> None:
            self.record(name, request)

        async def answered(response: httpx.Response) -> None:
            self.answered(name)

        async with AsyncClient(self.url, api_key=USER, max_retries=self.args.max_retries) as sc:
            sc._http.event_hooks = {"request": [hook], "response": [answered]}
            while (sub := self.take(name)) is not None:
                try:
                    job = await sc.certify(self.image(sub.index), model="digits", **self.params(sub.index))
                    sub.job_id = job.id
                    with self.lock:
                        self.waiting.add(name)
                    status = await job.wait(self.timeout(), poll=self.args.poll)
                    self.finish(sub, status)
                except Exception as e:
                    self.finish(sub, error=e)
                finally:
                    with self.lock:
                        self.waiting.discard(name)
            self.retries[name] = sc.retries

    def async_clients(self) -> None:
        async def all_of_them() -> None:
            await asyncio.gather(*(self.async_client(f"async-{i}") for i in range(self.args.async_clients)))
        asyncio.run(all_of_them())


def wait_until(predicate, seconds: float, step: float = 0.1) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def jobs_in_redis(store: Store) -> dict[str, Any]:
    ids = [k.decode().rsplit(":", 1)[1] for k in store.r.scan_iter(match=f"{store.p}:job:*", count=1000)]
    return {i: j for i in ids if (j := store.get_job(i)) is not None}


def idempotency_keys(store: Store) -> dict[str, str]:
    """Idempotency-Key → job id, as Redis holds them (every key of every caller)."""
    out = {}
    for k in store.r.scan_iter(match=f"{store.p}:idem:*", count=1000):
        value = store.r.get(k)
        if value is not None:
            out[k.decode().rsplit(":", 1)[1]] = value.decode()
    return out


def run(args: argparse.Namespace) -> Report:
    return run_scenario("api_restart", args, lambda report, logs: _body(args, report, logs))


def _body(args: argparse.Namespace, report: Report, logs: Path) -> None:
    if args.restarts < 2:
        raise ValueError("--restarts must be at least 2: one SIGTERM and one SIGKILL")
    env = {"SMOOTHCERT_JOB_TIME_LIMIT_SECONDS": "600", "OMP_NUM_THREADS": "1"}
    with Stack(logs, env=env) as stack:
        stack.worker("worker", worker_command("worker@%h"))
        url = stack.api(workers=args.api_workers)
        store = stack.store()
        load = Load(args, url)
        threads = [threading.Thread(target=load.sync_client, args=(f"sync-{i}",), daemon=True)
                   for i in range(args.clients)]
        if args.async_clients:
            threads.append(threading.Thread(target=load.async_clients, daemon=True))
        started = time.monotonic()
        for t in threads:
            t.start()
        restarts: list[Restart] = []
        last_ready, served = started, 0
        try:
            for k in range(args.restarts):
                # Spread over the load: restart k once k+1 shares of the submissions were made,
                # a new submission began since the last restart, and a client is waiting.
                threshold = max((k + 1) * args.jobs // (args.restarts + 1), served + 1)
                if not wait_until(lambda t=threshold: load.submitted() >= t, load.deadline - time.monotonic()):
                    raise TimeoutError(f"the deadline passed before restart {k + 1} ({load.submitted()} submitted)")
                wait_until(lambda: bool(load.waiting), 30, 0.01)
                sig = signal.SIGTERM if k % 2 == 0 else signal.SIGKILL
                if sig == signal.SIGKILL:  # aim: kill while a submission is being handled
                    wait_until(lambda: load.posts_in_flight() > 0, 10, 0.001)
                with load.lock:
                    waiting = len(load.waiting)
                    posting = sum(m == "POST" for m in load.in_flight.values())
                open_jobs = store.open_jobs()
                t0 = time.monotonic()
                stack.kill("api", sig)
                t1 = time.monotonic()
                stack.start_api()
                last_ready, served = time.monotonic(), load.submitted()
                restarts.append(Restart(sig.name, round(t1 - t0, 2), round(last_ready - t1, 2),
                                        round(last_ready - t0, 2), open_jobs, waiting, posting))
                print(f"restart {k + 1}: {restarts[-1]}", flush=True)
            alive = lambda: any(t.is_alive() for t in threads)  # noqa: E731
            if not wait_until(lambda: not alive(), load.deadline - time.monotonic(), 0.2):
                raise TimeoutError(f"the deadline passed with clients still waiting "
                                   f"({sum(s.ended > 0 for s in load.subs.values())} of {args.jobs} ended)")
        finally:
            load.stop.set()
        drained = max((s.ended for s in load.subs.values()), default=last_ready)
        report.figures.update(
            restarts=[vars(r) for r in restarts], seconds_of_load=round(drained - started, 1),
            drain_seconds_after_last_restart=round(max(0.0, drained - last_ready), 1))
        # Redis as the load left it (the sample below adds jobs of its own).
        records, keys = jobs_in_redis(store), idempotency_keys(store)
        # Jobs whose first API process died between storing and queueing them, queued by the
        # client's retry (service/jobs.py): sent to the broker well after they were stored.
        late = [j for j, r in records.items()
                if (t := store.r.hget(f"{store.p}:job:{j}", "enqueued")) and float(t) - r.created > 1.0]
        report.figures["jobs_queued_by_a_retry"] = len(late)
        _check_run(args, report, load, restarts, records, keys)
        _check_certificates(args, report, load, url)


def _check_run(args: argparse.Namespace, report: Report, load: Load, restarts: list[Restart],
               records: dict[str, Any], keys: dict[str, str]) -> None:
    subs = [load.subs[i] for i in sorted(load.subs)]
    retries = sum(load.retries.values())
    posts = sum(len(s.keys) for s in subs)
    report.figures.update(
        submissions=len(subs), clients=args.clients + args.async_clients,
        retries_total=retries,
        retries_sync=sum(v for k, v in load.retries.items() if k.startswith("sync")),
        retries_async=sum(v for k, v in load.retries.items() if k.startswith("async")),
        attempts=dict(load.attempts), post_retries=posts - len(subs), client_errors=len(load.errors))
    sigs = Counter(r.sig for r in restarts)
    report.check(len(restarts) == args.restarts and sigs["SIGTERM"] > 0 and sigs["SIGKILL"] > 0
                 and all(r.waiting > 0 for r in restarts) and retries >= len(restarts),
                 "the API restarted under polling clients",
                 f"{len(restarts)} restarts ({dict(sigs)}), each with clients inside Job.wait "
                 f"({[r.waiting for r in restarts]}) and jobs open ({[r.open_jobs for r in restarts]}); "
                 f"down {[r.down_s for r in restarts]} s; the clients retried {retries} times")

    report.check(len(subs) == args.jobs and not load.errors, "no error reached a client",
                 f"{len(subs)} submissions by {args.clients} Client threads and {args.async_clients} "
                 f"AsyncClient coroutines; errors: {load.errors[:5] or 'none'}"
                 f"{f' (+{len(load.errors) - 5})' if len(load.errors) > 5 else ''}")

    # One job per submission: one key on every attempt; one job and one key in Redis for it.
    one_key = [s.index for s in subs if len(set(s.keys)) != 1 or not s.keys[0]]
    by_seed = Counter(r.request.get("seed") for r in records.values())
    seeds = {load.params(s.index)["seed"]: s for s in subs}
    twice = sorted(seed for seed, c in by_seed.items() if c > 1)
    stray = [j for j, r in records.items() if r.request.get("seed") not in seeds]
    wrong = [s.index for s in subs if s.job_id is None or s.job_id not in records
             or records[s.job_id].request.get("seed") != load.params(s.index)["seed"]
             or keys.get(s.keys[0] if s.keys else "") != s.job_id]
    # A POST retried after its answer was lost: the job was created before the last attempt.
    lost = sum(1 for s in subs if len(s.keys) > 1 and s.job_id in records
               and records[s.job_id].created < s.post_times[-1])
    report.figures.update(jobs_in_redis=len(records), idempotency_keys_in_redis=len(keys),
                          submissions_retried=sum(len(s.keys) > 1 for s in subs),
                          retried_posts_answered_with_an_earlier_attempts_job=lost)
    report.check(not one_key and not twice and not stray and not wrong and len(records) == len(subs)
                 and len(keys) == len(subs),
                 "every submission made exactly one job",
                 f"{len(subs)} submissions, {posts} POST attempts ({sum(len(s.keys) > 1 for s in subs)} "
                 f"submissions retried, {lost} of them after the job was made); Redis: {len(records)} jobs, "
                 f"{len(keys)} idempotency keys; one key per submission: {'yes' if not one_key else one_key[:5]}; "
                 f"seeds with two jobs: {twice[:5] or 'none'}; jobs of no submission: {len(stray)}; "
                 f"submissions whose job or key is not theirs: {wrong[:5] or 'none'}")

    statuses = Counter(records[s.job_id].status if s.job_id in records else "missing" for s in subs)
    seen = Counter(s.status or "error" for s in subs)
    failures = [f"{j}: {r.error}" for j, r in records.items() if r.status == "failed"][:3]
    report.check(statuses == Counter(succeeded=len(subs)) and seen == Counter(succeeded=len(subs)),
                 "every job succeeded", f"in Redis {dict(statuses)}, as the clients saw them {dict(seen)}"
                 f"{f'; {failures}' if failures else ''}")


def _check_certificates(args: argparse.Namespace, report: Report, load: Load, url: str) -> None:
    """The same requests again, on a stable API: the certificates must be the same."""
    done = [s for s in load.subs.values() if s.status == "succeeded" and s.result]
    sample = random.Random(args.seed).sample(done, min(args.sample, len(done)))
    differ = []
    with Client(url, api_key=USER) as sc:
        jobs = [(s, sc.certify(load.image(s.index), model="digits", **load.params(s.index))) for s in sample]
        for s, job in jobs:
            again = job.wait(300).raw.get("result") or {}
            before = {k: v for k, v in s.result.items() if k != "seconds"}
            after = {k: v for k, v in again.items() if k != "seconds"}
            if before != after:
                differ.append(f"submission {s.index}: {before} != {after}")
    radii = sorted(round(s.result["radius"], 3) for s in sample if s.result.get("radius") is not None)
    report.figures["certificates_compared"] = len(sample)
    report.check(len(sample) == min(args.sample, args.jobs) and not differ,
                 "certificates equal those of the same requests without restarts",
                 f"{len(sample)} certificates (radii {radii}) made again with the same seed: "
                 f"{'all equal but for the time taken' if not differ else differ[:2]}")


if __name__ == "__main__":
    sys.exit(main(parser(), run))
