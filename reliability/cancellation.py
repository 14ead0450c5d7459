"""Cancellation: a cancelled job stops within one batch (issue 6), under load.

What it proves, from HTTP answers and Redis state: every job cancelled through the API
(the SDK's `job.cancel()`, DELETE /v1/certifications/{id}) while running ends `cancelled`,
having completed at most one batch of samples after the cancel was stored.

The measure: samples completed after the cancel was stored = the job's final samples (exact:
a job that stops on a cancel writes its final progress before it ends, workers/jobs.py) −
the samples it had done when the cancel was stored. The latter is bounded below by the last
progress the job wrote before the client sent the cancel (a progress write is a batch end);
the client sends the cancel right after it sees a fresh write, so the bound is tight: a job
that stops at the first batch end after the cancel shows exactly one batch, and a missed
check would show two or more. The time from sending the cancel to the job's end is reported
beside it, in seconds and in units of the job's own per-batch time under the same load (from
the intervals between its progress writes).

How: a private stack with one threads-pool worker; --load background clients keep short
jobs running on it; --concurrent long jobs (the demo model, a huge n, --batch-size) run at
a time, each cancelled after a random number of its batches.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.stack import USER, Stack
from clients import Client
from reliability.load import Load
from reliability.report import Report, main, run_scenario, scenario_parser
from service.store import TERMINAL, Store
from service.up import worker_command


def parser() -> argparse.ArgumentParser:
    p = scenario_parser(__doc__, deadline=600.0)
    p.add_argument("--cancels", type=int, default=24, help="running jobs cancelled in all")
    p.add_argument("--concurrent", type=int, default=3, help="long jobs running (and cancelled) at a time")
    p.add_argument("--load", type=int, default=3, help="short jobs kept running beside them")
    p.add_argument("--batch-size", type=int, default=4000,
                   help="batch size of the long jobs (a batch outlasts the progress throttle of 0.25 s)")
    p.add_argument("--max-batches", type=int, default=8, help="a job is cancelled after 1..this many of its batches")
    return p


@dataclass
class Target:
    id: str
    writes: list[tuple[float, str, int, int]] = field(default_factory=list)  # seen at, stage, done, total
    sent: float = 0.0  # time.time() when the cancel was sent
    answered: float = 0.0  # … and when its answer came back
    seen: tuple[str, int, int] | None = None  # the last progress seen before sending it
    error: str | None = None


def progress_of(store: Store, job_id: str) -> tuple[str, str, int, int] | None:
    """(status, stage, samples done, samples total) straight from the job's hash."""
    job = store.get_job(job_id)
    if job is None or job.progress is None:
        return (job.status if job else "missing", "", 0, 0)
    p = job.progress
    return job.status, p.stage, p.samples_done, p.samples_total


def drive(url: str, store: Store, target: Target, after_batches: int, until: float) -> None:
    """Watch the job's progress; right after its `after_batches`-th fresh write in the
    estimation stage, cancel it through the SDK."""
    with Client(url, api_key=USER, timeout=60) as client:
        watch(client.job(target.id), store, target, after_batches, until)


def watch(job, store: Store, target: Target, after_batches: int, until: float) -> None:
    last = None
    fresh = 0
    while time.monotonic() < until:
        status, stage, done, total = progress_of(store, target.id)
        if status in TERMINAL:
            target.error = f"ended {status} before it was cancelled"
            return
        if stage and (stage, done, total) != last:
            last = (stage, done, total)
            target.writes.append((time.time(), stage, done, total))
            if stage == "estimation":
                fresh += 1
                if fresh >= after_batches:
                    target.seen = last
                    target.sent = time.time()
                    job.cancel()
                    target.answered = time.time()
                    return
        time.sleep(0.003)
    target.error = "the scenario ran out of time before cancelling it"


def samples_between(before: tuple[str, int, int], after: tuple[str, int, int], n0: int) -> int:
    """Samples done from progress `before` to progress `after` (stages selection, estimation)."""
    def total(p):
        stage, done, _ = p
        return done if stage == "selection" else n0 + done
    return total(after) - total(before)


def batch_seconds(target: Target, batch_size: int) -> float | None:
    """The job's own time per batch: the median over consecutive estimation writes."""
    est = [(t, d) for t, s, d, _ in target.writes if s == "estimation"]
    per = [(t2 - t1) / ((d2 - d1) / batch_size) for (t1, d1), (t2, d2) in zip(est, est[1:], strict=False) if d2 > d1]
    return statistics.median(per) if per else None


