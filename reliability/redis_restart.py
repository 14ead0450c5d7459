"""Redis restart under load: Redis (append-only on) is stopped and started again, several
times, while concurrent clients submit certifications and poll them.

The real stack (redis-server, Celery workers in the threads pool, uvicorn) serves clients
that submit certifications of the demo model and of the exact "tiny" model, memory on and
off (no seed: with the memory on the service draws it; α the default 0.001, one of the
memory's levels, and n = `--n` ≥ 1000, the memory's default minimum: the stack runs with the
service's default memory rules), and poll them to their ends. At thresholds of accepted jobs
the scenario stops Redis (SIGTERM; `--stop kill`: SIGKILL; the stack's Redis, as every
smoothcert Redis, runs with `appendfsync always`, so no acknowledged write may be lost either
way), keeps it away `--down-seconds` while a probe keeps asking the API, and starts it again
on the same port (the append-only file reloads). It proves, from HTTP answers and Redis
state:
- while Redis is away every answer is /v2/health/live's 200 or a 503 with the JSON error
  body and a message naming Redis or the broker (readiness included); never a 500, a stack
  trace or a request hanging past `--answer-bound` seconds, at any time;
- every accepted job (202 with an id) ends, succeeded; every job Redis holds has ended (no
  job left queued or running with no one to run it), and the open-job count returns to 0
  (a job whose task message the outage lost is queued again by workers/recovery.py, about
  30 s after Redis is back; `task_deliveries` counts every delivery);
- the memory is intact: the log before each stop is a prefix of the log after the restart
  (same entries, same order); at the end, one entry per committing job, each where its
  result says, and the invariant (no two balls of different classes intersect) holds;
- the workers ride the outage out: their heartbeats and consumers come back by themselves.
It reports the restarts, the seconds away, the 503 counts, and the times from Redis's
return to readiness, to the first accepted submission and to the first job a worker ended.
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np

from benchmarks.stack import USER, Stack
from reliability.memory_log import read_log
from reliability.report import Report, common_arguments, main, run_scenario
from service.store import TERMINAL, Store
from service.up import worker_command
from smoothcert.results import DEFAULT_NUMERIC_MODE, memory_namespace
from tests.workers.helpers import make_bundle

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
POLL_WAIT = 1.0  # seconds a poll may long-wait for its job
CLEAR_CODES = {"unavailable", "enqueue_failed", "not_ready"}
ALPHA = 0.001  # the API's default α, which every job here has: one of the memory's default levels


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--jobs", type=int, default=300, help="certifications to have accepted in all")
    p.add_argument("--restarts", type=int, default=3, help="times Redis is stopped and started")
    p.add_argument("--down-seconds", type=float, default=8.0, help="how long Redis stays away each time")
    p.add_argument("--stop", choices=("term", "kill"), default="term",
                   help="SIGTERM, or SIGKILL (appendfsync always, as always: no acknowledged write may be lost)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--open-per-client", type=int, default=3, help="jobs a client keeps open at once")
    p.add_argument("--workers", type=int, default=2, help="Celery workers (threads pool)")
    p.add_argument("--api-workers", type=int, default=2, help="uvicorn processes")
    p.add_argument("--n", type=int, default=4000, help="samples per certification")
    p.add_argument("--batch-size", type=int, default=50,
                   help="batch size (small: many batches, so jobs are mid-run when Redis goes)")
    p.add_argument("--worker-retry-seconds", type=float, default=None,
                   help="SMOOTHCERT_REDIS_RETRY_SECONDS of the workers (default: the product's); below "
                        "--down-seconds, running jobs outlast their retries and must come back by redelivery")
    p.add_argument("--visibility-timeout", type=int, default=60,
                   help="SMOOTHCERT_VISIBILITY_TIMEOUT_SECONDS: when an unacknowledged job is handed out again")
    p.add_argument("--answer-bound", type=float, default=10.0,
                   help="seconds any answer may take (a long poll: this plus its wait)")
    p.add_argument("--deadline", type=float, default=1200.0, help="seconds for the whole run")
    common_arguments(p)
    return p


@dataclass
class Answer:
    start: float  # time.monotonic()
    end: float
    route: str  # "submit", "poll", "live", "ready", "models"
    status: int  # 0: no HTTP answer (transport error or timeout)
    code: str | None  # the error body's code, when there is one
    message: str
    body_ok: bool  # a 2xx, or an error with the JSON error body and no stack trace
    bound: float


@dataclass
class Outage:
    stopped: float  # monotonic: redis-server has exited
    restarting: float  # monotonic: start_redis() called
    back: float  # monotonic: Redis answers again
    back_wall: float  # time.time() of `back`, to compare with job records
    running_at_stop: int
    entries_at_stop: dict[str, int] = field(default_factory=dict)


class Load:
    """The clients and the probe: every HTTP answer they get is logged in `answers`."""

    def __init__(self, args: argparse.Namespace, url: str, tiny: str):
        self.args, self.url = args, url
        self.rng = random.Random(args.seed)
        images = sorted(EXAMPLES.glob("digit-*.png"))
        self.digits = [base64.b64encode(p.read_bytes()).decode() for p in images]
        self.tiny = tiny
        self.lock = threading.Lock()
        self.answers: list[Answer] = []
        self.accepted: dict[str, str] = {}  # job id → last status seen
        self.bodies: dict[str, dict] = {}  # job id → its request
        self.duplicates = 0
        self.unexpected: Counter = Counter()
        self.stop = threading.Event()
        self.deadline = time.monotonic() + args.deadline

    def body(self, rng: random.Random) -> dict:
        memory = rng.random() < 0.5
        common = {"n0": 100, "n": self.args.n, "batch_size": self.args.batch_size, "memory": memory}
        if rng.random() < 0.5:
            return {"model": "digits", "input": {"image_b64": rng.choice(self.digits)}, **common}
        # Means spread around the boundary (0.5): both classes, varied radii, some abstentions.
        x = np.clip(rng.uniform(0.2, 0.8) + np.asarray([rng.gauss(0, 0.05) for _ in range(16)]), 0, 1)
        return {"model": self.tiny, "input": {"tensor": x.reshape(1, 4, 4).round(4).tolist()}, **common}

    def request(self, http: httpx.Client, method: str, path: str, route: str, wait: float = 0.0,
                **kw) -> tuple[int, dict | None]:
        bound = self.args.answer_bound + wait
        start = time.monotonic()
        try:
            r = http.request(method, path, timeout=bound + 5, **kw)
        except httpx.HTTPError as e:
            self._log(Answer(start, time.monotonic(), route, 0, None, f"{type(e).__name__}: {e}", False, bound))
            return 0, None
        end = time.monotonic()
        try:
            data = r.json()
        except ValueError:
            data = None
        code = message = None
        body_ok = 200 <= r.status_code < 300 and data is not None
        if r.status_code >= 300:
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(error, dict) and set(error) >= {"code", "message"}:
                code, message = str(error["code"]), str(error["message"])
                body_ok = "Traceback" not in r.text and bool(message)
            else:
                message = r.text[:200]
        self._log(Answer(start, end, route, r.status_code, code, message or "", body_ok, bound))
        return r.status_code, data

    def _log(self, answer: Answer) -> None:
        with self.lock:
            self.answers.append(answer)

    def want_more(self) -> bool:
        with self.lock:
            return len(self.accepted) < self.args.jobs

    def client(self, index: int) -> None:
        """Submit (retrying a 503 or a lost answer, with an Idempotency-Key on odd clients,
        as a careful client does) while more jobs are wanted; poll own jobs to their ends."""
        rng = random.Random(f"{self.args.seed}-{index}")
        mine: list[str] = []
        headers = {"Authorization": f"Bearer {USER}"}
        with httpx.Client(base_url=self.url, headers=headers) as http:
            pending: tuple[dict, dict] | None = None  # a submission to (re)send
            sent = 0
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                if pending is None and len(mine) < self.args.open_per_client and self.want_more():
                    sent += 1
                    key = {"Idempotency-Key": f"c{index}-{sent}"} if index % 2 else {}
                    pending = (self.body(rng), key)
                if pending is not None:
                    body, key = pending
                    status, data = self.request(http, "POST", "/v1/certifications", "submit", json=body, headers=key)
                    if status in (200, 201, 202) and data and "id" in data:
                        with self.lock:
                            if data["id"] in self.accepted:
                                self.duplicates += 1
                            self.accepted.setdefault(data["id"], data.get("status", "queued"))
                            self.bodies[data["id"]] = body
                        mine.append(data["id"])
                        pending = None
                    elif status in (0, 503):
                        time.sleep(0.25)  # Redis away: retry the same submission shortly
                    else:
                        self.unexpected[f"submit {status}"] += 1
                        pending = None
                        time.sleep(0.25)
                    continue
                if not mine:
                    if not self.want_more():
                        return
                    time.sleep(0.05)
                    continue
                job_id = mine.pop(0)
                status, data = self.request(http, "GET", f"/v1/certifications/{job_id}?wait={POLL_WAIT}", "poll",
                                            wait=POLL_WAIT)
                if status == 200 and data:
                    with self.lock:
                        self.accepted[job_id] = data["status"]
                    if data["status"] in TERMINAL:
                        continue
                elif status == 404:
                    with self.lock:
                        self.accepted[job_id] = "missing"
                    continue
                elif status != 503 and status != 0:
                    self.unexpected[f"poll {status}"] += 1
                if status in (0, 503):
                    time.sleep(0.25)
                mine.append(job_id)

    def probe(self, until: threading.Event, job_id: str | None) -> None:
        """Every route kind, over and over, while Redis is away."""
        headers = {"Authorization": f"Bearer {USER}"}
        rng = random.Random(self.args.seed)
        with httpx.Client(base_url=self.url, headers=headers) as http:
            while not until.is_set():
                self.request(http, "GET", "/v2/health/live", "live")
                self.request(http, "GET", "/v2/health/ready", "ready")
                self.request(http, "GET", "/v1/models", "models")
                if job_id is not None:
                    self.request(http, "GET", f"/v1/certifications/{job_id}", "poll")
                self.request(http, "POST", "/v1/certifications", "submit", json=self.body(rng))
                until.wait(0.2)

    def accepted_count(self) -> int:
        with self.lock:
            return len(self.accepted)


def open_states(store: Store) -> Counter:
    """Statuses of the jobs in the open-jobs set (what the queue limit counts)."""
    ids = [m.decode() for m in store.r.zrange(f"{store.p}:jobs:open", 0, -1)]
    return Counter(j.status if (j := store.get_job(i)) else "missing" for i in ids)


def all_jobs(store: Store) -> dict[str, object]:
    """Every job record Redis holds, whoever created it."""
    ids = [k.decode().rsplit(":", 1)[1] for k in store.r.scan_iter(match=f"{store.p}:job:*", count=1000)]
    return {i: j for i in ids if (j := store.get_job(i)) is not None}


def namespaces(store: Store, device: str) -> dict[str, str]:
    """The memory of each model at the API's default α (the jobs give none)."""
    return {name: memory_namespace(store.get_model(name).digest, DEFAULT_NUMERIC_MODE, device, ALPHA)
            for name in ("digits", "tiny")}


