"""Worker crash: whole Celery workers are killed with SIGKILL at random points of their jobs,
between memory commit and result included, and restarted, repeatedly (issue 6).

What it proves, from Redis state after the run (never from logs):
- every job ended (succeeded, or failed with a code and a message) before the deadline;
- each ended exactly once: the finish script counts jobs_finished_total:<kind>:<status> and
  answered_total:<kind> in the same atomic step as the end, so the counters equal the jobs'
  final statuses (a second end would count twice);
- each memory holds exactly one entry per committed job: entry job ids unique, every entry's
  job succeeded naming that entry, every succeeded memory job that committed has its entry,
  and jobs that did not commit (memory off, predictions, answers from memory) have none;
- the memory invariant holds (no two balls of different classes intersect);
- every entry names its root (docs/memory.md: the "new" or "shrunk" entry whose own sampling
  produced the ball) and carries that root's sampling;
- a job killed between its commit and its result, redelivered, returns exactly the committed
  entry (class, radius, and its root's σ).

How: a private stack (Redis, API, --workers threads-pool workers with a short visibility
timeout so that a dead worker's jobs are redelivered quickly). A client submits a mix of
certifications (memory on, mostly; memory off), predictions, on the exact "tiny" model and
the demo model, through the SDK, paced so that jobs are in flight at every kill. The jobs
satisfy the memory's rules at the service's defaults, so the stack runs with them: α = 0.001
(one of the memory's levels: the namespaces are digest/fp32/cpu/0.001), n ≥ 1000 (the
smallest n here is 1000), and a seed only with the memory off (the service draws it
otherwise). Workers run
with the testing hook SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS (workers/failpoints.py): a job
that committed its memory entry holds still before writing its result, so a share of the
kills is aimed at that window (a job observed with its entry and no end, on the worker that
Celery's `inspect active` says runs it), a share at a sampling job, the rest at random. Each
kill is classified by what the victim's jobs were doing at that moment (read from Redis right
after the kill): commit→result (entry, no end), sampling (running, nothing committed), idle
(no job).
"""

from __future__ import annotations

import argparse
import ast
import math
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from celery import Celery

from benchmarks.stack import USER, Stack
from clients import Client
from reliability.memory_log import read_log
from reliability.report import Report, main, run_scenario, scenario_parser
from service.store import TERMINAL, Store
from service.up import worker_command
from smoothcert.results import DEFAULT_NUMERIC_MODE, memory_namespace
from tests.workers.helpers import make_bundle


def parser() -> argparse.ArgumentParser:
    p = scenario_parser(__doc__, deadline=900.0)
    p.add_argument("--jobs", type=int, default=240, help="jobs submitted in all")
    p.add_argument("--kills", type=int, default=24, help="workers killed with SIGKILL")
    p.add_argument("--workers", type=int, default=2, help="workers running at once")
    p.add_argument("--aim-commit", type=float, default=0.4,
                   help="share of kills aimed at a job between commit and result")
    p.add_argument("--aim-sampling", type=float, default=0.4,
                   help="share of kills aimed at a job sampling (the rest: at random moments)")
    p.add_argument("--min-commit-kills", type=int, default=5,
                   help="fail unless at least this many kills hit a job between commit and result")
    p.add_argument("--pause", type=float, default=1.5,
                   help="SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS of the workers (the commit→result window)")
    p.add_argument("--visibility-timeout", type=int, default=10,
                   help="SMOOTHCERT_VISIBILITY_TIMEOUT_SECONDS: redelivery delay after a worker dies")
    p.add_argument("--in-flight", type=int, default=16, help="open jobs the client keeps at most")
    p.add_argument("--demo-share", type=float, default=0.1, help="share of jobs on the demo model")
    return p


@dataclass
class Job:
    id: str
    kind: str  # certification | prediction
    model: str
    memory: bool


@dataclass
class Kill:
    worker: str
    aimed: str  # commit | sampling | random
    phase: str = "idle"  # commit→result | sampling | idle
    jobs: dict[str, str] = field(default_factory=dict)  # job id → its phase at the kill
    entries: dict[str, int] = field(default_factory=dict)  # job id → committed index
    at: float = 0.0  # seconds into the run