def body(args: argparse.Namespace, report: Report, logs: Path) -> None:
    deadline = time.monotonic() + args.deadline
    rng = np.random.default_rng(args.seed)
    chooser = random.Random(args.seed)
    with Stack(logs, env={"OMP_NUM_THREADS": "1"}) as stack:
        store = stack.store()
        stack.worker("w1", worker_command("w1"))
        url = stack.api(workers=1)
        stack.wait(lambda: len(store.live_workers(5)) >= 1, 120, "the worker's heartbeat")
        client = Client(url, api_key=USER, timeout=60)
        client.certify(rng.random((1, 8, 8)).astype(np.float32), model="digits", n=1000).wait(120)  # warm up

        stop = threading.Event()
        loads = [Load(url, args.seed * 1000 + i, stop) for i in range(args.load)]
        for load in loads:
            load.start()
        targets: list[Target] = []
        try:
            while len(targets) < args.cancels and time.monotonic() < deadline:
                wave = [Target(client.certify(rng.random((1, 8, 8)).astype(np.float32), model="digits",
                                              n=1_000_000, batch_size=args.batch_size, memory=False).id)
                        for _ in range(min(args.concurrent, args.cancels - len(targets)))]
                targets += wave
                threads = [threading.Thread(target=drive, args=(url, store, t, chooser.randint(1, args.max_batches),
                                                                deadline), daemon=True) for t in wave]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(max(1.0, deadline - time.monotonic()))
                for t in wave:
                    client.job(t.id).wait(max(1.0, deadline - time.monotonic()), poll=1)
        finally:
            stop.set()
            for load in loads:
                load.join(max(1.0, deadline - time.monotonic()))
        if errors := [repr(load.error) for load in loads if load.error is not None]:
            raise RuntimeError(f"a load client failed: {errors}")

        after_samples, after_batches, stop_s, stop_batches, problems = [], [], [], [], []
        for t in targets:
            answer = client.job(t.id).status()
            record = store.get_job(t.id)
            code = answer.error.code if answer.error else None
            if t.error is not None or answer.status != "cancelled" or code != "cancelled" or record.progress is None:
                problems.append(f"{t.id}: {t.error or (answer.status, code)}")
                continue
            final = (record.progress.stage, record.progress.samples_done, record.progress.samples_total)
            samples = samples_between(t.seen, final, record.request["n0"])
            per_batch = batch_seconds(t, args.batch_size)
            after_samples.append(samples)
            after_batches.append(samples / args.batch_size)
            stop_s.append(record.finished - t.sent)
            if per_batch:
                stop_batches.append((record.finished - t.sent) / per_batch)
            if not 0 <= samples <= args.batch_size:
                problems.append(f"{t.id}: {samples} samples after the cancel (a batch is {args.batch_size}); "
                                f"seen {t.seen}, final {final}, cancel answered in {t.answered - t.sent:.3f} s")
        report.check(len(targets) == args.cancels and not problems, "cancelled jobs stop within one batch",
                     f"{len(targets) - len(problems)} of {args.cancels} ended cancelled with at most one batch "
                     f"({args.batch_size} samples) after the cancel" + (f"; {problems[:4]}" if problems else ""))
        load_ids = [i for load in loads for i in load.ids]
        load_status = [r.status if (r := store.get_job(i)) else "missing" for i in load_ids]
        report.check(bool(load_ids) and all(s == "succeeded" for s in load_status), "jobs beside them are untouched",
                     f"{load_status.count('succeeded')} of {len(load_ids)} load jobs succeeded")
        client.close()

        def stat(values, f, digits=3):
            return round(f(values), digits) if values else None
        report.figures.update({
            "cancelled": len(after_samples), "batch_size": args.batch_size,
            "samples_after_cancel_max": stat(after_samples, max, 0),
            "samples_after_cancel_median": stat(after_samples, statistics.median, 0),
            "batches_after_cancel_max": stat(after_batches, max, 2),
            "batches_after_cancel_median": stat(after_batches, statistics.median, 2),
            "stop_s_max": stat(stop_s, max), "stop_s_median": stat(stop_s, statistics.median),
            "stop_in_batch_times_max": stat(stop_batches, max, 2),
            "stop_in_batch_times_median": stat(stop_batches, statistics.median, 2),
            "load_jobs": len(load_ids),
        })
        print(f"cancelled {len(after_samples)}: samples after the cancel max {stat(after_samples, max, 0)}, "
              f"median {stat(after_samples, statistics.median, 0)} (batch {args.batch_size}); time to stop max "
              f"{stat(stop_s, max)} s = {stat(stop_batches, max, 2)} batch times")


def run(args: argparse.Namespace) -> Report:
    return run_scenario("cancellation", args, lambda report, logs: body(args, report, logs))


if __name__ == "__main__":
    sys.exit(main(parser(), run))