def wait_until(predicate, seconds: float, step: float = 0.1) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    return None


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run(args: argparse.Namespace) -> Report:
    return run_scenario("redis_restart", args, lambda report, logs: _body(args, report, logs))


def _body(args: argparse.Namespace, report: Report, logs: Path) -> None:
    env = {"SMOOTHCERT_JOB_TIME_LIMIT_SECONDS": "600",
           "SMOOTHCERT_VISIBILITY_TIMEOUT_SECONDS": str(args.visibility_timeout), "OMP_NUM_THREADS": "1"}
    if args.worker_retry_seconds is not None:
        env["SMOOTHCERT_REDIS_RETRY_SECONDS"] = str(args.worker_retry_seconds)
    with Stack(logs, env=env) as stack:
        store = stack.store()
        digest, spec, zipped = make_bundle(logs / "tiny-bundle")
        store.put_model("tiny", digest, spec, zipped)
        names = [f"w{i}" for i in range(args.workers)]
        for name in names:
            stack.worker(name, worker_command(f"{name}@%h"))
        url = stack.api(workers=args.api_workers)
        load = Load(args, url, "tiny")
        spaces = namespaces(store, stack.device)
        outages: list[Outage] = []
        prefix_ok: list[str] = []
        ready_after: list[float | None] = []
        clients = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in clients:
            t.start()
        try:
            for k in range(args.restarts):
                threshold = (k + 1) * args.jobs // (args.restarts + 1)
                if wait_until(lambda t=threshold: load.accepted_count() >= t, load.deadline - time.monotonic()) is None:
                    raise TimeoutError(f"the deadline passed before restart {k + 1} ({load.accepted_count()} accepted)")
                # Stop Redis while jobs run, so that a worker is mid-job (bounded wait).
                wait_until(lambda s=store: open_states(s)["running"] > 0, 10, 0.02)
                running = open_states(store)["running"]
                before = {name: store.memory_entries(ns) for name, ns in spaces.items()}
                store.r.close()
                stack.stop_redis(kill=args.stop == "kill")
                stopped = time.monotonic()
                with load.lock:
                    some_job = next(iter(load.accepted), None)
                done = threading.Event()
                probe = threading.Thread(target=load.probe, args=(done, some_job), daemon=True)
                probe.start()
                time.sleep(args.down_seconds)
                done.set()
                probe.join(args.answer_bound * 5 + 10)
                restarting = time.monotonic()
                stack.start_redis()
                back, back_wall = time.monotonic(), time.time()
                store = stack.store()
                outage = Outage(stopped, restarting, back, back_wall, running,
                                {name: len(v) for name, v in before.items()})
                outages.append(outage)
                for name, ns in spaces.items():
                    after = store.memory_entries(ns)
                    if after[:len(before[name])] != before[name]:
                        prefix_ok.append(f"restart {k + 1}, {name}: {len(before[name])} entries before, "
                                         f"{len(after)} after, prefix differs")
                ready_after.append(wait_until(lambda: ready(url), 120))
            # Load goes on to the end; then every client polls its jobs to their ends.
            left = load.deadline - time.monotonic()
            if wait_until(lambda: not any(t.is_alive() for t in clients), left, 0.5) is None:
                raise TimeoutError("the deadline passed with clients still waiting for their jobs")
        except TimeoutError as e:
            late = e  # still check what was reached, so the report says what is missing
        else:
            late = None
        finally:
            load.stop.set()
        _check(args, report, stack, store, load, outages, prefix_ok, ready_after, names, spaces, logs)
        if late is not None:
            raise late


