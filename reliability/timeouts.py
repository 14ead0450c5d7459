"""Timeouts: a job that outlives its time limit fails with a clear reason and frees the
worker (issue 6).

What it proves, from HTTP answers and Redis state:
- each job that needs far longer than SMOOTHCERT_JOB_TIME_LIMIT_SECONDS (a huge n on the demo
  model) fails with error code `time_limit` and a message naming the limit, at most one
  batch (plus --slack seconds) after the limit, never before it, while other jobs run on the
  same worker;
- the worker is freed: afterwards as many long jobs run at once as the worker has threads
  (and time out in turn), no job is left running, and a short job submitted after succeeds
  promptly.

How: a private stack with one threads-pool worker (service.up.worker_command) whose limit is
--limit seconds; the limit is checked between batches (workers/jobs.py, cancel_check), since
Celery's own limits do not work in the threads pool. Background clients keep --load short
jobs running on the worker; the long jobs are submitted in waves beside them. A timed-out job
writes its exact final progress (workers/jobs.py), so its per-batch time under this load is
its running time over the batches it did; lateness = finished − started − limit (started is
stamped just before the limit's clock starts, so this slightly overstates it).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.stack import USER, Stack
from clients import Client
from reliability.load import Load, image
from reliability.report import Report, main, run_scenario, scenario_parser
from service.store import TERMINAL, Store
from service.up import WORKER_THREADS, worker_command


def parser() -> argparse.ArgumentParser:
    p = scenario_parser(__doc__, deadline=600.0)
    p.add_argument("--limit", type=int, default=3, help="SMOOTHCERT_JOB_TIME_LIMIT_SECONDS of the worker")
    p.add_argument("--long-jobs", type=int, default=12, help="jobs that need far longer than the limit")
    p.add_argument("--wave", type=int, default=3, help="long jobs running at once")
    p.add_argument("--load", type=int, default=4, help="short jobs kept running beside them")
    p.add_argument("--batch-size", type=int, default=2000, help="batch size of the long jobs")
    p.add_argument("--slack", type=float, default=0.5,
                   help="seconds allowed beyond one batch after the limit (the finishing writes, scheduling)")
    p.add_argument("--short-within", type=float, default=10.0,
                   help="seconds a short job submitted afterwards may take, queueing included")
    return p


def body(args: argparse.Namespace, report: Report, logs: Path) -> None:
    started = time.monotonic()
    deadline = started + args.deadline
    rng = np.random.default_rng(args.seed)
    with Stack(logs, env={"OMP_NUM_THREADS": "1"}) as stack:
        store = stack.store()
        stack.worker("w1", worker_command("w1"), SMOOTHCERT_JOB_TIME_LIMIT_SECONDS=str(args.limit))
        url = stack.api(workers=1)
        stack.wait(lambda: len(store.live_workers(5)) >= 1, 120, "the worker's heartbeat")
        client = Client(url, api_key=USER, timeout=60)
        # Warm the worker (model load and batch-size probe happen once, inside a job's time).
        client.certify(image(rng, (1, 8, 8)), model="digits", n=1000).wait(120)

        stop = threading.Event()
        loads = [Load(url, args.seed * 1000 + i, stop) for i in range(args.load)]
        for load in loads:
            load.start()
        long_ids: list[str] = []
        try:
            while len(long_ids) < args.long_jobs and time.monotonic() < deadline:
                wave = [client.certify(image(rng, (1, 8, 8)), model="digits", n=1_000_000,
                                       batch_size=args.batch_size, memory=False)
                        for _ in range(min(args.wave, args.long_jobs - len(long_ids)))]
                long_ids += [j.id for j in wave]
                for job in wave:
                    job.wait(max(1.0, deadline - time.monotonic()), poll=1)
        finally:
            stop.set()
            for load in loads:
                load.join(max(1.0, deadline - time.monotonic()))
        if errors := [repr(load.error) for load in loads if load.error is not None]:
            raise RuntimeError(f"a load client failed: {errors}")

        load_ids = [i for load in loads for i in load.ids]
        load_records = [store.get_job(i) for i in load_ids]
        load_ok = [r for r in load_records if r is not None and (
            r.status == "succeeded" or (r.error or {}).get("code") == "time_limit"
            and r.finished - r.started >= args.limit)]
        succeeded = sum(r.status == "succeeded" for r in load_records if r)
        report.check(bool(load_ids) and len(load_ok) == len(load_ids), "jobs beside them end normally",
                     f"{succeeded} of {len(load_ids)} load jobs succeeded, "
                     f"{len(load_ok) - succeeded} timed out after the limit, {len(load_ids) - len(load_ok)} otherwise")

        # Freed threads: as many long jobs as the worker has threads all run at once (a thread
        # still held by a timed-out job would leave one queued), then time out in turn.
        stack.wait(lambda: running(store, long_ids + load_ids) == 0, 30, "every job to end")
        full = [client.certify(image(rng, (1, 8, 8)), model="digits", n=1_000_000,
                               batch_size=args.batch_size, memory=False).id for _ in range(WORKER_THREADS)]
        at_once = 0
        while time.monotonic() < deadline:
            state = [store.get_job(i) for i in full]
            at_once = max(at_once, sum(1 for r in state if r and r.status == "running"))
            if all(r and r.status in TERMINAL for r in state):
                break
            time.sleep(0.05)
        report.check(at_once == WORKER_THREADS, "every worker thread is free again",
                     f"{WORKER_THREADS} long jobs submitted together: {at_once} seen running at once")
        stack.wait(lambda: running(store, full) == 0, 30, "the last wave to end")
        report.check(running(store, long_ids + load_ids + full) == 0, "no job is left running",
                     f"{len(long_ids) + len(load_ids) + len(full)} jobs, all ended")

        # Each long job (the waves beside the load, then the full wave): the HTTP answer,
        # then its timing from Redis.
        long_ids += full
        late_s, late_batches, problems, worst = [], [], [], (0.0, 0.0)
        for job_id in long_ids:
            answer = client.job(job_id).status()
            record = store.get_job(job_id)
            code, message = (answer.error.code, answer.error.message) if answer.error else (None, "")
            if answer.status != "failed" or code != "time_limit" or f"longer than {args.limit} s" not in message:
                problems.append(f"{job_id}: {answer.status} {code} {message!r}")
                continue
            elapsed = record.finished - record.started
            batches = batches_done(record, args.batch_size)
            batch_s = elapsed / max(1, batches)
            late = elapsed - args.limit
            late_s.append(late)
            late_batches.append(late / batch_s)
            worst = max(worst, (late, batch_s))
            if not (0 <= late <= batch_s + args.slack):
                problems.append(f"{job_id}: ended {late:.2f} s after the limit, one batch takes {batch_s:.2f} s")
        report.check(len(long_ids) == args.long_jobs + WORKER_THREADS and not problems,
                     "long jobs fail with time_limit within one batch of the limit",
                     f"{len(long_ids) - len(problems)} of {args.long_jobs + WORKER_THREADS} as required (latest: "
                     f"{worst[0]:.2f} s after the limit, its batches took {worst[1]:.2f} s; allowed one batch "
                     f"+ {args.slack} s)" + (f"; {problems[:4]}" if problems else ""))

        t = time.monotonic()
        short = client.certify(image(rng, (1, 8, 8)), model="digits", n=1000).wait(60)
        short_s = time.monotonic() - t
        report.check(short.status == "succeeded" and short_s <= args.short_within,
                     "a short job after them succeeds promptly",
                     f"{short.status} in {short_s:.2f} s (at most {args.short_within} s)")
        client.close()
        report.figures.update({
            "limit_s": args.limit, "long_jobs": len(long_ids), "load_jobs": len(load_ids),
            "late_after_limit_max_s": round(max(late_s), 3) if late_s else None,
            "late_after_limit_median_s": round(statistics.median(late_s), 3) if late_s else None,
            "late_after_limit_max_batches": round(max(late_batches), 2) if late_batches else None,
            "late_after_limit_median_batches": round(statistics.median(late_batches), 2) if late_batches else None,
            "batch_size": args.batch_size, "short_job_after_s": round(short_s, 2),
            "threads_busy_at_once_after": at_once,
        })
        print(f"long jobs {len(long_ids)}: late after the limit max {max(late_s, default=math.nan):.3f} s "
              f"({max(late_batches, default=math.nan):.2f} batches); short job after {short_s:.2f} s; "
              f"{at_once} of {WORKER_THREADS} threads busy at once after")


def batches_done(record, batch_size: int) -> int:
    """Batches the job ran, from its exact final progress (selection, then estimation)."""
    p = record.progress
    if p is None:
        return 0
    n0 = record.request.get("n0") or 100
    if p.stage == "estimation":
        return math.ceil(n0 / batch_size) + math.ceil(p.samples_done / batch_size)
    return math.ceil(p.samples_done / batch_size)


def running(store: Store, ids: list[str]) -> int:
    return sum(1 for i in ids if (r := store.get_job(i)) is not None and r.status not in TERMINAL)


def run(args: argparse.Namespace) -> Report:
    return run_scenario("timeouts", args, lambda report, logs: body(args, report, logs))


if __name__ == "__main__":
    sys.exit(main(parser(), run))
