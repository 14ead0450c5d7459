"""Soak: a long mixed workload against the real stack ends with zero lost jobs, zero memory
invariant violations and flat worker memory.

How. A private redis-server (append-only), `--workers` Celery workers (service.up's command
line: threads pool, 8 threads) and uvicorn with its default process count, as `smoothcert
up` runs them. Three models: the demo digits CNN (1×8×8, 10 classes, registered by the
stack), and two uploaded through `POST /v1/models` with the admin key: the exact linear
"tiny" (1×4×4, tests/workers/helpers.py) and "rgb-linear" (a seeded random linear model,
3×8×8, 10 classes). `--clients` asyncio clients (the SDK's `AsyncClient`, one connection
each) submit `--jobs` jobs drawn from a seeded mix and wait for each (long-poll): predictions;
certifications with a fixed σ, memory off and on, and with a σ search (ddrs, insta), memory
on and off; bounds cohen and two_sided, fixed and adaptive sampling, at the default α
(0.001, one of the memory's levels); small n (`--n`), so the run is about the service, not
the sampling. The workload is seeded, so a run can be repeated; each job's noise seed is the
client's where the memory is off, and drawn by the service where it is on (the memory's
rule: docs/api.md). With the memory on the service takes n ≥ SMOOTHCERT_MEMORY_MIN_N (1000
by default); this scenario's stack runs with SMOOTHCERT_MEMORY_MIN_N = the smallest `--n`
(200), a lax setting of this test that keeps its jobs short, never a service default. Inputs are
new (digits test images and blends of two digits of different classes, tiny points near its
boundary, random rgb images) or (`--revisit`) near duplicates and small perturbations of
earlier ones, so that the memory answers from committed balls ("inside") and shrinks
certificates ("shrunk"), and grows all along.
Every `--sample-seconds` the resident memory (VmRSS) of each worker's process group is read
from /proc, with the number of jobs finished so far (the API's too, reported only).

Checks (from HTTP answers and the Redis state, never from what the clients intended):
- every submission is accepted, and every accepted job ends, succeeded, within the deadline
  (a job that never ends, or ends otherwise, is lost); Redis holds exactly the accepted jobs
  and none is still open;
- every process of the stack (Redis, workers, API) is still the one started;
- every memory namespace in Redis (f"{digest}/{numeric_mode}/{device_type}/{alpha}",
  smoothcert.results.memory_namespace; each listed in its model's namespace set): zero
  invariant violations (`smoothcert.memory.invariant_violations` over the decoded log), one
  entry per job id, the job index agrees with the log, the entries are exactly the succeeded
  certifications that used the memory and were not answered from a committed ball (one
  each), each such job's answer is its entry (class, radius, index, input), and each job
  answered from a ball lies inside that ball with its class and radius R_j − ‖x − x_j‖;
- provenance (docs/memory.md): every entry's record names its root, the "new" or "shrunk"
  entry whose own sampling produced the ball ("inside" entries: their conflict's root, with
  its sampling), and every answer that used the memory names that root and its job and
  reports the root's σ, bound, n0, n, α and bounds;
- the memory was exercised: both "inside" and "shrunk" outcomes occurred;
- flat worker memory: after warm-up (the first half of the jobs), a least-squares line of
  RSS against jobs finished grows by less than `--max-growth-mib` MiB per 1,000 jobs, for
  each worker.

    python reliability/soak.py                      # full size: 6,000 jobs
    python reliability/soak.py --jobs 200 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import ADMIN, USER, Stack
from clients import APIConnectionError, AsyncClient, Client, InternalServerError, JobTimeout, RateLimitError
from reliability.memory_log import ROOT_OUTCOMES, MemoryLog, logged_namespaces, read_log
from reliability.report import Report, main, run_scenario, scenario_parser
from service.store import TERMINAL, Store
from service.up import worker_command
from smoothcert.results import parse_namespace

MIB = 2**20

# --- shared with reliability/soundness.py ------------------------------------------------


def tiny_bundle() -> tuple[str, bytes]:
    """The exact linear model of docs/algorithms.md §8 (tests/workers/helpers.py): (digest, zip)."""
    from tests.workers.helpers import make_bundle

    with tempfile.TemporaryDirectory() as folder:
        digest, _, data = make_bundle(Path(folder))
    return digest, data


def linear_bundle(name: str, shape: tuple[int, ...], classes: int, seed: int) -> bytes:
    """A linear bundle with seeded random weights (a second model of another input shape)."""
    import torch

    from smoothcert.architectures import build_architecture
    from smoothcert.bundle import ModelSpec, SigmaRange, save_bundle, zip_bundle

    spec = ModelSpec(name=name, input_shape=shape, num_classes=classes,
                     labels=tuple(str(c) for c in range(classes)),
                     sigma=SigmaRange(0.25, 0.05, 1.0), architecture="linear")
    torch.manual_seed(seed)
    net = build_architecture("linear", shape, classes)
    with tempfile.TemporaryDirectory() as folder:
        save_bundle(folder, spec, net, fmt="state_dict")
        return zip_bundle(folder)


def upload(url: str, bundle: bytes) -> dict[str, str]:
    """Register a bundle zip through POST /v1/models with the admin key; {name, digest}."""
    with Client(url, api_key=ADMIN, timeout=120) as client:
        info = client.upload_model(bundle)
    return {"name": info.name, "digest": str(info.digest)}


@contextlib.contextmanager
def running_stack(logs: Path, workers: int, env: dict[str, str] | None = None,
                  **worker_env: str) -> Iterator[tuple[Stack, str]]:
    """Redis, `workers` Celery workers and uvicorn (default process count); (stack, url).
    `env` goes to every process (the API's and the workers' settings), `worker_env` to the
    workers only."""
    with Stack(logs, device="cpu", env=env) as stack:
        for i in range(workers):
            name = f"rel{i}@%h"
            stack.worker(f"worker{i}", worker_command(name), OMP_NUM_THREADS="1", **worker_env)
        url = stack.api()
        yield stack, url


def check_processes(report: Report, stack: Stack) -> None:
    """Every process of the stack is the one started (none died and was replaced)."""
    dead = {name: proc.returncode for name, proc in stack.procs.items() if proc.poll() is not None}
    report.check(not dead, "every stack process ran to the end",
                 f"{len(stack.procs)} processes ({', '.join(stack.procs)}); exited: {dead or 'none'}")


@dataclass
class Spec:
    """One job as a client submits it; `tags` name its workload cell."""

    kind: str  # certification | prediction
    model: str
    x: np.ndarray  # float32, the model's input shape, in [0, 1]
    options: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    spec: Spec
    job_id: str | None = None
    status: str | None = None  # the last status seen over HTTP
    body: dict[str, Any] | None = None  # the job's final JSON
    refused: str | None = None  # why a submission was not accepted
    seconds: float = 0.0  # submit → end, as the client saw it

    @property
    def result(self) -> dict[str, Any]:
        return (self.body or {}).get("result") or {}


_RETRYABLE = (APIConnectionError, InternalServerError, RateLimitError)


async def _submit(client: AsyncClient, spec: Spec, deadline: float):
    """Submit with an idempotency key, retrying transport errors, 5xx and 429 with it (a
    retried submission that the server did accept returns the same job, not a second one)."""
    key = uuid.uuid4().hex
    submit = client.certify if spec.kind == "certification" else client.predict
    while True:
        try:
            return await submit(spec.x, model=spec.model, idempotency_key=key, **spec.options)
        except _RETRYABLE:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _client_loop(url: str, queue: asyncio.Queue, outcomes: list[Outcome], deadline: float,
                       on_done) -> None:
    async with AsyncClient(url, api_key=USER, timeout=60) as client:
        while not queue.empty() and time.monotonic() < deadline:
            spec = queue.get_nowait()
            out = Outcome(spec)
            outcomes.append(out)
            started = time.monotonic()
            try:
                job = await _submit(client, spec, deadline)
            except Exception as exc:  # recorded: the check on refusals reports it
                out.refused = f"{type(exc).__name__}: {exc}"
                continue
            out.job_id, out.status = job.id, job.submitted.status if job.submitted else None
            while time.monotonic() < deadline:
                try:
                    status = await job.wait(timeout=max(1.0, deadline - time.monotonic()), poll=30)
                except JobTimeout:
                    break
                except _RETRYABLE:
                    await asyncio.sleep(0.5)
                    continue
                out.status, out.body = status.status, status.raw
                break
            out.seconds = time.monotonic() - started
            on_done()


class Driver:
    """`clients` concurrent SDK clients work off `specs` (submit, then wait for the end) and
    stop submitting at `deadline` (monotonic); `finished` counts the jobs done so far (the
    RSS sampler's thread reads it)."""

    def __init__(self, url: str, clients: int, deadline: float, label: str):
        self.url, self.clients, self.deadline, self.label = url, clients, deadline, label
        self.finished = 0

    def run(self, specs: list[Spec]) -> list[Outcome]:
        """One Outcome per spec taken (all of them, unless the deadline passed)."""
        queue: asyncio.Queue = asyncio.Queue()
        for spec in specs:
            queue.put_nowait(spec)
        outcomes: list[Outcome] = []
        step, started = max(1, len(specs) // 20), time.monotonic()

        def on_done() -> None:
            self.finished += 1
            if self.finished % step == 0 or self.finished == len(specs):
                print(f"  {self.label}: {self.finished}/{len(specs)} jobs done "
                      f"({time.monotonic() - started:.0f} s)", flush=True)

        async def all_clients():
            await asyncio.gather(*(_client_loop(self.url, queue, outcomes, self.deadline, on_done)
                                   for _ in range(self.clients)))

        asyncio.run(all_clients())
        return outcomes


def check_jobs(report: Report, store: Store, outcomes: list[Outcome], total: int,
               expected: dict[str, str] | None = None) -> None:
    """Zero lost jobs: all `total` specs were submitted and accepted, every accepted job
    ended as `expected` (default: succeeded) over HTTP and in Redis, Redis holds exactly
    these jobs and none is open."""
    refused = [o for o in outcomes if o.refused]
    report.check(len(outcomes) == total and not refused, "every submission accepted",
                 f"{len(outcomes) - len(refused)}/{total} accepted"
                 + (f"; first refusal: {refused[0].refused}" if refused else ""))
    accepted = [o for o in outcomes if o.job_id]
    unended = [o.job_id for o in accepted if o.status not in TERMINAL]
    wrong = [o for o in accepted if o.status in TERMINAL and o.status != "succeeded"]
    ids = {o.job_id for o in accepted}
    records = {i: store.get_job(i) for i in ids}
    in_redis = Counter(r.status if r else "missing" for r in records.values())
    redis_unended = [i for i, r in records.items() if r is None or r.status not in TERMINAL]
    keys = sum(1 for _ in store.r.scan_iter(match=f"{store.p}:job:*", count=1000))
    open_jobs = store.open_jobs()
    report.check(not unended and not wrong and not redis_unended and len(ids) == len(accepted),
                 "zero lost jobs",
                 f"{len(accepted)} accepted, {len(accepted) - len(unended)} ended over HTTP "
                 f"({dict(Counter(o.status for o in accepted))}), in Redis {dict(in_redis)}; "
                 f"not ended: {len(unended)} over HTTP, {len(redis_unended)} in Redis; ended other than "
                 f"succeeded: {len(wrong)}"
                 + (f" (first: {wrong[0].job_id} {wrong[0].body and wrong[0].body.get('error')})" if wrong else ""))
    report.check(keys == len(ids) and open_jobs == 0, "Redis holds exactly the accepted jobs, none open",
                 f"{keys} job records for {len(ids)} accepted jobs; open jobs: {open_jobs}")


def check_seeds(report: Report, outcomes: list[Outcome]) -> None:
    """Who chose each succeeded job's noise: the client where it sent a seed (the result shows
    that seed, seed_source "caller"), else the service ("server"), as every memory job must."""
    wrong = []
    for o in outcomes:
        if o.status != "succeeded":
            continue
        sent = o.spec.options.get("seed")
        source, seed = o.result.get("seed_source"), o.result.get("seed")
        expected = source == "caller" and seed == sent if sent is not None else source == "server" and seed is not None
        if not expected:
            wrong.append(f"job {o.job_id} (seed sent {sent}): seed_source {source}, seed {seed}")
    memory_seeds = sum(1 for o in outcomes if o.spec.options.get("memory") and "seed" in o.spec.options)
    report.check(not wrong and not memory_seeds, "seeds: the caller's with the memory off, the service's with it on",
                 f"{sum(o.status == 'succeeded' for o in outcomes)} succeeded jobs, {len(wrong)} with another seed "
                 f"source; memory jobs sent with a seed: {memory_seeds}" + (f"; first: {wrong[0]}" if wrong else ""))


def memory_namespace_of(o: Outcome) -> str | None:
    """The memory a certification's result names (None: the memory was off)."""
    m = o.result.get("memory") or {}
    return m.get("namespace") if m.get("used") else None


def check_memory(report: Report, store: Store, outcomes: list[Outcome]) -> dict[str, Any]:
    """The memory checks of every namespace in Redis (see the module docstring); returns the
    figures (entries and outcomes per namespace)."""
    by_id = {o.job_id: o for o in outcomes if o.job_id}
    names = {memory_namespace_of(o): o.spec.model for o in by_id.values() if memory_namespace_of(o)}
    figures: dict[str, Any] = {}
    logged = logged_namespaces(store)
    unnamed = [o.job_id for o in by_id.values() if o.status == "succeeded" and o.spec.kind == "certification"
               and (o.result.get("memory") or {}).get("used") and memory_namespace_of(o) not in logged]
    report.check(not unnamed, "every memory result names a memory in Redis",
                 f"{len(logged)} memories in Redis; results naming none of them: {len(unnamed)}"
                 + (f" (first: job {unnamed[0]})" if unnamed else ""))
    for ns in logged:
        label = f"memory of {names.get(ns, '?')} ({ns})"
        listed = store.memory_namespaces(parse_namespace(ns)[0])
        report.check(ns in listed, f"{label}: listed in its model's namespaces", f"the model's namespaces: {listed}")
        log = read_log(store, ns)
        n, ids = len(log.entries), log.job_ids
        violations = log.violations()
        report.check(violations == 0, f"{label}: invariant",
                     f"{violations} pairs of intersecting different-class balls among {n} entries")
        problems = log.index_problems()
        report.check(not problems, f"{label}: one entry per job",
                     f"{n} entries, {len(set(ids))} distinct job ids, job index of {len(log.index)} "
                     + ("agrees with the log" if not problems else "; ".join(problems[:3])))
        used = [o for o in by_id.values() if o.status == "succeeded" and o.spec.kind == "certification"
                and memory_namespace_of(o) == ns]
        # A job whose input lay in a committed ball is answered from it and commits nothing
        # (memory.entry is None); every other job that used the memory commits one entry.
        committed = {o.job_id for o in used if o.result["memory"].get("entry") is not None}
        answered = [o for o in used if o.result["memory"].get("entry") is None]
        strays = set(ids) - committed
        missing = committed - set(ids)
        report.check(not strays and not missing, f"{label}: entries are exactly the committed jobs",
                     f"{len(used)} succeeded certifications used this memory, {len(committed)} committed: "
                     f"{len(missing)} have no entry, {len(strays)} entries belong to no such job")
        wrong = [o.job_id for o in answered if not _answer_from_ball(o, log)]
        report.check(not wrong, f"{label}: answers from committed balls",
                     f"{len(answered) - len(wrong)}/{len(answered)} jobs answered from a ball lie inside it, "
                     f"with its class and its radius less their distance"
                     + (f"; first wrong: job {wrong[0]}" if wrong else ""))
        mismatched = []
        for i, e in enumerate(log.entries):
            o = by_id.get(e.job_id)
            if o is None:
                continue
            r = o.result
            prediction = -1 if r.get("prediction") is None else r["prediction"]
            same = (str(i) == str(r["memory"].get("entry")) and prediction == e.prediction
                    and float(r.get("radius") or 0.0) == e.radius
                    and np.array_equal(e.values, o.spec.x.reshape(-1).astype(np.float32)))
            if not same:
                mismatched.append(e.job_id)
        report.check(not mismatched, f"{label}: each answer is its job's entry",
                     f"{n - len(mismatched)}/{n} entries match their job's answer (class, radius, index, "
                     f"input)" + (f"; first mismatch: job {mismatched[0]}" if mismatched else ""))
        chain = log.root_problems()
        report.check(not chain, f"{label}: every entry names its root",
                     f"{n} entries, {sum(e.outcome in ROOT_OUTCOMES for e in log.entries)} of them roots "
                     "(their own sampling); every inside entry carries its conflict's root and that root's "
                     "sampling" if not chain else f"{len(chain)} problems: {chain[:3]}")
        unrooted = [(o.job_id, p) for o in used if (p := log.answer_root_problem(o.result)) is not None]
        report.check(not unrooted, f"{label}: every answer names its root and reports the root's sampling",
                     f"{len(used) - len(unrooted)}/{len(used)} results name the root entry and job of the ball "
                     "they come from, and its σ, bound, n0, n, α and bounds"
                     + (f"; first: job {unrooted[0][0]} {unrooted[0][1]}" if unrooted else ""))
        outcomes_seen = Counter(by_id[j].result["memory"].get("outcome") for j in ids if j in by_id)
        figures[ns] = {"model": names.get(ns), "entries": n, "invariant_violations": violations,
                       "committed_outcomes": dict(outcomes_seen), "answered_from_a_ball": len(answered),
                       "roots": sum(e.outcome in ROOT_OUTCOMES for e in log.entries)}
    # Commits that lost the compare-and-set to another job and re-applied the rule: the
    # memory was written concurrently, not one job at a time.
    counters = store.metrics()["counters"]
    figures["commit_retries"] = {k.split(":", 1)[1]: int(v) for k, v in counters.items()
                                 if k.startswith("memory_commit_retries_total:")}
    return figures


def _answer_from_ball(o: Outcome, log: MemoryLog) -> bool:
    """A memory answer (no commit): outcome "inside", the answering entry j's class, and
    radius R_j − ‖x − x_j‖ > 0 (to float64 rounding)."""
    m, r = o.result["memory"], o.result
    if m.get("outcome") != "inside" or m.get("conflict") is None or not 0 <= int(m["conflict"]) < len(log.entries):
        return False
    j = int(m["conflict"])
    e = log.entries[j]
    d = float(np.linalg.norm(o.spec.x.reshape(-1).astype(np.float64) - log.points[j]))
    prediction = -1 if r.get("prediction") is None else r["prediction"]
    radius = float(r.get("radius") or 0.0)
    return prediction == e.prediction and d < e.radius and abs(radius - (e.radius - d)) <= 1e-9 * max(1.0, e.radius)


class RssSampler:
    """VmRSS of every process in each named process group, every `interval` seconds, with the
    number of jobs ended then (read from `counter()`), on a thread of its own."""

    def __init__(self, groups: dict[str, int], interval: float, counter):
        self.groups, self.interval, self.counter = groups, interval, counter
        self.samples: list[tuple[float, int, dict[str, float]]] = []  # (t, jobs ended, MiB by group)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        rss = {name: group_rss(pgid) / MIB for name, pgid in self.groups.items()}
        self.samples.append((time.monotonic() - self._t0, int(self.counter()), rss))


def group_rss(pgid: int) -> int:
    """Bytes of resident memory (VmRSS) of the processes in process group `pgid`."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            if int(stat[stat.rindex(")") + 2:].split()[2]) != pgid:  # field 5: pgrp
                continue
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue  # the process ended meanwhile
    return total


def rss_growth(samples: list[tuple[float, int, dict[str, float]]], name: str) -> dict[str, float]:
    """RSS figures of one group: at the first sample, after warm-up (the first sample at half
    the jobs), at the end, the peak, and the least-squares slope of RSS against jobs ended
    over the second half, in MiB per 1,000 jobs."""
    total = samples[-1][1]
    points = [(jobs, rss[name]) for _, jobs, rss in samples]
    late = [(j, r) for j, r in points if j >= total / 2]
    slope = float("nan")
    if len(late) >= 3 and len({j for j, _ in late}) >= 2:
        jobs, rss = np.array(late, dtype=np.float64).T
        slope = float(np.polyfit(jobs, rss, 1)[0] * 1000)
    return {"start_mib": round(points[0][1], 1), "warm_mib": round(late[0][1], 1) if late else float("nan"),
            "end_mib": round(points[-1][1], 1), "peak_mib": round(max(r for _, r in points), 1),
            "slope_mib_per_1000_jobs": round(slope, 2), "samples_after_warmup": len(late)}


def cells(outcomes: list[Outcome], *keys: str) -> dict[str, dict[str, int]]:
    """Jobs by the tags `keys` and by final status."""
    table: dict[str, Counter] = {}
    for o in outcomes:
        cell = "/".join(o.spec.tags.get(k, "-") for k in keys)
        table.setdefault(cell, Counter())[o.status or "refused"] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def memory_outcomes(outcomes: list[Outcome]) -> dict[str, int]:
    """Memory outcomes of the certifications that used it: new, shrunk, inside (committed:
    the rule answered from a ball), inside (answered from a ball before any sampling)."""
    seen: Counter = Counter()
    for o in outcomes:
        m = o.result.get("memory") or {}
        if o.status == "succeeded" and o.spec.kind == "certification" and m.get("used"):
            seen[m.get("outcome") if m.get("entry") is not None else "inside (answered, no commit)"] += 1
    return dict(seen)


# --- the soak workload ---------------------------------------------------------------------


def digits_pool(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from smoothcert.data import load_digits_split

    _, _, x, y = load_digits_split(seed)
    return np.asarray(x, dtype=np.float32), np.asarray(y)


def near(rng: np.random.Generator, x: np.ndarray, spread: float) -> np.ndarray:
    """A neighbour of x in [0, 1]: as often within `spread`, within spread/20 (a near
    duplicate: where x abstained, a certified neighbour reaches it and the rule shrinks it),
    or x itself."""
    u = rng.random()
    if u < 0.2:
        return np.asarray(x, dtype=np.float32)
    delta = rng.standard_normal(x.shape)
    scale = spread if u < 0.6 else spread / 20
    return np.clip(x + delta / np.linalg.norm(delta) * scale * rng.random(), 0.0, 1.0).astype(np.float32)


def soak_specs(args: argparse.Namespace) -> list[Spec]:
    """The seeded mixed workload (see the module docstring). An input is new (for digits a
    test image or a blend of two of different classes; for tiny a point at a chosen exact
    distance near the boundary; for rgb-linear a random image) or, with probability
    `--revisit`, a neighbour (`near`) of an earlier input of the same model."""
    rng = np.random.default_rng(args.seed)
    xd, yd = digits_pool(args.seed)

    def digit() -> np.ndarray:
        a, b = rng.choice(len(xd), 2, replace=False)
        if rng.random() < 0.3 and yd[a] != yd[b]:  # ambiguous: abstentions and conflicts
            return (0.5 * xd[a] + 0.5 * xd[b]).astype(np.float32)
        return xd[a]

    def tiny() -> np.ndarray:
        # Mean pixel 0.5 ± d/4: exact distance d to the boundary. This close to it, with these
        # n, some inputs abstain (committed with radius 0) and certified neighbours reach them.
        d, side = rng.choice([0.05, 0.075, 0.1, 0.15]), rng.choice([-1, 1])
        offset = rng.uniform(-0.2, 0.2, (1, 4, 4))
        return (0.5 + side * d / 4 + offset - offset.mean()).astype(np.float32)

    new = {"digits": (digit, 0.5), "tiny": (tiny, 0.06),
           "rgb-linear": (lambda: rng.random((3, 8, 8)).astype(np.float32), 0.3)}
    earlier: dict[str, list[np.ndarray]] = {m: [] for m in new}
    searches = {"ddrs": {"method": "ddrs", "steps": 10, "samples": 32},
                "insta": {"method": "insta", "samples": 64}}
    specs = []
    for _ in range(args.jobs):
        model = str(rng.choice(list(new), p=[0.45, 0.35, 0.2]))
        fresh, spread = new[model]
        seen = earlier[model]
        x = near(rng, seen[rng.integers(len(seen))], spread) if seen and rng.random() < args.revisit else fresh()
        seen.append(x)
        n = int(rng.choice(args.n))
        if rng.random() < 0.2:
            specs.append(Spec("prediction", model, x, {"n": n, "seed": int(rng.integers(2**62))},
                              {"kind": "prediction", "model": model, "memory": "-", "sigma": "fixed", "bound": "-"}))
            continue
        sigma_mode = str(rng.choice(["fixed", "ddrs", "insta"], p=[0.6, 0.2, 0.2]))
        memory = bool(rng.random() < (0.4 if sigma_mode == "fixed" else 0.75))
        bound = str(rng.choice(["cohen", "two_sided"]))
        sampling = "adaptive" if rng.random() < 0.2 else "fixed"
        options: dict[str, Any] = {"n0": args.n0, "n": n, "bound": bound, "memory": memory, "sampling": sampling}
        seed = int(rng.integers(2**62))  # drawn either way, so the workload is the same sequence
        if not memory:  # with the memory on the service draws the seed (a caller's is refused)
            options["seed"] = seed
        if sigma_mode != "fixed":
            options["sigma_search"] = searches[sigma_mode]
        specs.append(Spec("certification", model, x, options,
                          {"kind": "certification", "model": model, "memory": "on" if memory else "off",
                           "sigma": sigma_mode, "bound": bound, "sampling": sampling}))
    return specs


def lax_memory_env(args: argparse.Namespace) -> dict[str, str]:
    """This test's lax minimum n for the memory (the smallest `--n`), never a default."""
    return {"SMOOTHCERT_MEMORY_MIN_N": str(min(args.n))}


def soak(report: Report, logs: Path, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.deadline
    specs = soak_specs(args)
    report.figures["stack_env"] = env = lax_memory_env(args)
    with running_stack(logs, args.workers, env=env) as (stack, url):
        models = {m["name"]: m for m in (upload(url, tiny_bundle()[1]),
                                          upload(url, linear_bundle("rgb-linear", (3, 8, 8), 10, args.seed)))}
        report.figures["models_uploaded"] = models
        groups = {name: proc.pid for name, proc in stack.procs.items() if name.startswith("worker")}
        groups["api"] = stack.procs["api"].pid
        print(f"stack up at {url}: {args.workers} worker(s); {len(specs)} jobs from {args.clients} clients",
              flush=True)
        started = time.monotonic()
        driver = Driver(url, args.clients, deadline, "soak")
        with RssSampler(groups, args.sample_seconds, lambda: driver.finished) as sampler:
            outcomes = driver.run(specs)
        wall = time.monotonic() - started
        ended = sum(1 for o in outcomes if o.status in TERMINAL)
        report.figures["wall_seconds"] = round(wall, 1)
        report.figures["jobs_per_second"] = round(ended / wall, 2) if wall > 0 else 0.0
        report.figures["jobs_by_kind_model_memory"] = cells(outcomes, "kind", "model", "memory")
        report.figures["certifications_by_sigma_bound_sampling"] = cells(
            [o for o in outcomes if o.spec.kind == "certification"], "sigma", "bound", "sampling")
        report.figures["memory_outcomes"] = memory_outcomes(outcomes)
        latencies = sorted(o.seconds for o in outcomes if o.status in TERMINAL)
        if latencies:
            report.figures["job_seconds_p50_p99_max"] = [round(latencies[len(latencies) // 2], 2),
                                                         round(latencies[int(len(latencies) * 0.99)], 2),
                                                         round(latencies[-1], 2)]
        check_processes(report, stack)
        store = stack.store()
        try:
            check_jobs(report, store, outcomes, len(specs))
            check_seeds(report, outcomes)
            report.figures["memory"] = check_memory(report, store, outcomes)
        finally:
            store.r.close()
        seen = report.figures["memory_outcomes"]
        report.check(seen.get("inside", 0) + seen.get("inside (answered, no commit)", 0) > 0
                     and seen.get("shrunk", 0) > 0, "the memory was exercised", f"memory outcomes {seen}")
        rss = {name: rss_growth(sampler.samples, name) for name in groups}
        report.figures["rss"] = rss
        report.figures["rss_samples"] = [[round(t, 1), jobs, {k: round(v, 1) for k, v in r.items()}]
                                         for t, jobs, r in sampler.samples]
        for name in sorted(g for g in groups if g.startswith("worker")):
            r = rss[name]
            report.check(r["slope_mib_per_1000_jobs"] < args.max_growth_mib, f"flat memory of {name}",
                         f"RSS {r['start_mib']} MiB at start, {r['warm_mib']} after warm-up, {r['end_mib']} at "
                         f"the end, peak {r['peak_mib']}; slope after warm-up {r['slope_mib_per_1000_jobs']} MiB "
                         f"per 1,000 jobs ({r['samples_after_warmup']} samples; bound {args.max_growth_mib})")
        if time.monotonic() > deadline:
            report.check(False, "finished within the deadline", f"{args.deadline} s passed")


def parser() -> argparse.ArgumentParser:
    p = scenario_parser(__doc__, deadline=1500.0)
    p.add_argument("--jobs", type=int, default=6000, help="jobs in the workload (the issue asks ≥ 2,000)")
    p.add_argument("--clients", type=int, default=16, help="concurrent SDK clients")
    p.add_argument("--workers", type=int, default=2, help="Celery workers (processes)")
    p.add_argument("--n0", type=int, default=20, help="selection samples of a certification")
    p.add_argument("--n", type=int, nargs="+", default=[200, 500, 1000], help="n, drawn per job from these")
    p.add_argument("--revisit", type=float, default=0.4, help="fraction of inputs near an earlier one")
    p.add_argument("--sample-seconds", type=float, default=3.0, help="RSS sampling interval")
    p.add_argument("--max-growth-mib", type=float, default=30.0,
                   help="largest RSS growth allowed after warm-up, MiB per 1,000 jobs per worker")
    return p


def run(args: argparse.Namespace) -> Report:
    return run_scenario("soak", args, lambda report, logs: soak(report, logs, args))


if __name__ == "__main__":
    sys.exit(main(parser(), run))