def _in_outage(a: Answer, outages: list[Outage]) -> bool:
    return any(o.stopped <= a.start and a.end <= o.restarting for o in outages)


def _check(args, report: Report, stack: Stack, store: Store, load: Load, outages: list[Outage],
           prefix_ok: list[str], ready_after: list, names: list[str], spaces: dict[str, str], logs: Path) -> None:
    answers = load.answers
    during = [a for a in answers if _in_outage(a, outages)]
    clear = [a for a in during if (a.route == "live" and a.status == 200)
             or (a.status == 503 and a.body_ok and a.code in CLEAR_CODES
                 and ("Redis" in a.message or "broker" in a.message))]
    unclear = Counter(f"{a.route} {a.status} {a.code}: {a.message[:80]}" for a in during if a not in clear)
    ready_503 = sum(a.route == "ready" and a.status == 503 for a in during)
    report.figures["answers_during_outages"] = dict(Counter(f"{a.route} {a.status}" for a in during))
    report.check(len(during) > 0 and not unclear and ready_503 > 0, "answers while Redis is away",
                 f"{len(during)} answers, {len(during) - sum(a.route == 'live' for a in during)} of them 503 "
                 f"with the JSON error body naming Redis or the broker (readiness: {ready_503} × 503); "
                 f"other: {dict(unclear) or 'none'}")
    errors = Counter(f"{a.route} {a.status} {a.message[:80]}" for a in answers
                     if a.status == 0 or a.status >= 500 and not (a.status == 503 and a.body_ok)
                     or (a.status >= 300 and not a.body_ok))
    slow = [a for a in answers if a.end - a.start > a.bound]
    latencies = [a.end - a.start for a in during]
    report.figures["max_answer_seconds_during_outages"] = round(max(latencies, default=0.0), 3)
    report.figures["max_answer_seconds"] = round(max((a.end - a.start for a in answers), default=0.0), 3)
    report.check(not errors and not slow, "no 500, stack trace, lost connection or hang at any time",
                 f"{len(answers)} answers in all; bad: {dict(errors) or 'none'}; over the bound "
                 f"({args.answer_bound:g} s + long-poll wait): {len(slow)}")
    report.check(not load.unexpected, "no unexpected refusals", dict(load.unexpected) or "none")

    # Jobs: every accepted one ended, succeeded; nothing Redis holds is left open.
    accepted = load.accepted
    records = all_jobs(store)
    final = Counter(records[j].status if j in records else "missing" for j in accepted)
    failed = Counter(f"{records[j].error.get('code')}: {records[j].error.get('message', '')[:80]}"
                     for j in accepted if j in records and records[j].status == "failed")
    report.figures.update(jobs_accepted=len(accepted), jobs_final=dict(final), duplicates=load.duplicates)
    report.check(len(accepted) >= args.jobs and final["succeeded"] == len(accepted) and not load.duplicates,
                 "every accepted job ended, succeeded, once",
                 f"{len(accepted)} accepted (wanted {args.jobs}), final {dict(final)}, "
                 f"failures {dict(failed) or 'none'}, {load.duplicates} ids answered twice")
    others = {j: r for j, r in records.items() if j not in accepted}
    other_states = Counter(r.status if r.status != "failed" else f"failed:{r.error.get('code')}"
                           for r in others.values())
    open_now = store.open_jobs()
    report.figures.update(jobs_not_accepted=dict(other_states), open_jobs_at_end=open_now)
    report.check(all(r.status in TERMINAL for r in records.values()) and open_now == 0,
                 "no zombie job (every job in Redis ended; open jobs back to 0)",
                 f"{len(records)} jobs in Redis; {len(others)} never accepted by a client: "
                 f"{dict(other_states) or 'none'}; open jobs now {open_now}")

    # The memory: intact across each restart; one entry per committing job; the invariant.
    report.check(not prefix_ok and len(outages) == args.restarts, "memory intact across every restart",
                 f"before-stop logs {[o.entries_at_stop for o in outages]} all found again, in order, after "
                 f"the restart" if not prefix_ok else "; ".join(prefix_ok))
    problems, sizes, violations = [], {}, {}
    for name, ns in spaces.items():
        log = read_log(store, ns)
        entries = log.entries
        sizes[name] = len(entries)
        by_job = Counter(log.job_ids)
        problems += [f"{name}: {p}" for p in log.index_problems() + log.root_problems()]
        violations[name] = log.violations()
        digest = ns.split("/")[0]
        for j, rec in records.items():
            m = rec.result.get("memory") if rec.status == "succeeded" and rec.result else None
            if rec.digest != digest or not m or not m.get("used") or m.get("entry") is None:
                continue
            index = int(m["entry"])
            if index >= len(entries) or entries[index].job_id != j:
                problems.append(f"{name}: job {j}'s entry {index} is not in the log")
            elif (entries[index].prediction, entries[index].radius) != (
                    -1 if rec.result["prediction"] is None else rec.result["prediction"], rec.result["radius"]):
                problems.append(f"{name}: job {j}'s entry {index} differs from its result")
            by_job.pop(j, None)
        problems += [f"{name}: entry of job {j}, which did not succeed with it" for j in by_job]
    report.figures.update(memory_entries=sizes, invariant_violations=violations)
    report.check(not problems and not any(violations.values()),
                 "one memory entry per committing job, where its result says; invariant holds",
                 f"entries {sizes}, violations {violations}; problems: {problems[:5] or 'none'}")

    # The workers came back by themselves: heartbeats, consumers (log), jobs ending.
    live = store.live_workers(within_seconds=10)
    missing = [n for n in names if not any(w.startswith(f"{n}@") for w in live)]
    reconnects = {n: (logs / f"{n}.log").read_text(errors="replace").count("] Connected to ") for n in names}
    alive = {n: stack.procs[n].poll() is None for n in names}
    report.figures["worker_broker_connections"] = reconnects
    # Deliveries beyond one per job: messages handed out again (requeued after an outage
    # that outlasted a job's retries, or restored by the broker); harmless, counted.
    report.figures["task_deliveries"] = sum((logs / f"{n}.log").read_text(errors="replace").count("] received")
                                            for n in names)
    report.check(not missing and all(alive.values()) and all(c >= len(outages) + 1 for c in reconnects.values()),
                 "workers survived: alive, heartbeating, consumers reconnected",
                 f"alive {alive}, not heartbeating: {missing or 'none'}, broker connections logged {reconnects} "
                 f"(wanted ≥ {len(outages) + 1} each)")

    # Figures per restart.
    per = []
    for o, ready_s in zip(outages, ready_after, strict=True):
        submits = [a.end - o.back for a in answers
                   if a.route == "submit" and a.status == 202 and a.end >= o.restarting]
        finished = [r.finished - o.back_wall for r in records.values() if r.finished and r.finished >= o.back_wall]
        started = [r.started - o.back_wall for r in records.values() if r.started and r.started >= o.back_wall]
        away = [a for a in answers if o.stopped <= a.start and a.end <= o.restarting]
        per.append({"seconds_away": round(o.restarting - o.stopped, 2), "running_at_stop": o.running_at_stop,
                    "answers_503": sum(a.status == 503 for a in away),
                    "ready_after_s": None if ready_s is None else round(ready_s, 2),
                    "first_submit_after_s": round(max(0.0, min(submits)), 2) if submits else None,
                    "first_job_started_after_s": round(min(started), 2) if started else None,
                    "first_job_finished_after_s": round(min(finished), 2) if finished else None})
    report.figures["restarts"] = per
    report.check(all(p["ready_after_s"] is not None and p["first_submit_after_s"] is not None
                     and p["first_job_finished_after_s"] is not None for p in per),
                 "service resumed after every restart", "; ".join(
                     f"#{i + 1}: away {p['seconds_away']} s, {p['running_at_stop']} running at the stop, "
                     f"{p['answers_503']} × 503, ready after {p['ready_after_s']} s, first submit "
                     f"{p['first_submit_after_s']} s, first job ended {p['first_job_finished_after_s']} s"
                     for i, p in enumerate(per)))
    report.figures["queues_at_end"] = {"certifications": store.queue_depth("certifications"),
                                       "unacked": int(store.r.hlen("unacked"))}


if __name__ == "__main__":
    sys.exit(main(parser(), run))