MODES = {"certification-memory": 0.7, "certification": 0.15, "prediction": 0.15}
ALPHA = 0.001  # every certification's: one of the memory's default levels


def make_requests(n: int, rng: np.random.Generator, demo_share: float) -> list[dict]:
    """The job mix: inputs spread over both classes of the tiny model (some repeated, so the
    memory answers or conflicts), sample sizes from short to long (sampling lasts up to ~1 s)."""
    out, seen = [], []
    for _ in range(n):
        mode = rng.choice(list(MODES), p=list(MODES.values()))
        demo = rng.random() < demo_share
        shape = (1, 8, 8) if demo else (1, 4, 4)
        if seen and rng.random() < 0.2 and seen[-1].shape == shape:
            x = seen[int(rng.integers(len(seen)))] if rng.random() < 0.5 else seen[-1]
            if x.shape != shape:  # an earlier input of the other model: repeat the last one instead
                x = seen[-1]
        else:
            x = np.clip(rng.uniform(0.1, 0.9) + rng.normal(0, 0.2, shape), 0, 1).astype(np.float32)
        if x.shape == shape:
            seen.append(x)
        n_samples = int(rng.choice([1000, 5000])) if demo else int(rng.choice([20_000, 100_000, 400_000, 1_000_000]))
        options = {"n": n_samples}
        seed = int(rng.integers(2**31))  # drawn either way, so the workload is the same sequence
        if mode != "certification-memory":  # with the memory on the service draws the seed
            options["seed"] = seed
        if mode != "prediction":
            options["memory"] = mode == "certification-memory"
            options["alpha"] = ALPHA
        out.append({"kind": "prediction" if mode == "prediction" else "certification",
                    "model": "digits" if demo else "tiny", "x": x, "options": options})
    return out


class Submitter(threading.Thread):
    """Submits the requests through the SDK, keeping at most `in_flight` jobs open and at
    most `allowed()` submitted (the kill loop raises it), so that jobs flow at every kill."""

    def __init__(self, url: str, store: Store, requests: list[dict], in_flight: int, allowed, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.store, self.requests, self.in_flight = url, store, requests, in_flight
        self.allowed, self.stop = allowed, stop
        self.jobs: list[Job] = []
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            with Client(self.url, api_key=USER, timeout=60) as client:
                for req in self.requests:
                    while not self.stop.is_set() and (len(self.jobs) >= self.allowed()
                                                      or self.open() >= self.in_flight):
                        time.sleep(0.05)
                    if self.stop.is_set():
                        return
                    submit = client.predict if req["kind"] == "prediction" else client.certify
                    job = submit(req["x"], model=req["model"], **req["options"])
                    with self.lock:
                        self.jobs.append(Job(job.id, req["kind"], req["model"], bool(req["options"].get("memory"))))
        except BaseException as e:  # reported by the scenario
            self.error = e

    def snapshot(self) -> list[Job]:
        with self.lock:
            return list(self.jobs)

    def open(self) -> int:
        return sum(1 for s in statuses(self.store, [j.id for j in self.snapshot()]).values() if s not in TERMINAL)


def statuses(store: Store, ids: list[str]) -> dict[str, str]:
    return {i: s or "missing" for i, s in store.statuses(ids).items()}


def active_jobs(celery: Celery, hostname: str, timeout: float = 2.0) -> list[str] | None:
    """The job ids `hostname` runs now, as the worker itself answers (None: no answer)."""
    replies = celery.control.inspect(destination=[hostname], timeout=timeout, limit=1).active() or {}
    if hostname not in replies:
        return None
    out = []
    for task in replies[hostname]:
        args = task.get("args")
        if isinstance(args, str):  # older protocols send the repr
            args = ast.literal_eval(args)
        out.extend(str(a) for a in args[:1])
    return out


def body(args: argparse.Namespace, report: Report, logs: Path) -> None:
    started = time.monotonic()
    deadline = started + args.deadline
    rng = np.random.default_rng(args.seed)
    chooser = random.Random(args.seed)
    env = {"OMP_NUM_THREADS": "1", "SMOOTHCERT_VISIBILITY_TIMEOUT_SECONDS": str(args.visibility_timeout)}
    with Stack(logs, env=env) as stack:
        store = stack.store()
        with tempfile.TemporaryDirectory() as folder:
            tiny_digest, spec, bundle = make_bundle(Path(folder))
        store.put_model("tiny", tiny_digest, spec, bundle)
        namespaces = {"tiny": memory_namespace(tiny_digest, DEFAULT_NUMERIC_MODE, stack.device, ALPHA),
                      "digits": memory_namespace(store.get_model("digits").digest, DEFAULT_NUMERIC_MODE,
                                                 stack.device, ALPHA)}
        generation = Counter()

        def start_worker(slot: int) -> str:
            generation[slot] += 1
            name = f"w{slot}-{generation[slot]}"
            stack.worker(name, worker_command(name), SMOOTHCERT_PAUSE_AFTER_COMMIT_SECONDS=str(args.pause))
            return name

        live = {slot: start_worker(slot) for slot in range(args.workers)}
        url = stack.api(workers=1)
        stack.wait(lambda: len(store.live_workers(5)) >= args.workers, 120, "the workers' heartbeats")
        celery = Celery("reliability", broker=stack.redis_url)

        kills: list[Kill] = []
        stop = threading.Event()
        submitter = Submitter(url, store, make_requests(args.jobs, rng, args.demo_share), args.in_flight,
                              lambda: math.ceil(args.jobs * (len(kills) + 1) / max(1, args.kills)), stop)
        submitter.start()
        try:
            for _ in range(args.kills):
                if time.monotonic() > deadline or submitter.error is not None:
                    break
                time.sleep(chooser.uniform(0.5, 2.5))
                draw = chooser.random()
                aimed = ("commit" if draw < args.aim_commit
                         else "sampling" if draw < args.aim_commit + args.aim_sampling else "random")
                slot, active = None, None
                if aimed != "random":
                    slot, active = find_target(aimed, store, celery, submitter, namespaces, live,
                                               min(deadline, time.monotonic() + 15))
                if slot is None:
                    slot = chooser.choice(sorted(live))
                    active = active_jobs(celery, f"celery@{live[slot]}") or []
                kill = Kill(live[slot], aimed, at=round(time.monotonic() - started, 2))
                stack.kill(live[slot], signal.SIGKILL)
                classify(store, kill, active, submitter.snapshot(), namespaces)
                kills.append(kill)
                live[slot] = start_worker(slot)
            last_kill = time.monotonic()
            # Every kill done: let the rest of the jobs be submitted, then drain.
            while submitter.is_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            ids = [j.id for j in submitter.snapshot()]
            while time.monotonic() < deadline:
                if all(s in TERMINAL for s in statuses(store, ids).values()):
                    break
                stack.wait(lambda: True, 1, "")  # raises if a process died unexpectedly
                time.sleep(0.5)
            drained = time.monotonic()
        finally:
            stop.set()
        if submitter.error is not None:
            raise RuntimeError(f"the client failed: {submitter.error!r}")
        verify(report, store, args, submitter.snapshot(), kills, namespaces, drained - last_kill,
               drained - started, time.monotonic() <= deadline)


def find_target(aim: str, store: Store, celery: Celery, submitter: Submitter, namespaces: dict[str, str],
                live: dict[int, str], until: float) -> tuple[int | None, list[str] | None]:
    """A live worker running a job in the phase aimed at (commit: its entry committed and no
    end yet; sampling: running with nothing committed), and the jobs it runs; (None, None)
    if none was found before `until`."""
    while time.monotonic() < until:
        jobs = submitter.snapshot()
        state = statuses(store, [j.id for j in jobs])
        running = [j for j in jobs if state[j.id] == "running"]
        wanted = {j.id for j in running
                  if (j.memory and store.memory_entry_of(namespaces[j.model], j.id) is not None) == (aim == "commit")}
        if wanted:
            for slot, name in live.items():
                active = active_jobs(celery, f"celery@{name}", timeout=1.0)
                if active and wanted & set(active):
                    return slot, active
        time.sleep(0.05)
    return None, None


def classify(store: Store, kill: Kill, active: list[str], jobs: list[Job], namespaces: dict[str, str]) -> None:
    """The phase of each job the victim ran, read from Redis right after the kill: a job that
    ended in between (after `inspect`) was not interrupted and is left out."""
    by_id = {j.id: j for j in jobs}
    state = statuses(store, active)
    for job_id in active:
        if state[job_id] in TERMINAL or job_id not in by_id:
            continue
        job = by_id[job_id]
        entry = store.memory_entry_of(namespaces[job.model], job_id) if job.memory else None
        if entry is not None:
            kill.jobs[job_id], kill.entries[job_id] = "commit→result", entry
        else:
            kill.jobs[job_id] = "sampling"
    phases = set(kill.jobs.values())
    kill.phase = "commit→result" if "commit→result" in phases else "sampling" if phases else "idle"


def verify(report: Report, store: Store, args, jobs: list[Job], kills: list[Kill], namespaces: dict[str, str],
           drain_s: float, total_s: float, in_time: bool) -> None:
    records = {j.id: store.get_job(j.id) for j in jobs}
    ended = [i for i, r in records.items() if r is not None and r.status in TERMINAL]
    report.check(len(jobs) == args.jobs, "every job submitted", f"{len(jobs)} of {args.jobs}")
    report.check(len(kills) >= args.kills, "every kill done", f"{len(kills)} of {args.kills} SIGKILLs")
    report.check(in_time and len(ended) == len(jobs), "every job ended before the deadline",
                 f"{len(ended)} of {len(jobs)} ended; drained {drain_s:.1f} s after the last kill")

    # Ended exactly once: the finish script's counters against the final statuses.
    final = Counter((r.kind, r.status) for r in records.values() if r is not None)
    counters = store.metrics()["counters"]
    mismatched = {f"{k}:{s}": (counters.get(f"jobs_finished_total:{k}:{s}", 0), n)
                  for (k, s), n in final.items() if s in TERMINAL
                  and counters.get(f"jobs_finished_total:{k}:{s}", 0) != n}
    for kind in ("certification", "prediction"):
        succeeded = final.get((kind, "succeeded"), 0)
        if counters.get(f"answered_total:{kind}", 0) != succeeded:
            mismatched[f"answered:{kind}"] = (counters.get(f"answered_total:{kind}", 0), succeeded)
    report.check(not mismatched, "each job ended exactly once",
                 "finish counters equal the final statuses" if not mismatched
                 else f"counter vs jobs: {mismatched}")
    failed = [r for r in records.values() if r is not None and r.status == "failed"]
    reasons = Counter(r.error.get("code") if r.error else None for r in failed)
    report.check(all(r.error and r.error.get("code") and r.error.get("message") for r in failed),
                 "every failed job has a reason", f"{len(failed)} failed: {dict(reasons)}")
    report.check(reasons.get("internal", 0) == 0 and "cancelled" not in {r.status for r in records.values() if r},
                 "no job failed unexpectedly", f"failures by code: {dict(reasons)}")

    # The memory: one entry per committed job, the invariant, redelivered answers.
    problems: list[str] = []
    violations, entries_total = 0, 0
    committed: dict[str, tuple[int, object]] = {}  # job id → (index, entry)
    for model, ns in namespaces.items():
        log = read_log(store, ns)
        decoded = log.entries
        entries_total += len(decoded)
        problems += [f"{model}: {p}" for p in log.index_problems() + log.root_problems()]
        for i, e in enumerate(decoded):
            committed[e.job_id] = (i, e)
            r = records.get(e.job_id)
            if r is None or r.status != "succeeded" or r.result["memory"].get("entry") != str(i):
                problems.append(f"{model} entry {i}: its job {e.job_id} is "
                                f"{None if r is None else (r.status, (r.result or {}).get('memory'))}")
            elif (r.result["prediction"], r.result["radius"], r.result["sigma"]) != (
                    None if e.prediction < 0 else e.prediction, e.radius, e.provenance.sigma):
                problems.append(f"{model} entry {i}: job {e.job_id} answered a different certificate")
        violations += log.violations()
    for j in jobs:
        r = records[j.id]
        has = j.id in committed
        if r is None or r.status != "succeeded":
            if has:
                problems.append(f"job {j.id} ({None if r is None else r.status}) has a memory entry")
            continue
        memory = r.result.get("memory") if j.kind == "certification" else None
        says = memory.get("entry") if memory and memory.get("used") else None
        if says is not None and not has:
            problems.append(f"job {j.id} names entry {says} ({memory.get('outcome')}) that is not in the log")
        if says is None and has:
            problems.append(f"job {j.id} ({j.kind}, memory {j.memory}) has an entry it does not name")
    report.check(not problems, "one memory entry per committed job",
                 f"{entries_total} entries, all named by their succeeded job" if not problems
                 else f"{len(problems)} problems: {problems[:5]}")
    report.check(violations == 0, "memory invariant", f"{violations} intersecting balls of different classes")

    window = {j: (i, k) for k in kills for j, i in k.entries.items()}
    same = [j for j, (i, _) in window.items() if records[j] is not None and records[j].status == "succeeded"
            and records[j].result["memory"].get("entry") == str(i) and committed.get(j, (None,))[0] == i]
    report.check(len(same) == len(window), "jobs killed between commit and result return their entry",
                 f"{len(same)} of {len(window)} redelivered jobs answered exactly the committed entry")
    interrupted = {j for k in kills for j in k.jobs}
    redelivered = [j for j in interrupted if records[j] is not None and records[j].status in TERMINAL]
    report.check(len(redelivered) == len(interrupted), "every interrupted job was redelivered and ended",
                 f"{len(redelivered)} of {len(interrupted)}")
    phases = Counter(k.phase for k in kills)
    report.check(phases["commit→result"] >= args.min_commit_kills, "kills between commit and result",
                 f"{phases['commit→result']} (at least {args.min_commit_kills} required); "
                 f"all kills by phase: {dict(phases)}")
    report.figures.update({
        "jobs": len(jobs), "jobs_by_status": {f"{k}:{s}": n for (k, s), n in sorted(final.items())},
        "kills": len(kills), "kills_by_phase": dict(phases),
        # Not exclusive: a kill that interrupted jobs in both phases counts in both.
        "kills_hitting_phase": {p: sum(p in k.jobs.values() for k in kills) for p in ("commit→result", "sampling")},
        "kills_aimed_at_commit": sum(k.aimed == "commit" for k in kills),
        # A job interrupted by several kills counts once per kill: each interruption of a job
        # that had not ended, followed by its end, is one redelivery.
        "interruptions_by_phase": dict(Counter(p for k in kills for p in k.jobs.values())),
        "redeliveries_observed": sum(len(k.jobs) for k in kills),
        "distinct_jobs_interrupted": len(interrupted), "memory_entries": entries_total,
        "invariant_violations": violations, "drain_after_last_kill_s": round(drain_s, 1),
        "run_s": round(total_s, 1), "visibility_timeout_s": args.visibility_timeout,
        "pause_after_commit_s": args.pause,
        "kill_log": [{"worker": k.worker, "aimed": k.aimed, "phase": k.phase, "at_s": k.at, "jobs": k.jobs}
                     for k in kills],
    })
    print(f"jobs {len(jobs)}, kills {len(kills)} by phase {dict(phases)}, "
          f"{sum(len(k.jobs) for k in kills)} interruptions of {len(interrupted)} jobs "
          f"({len(window)} between commit and result), drained {drain_s:.1f} s after the last kill, "
          f"run {total_s:.0f} s")


def run(args: argparse.Namespace) -> Report:
    return run_scenario("worker_crash", args, lambda report, logs: body(args, report, logs))


if __name__ == "__main__":
    sys.exit(main(parser(), run))
