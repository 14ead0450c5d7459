"""Cross-job batching on one worker, against the real stack (redis-server, a Celery worker).

`--jobs` (16) certifications of the demo model (models/digits; n0 = 100, n = `--n`, fixed σ,
no memory, each job its own digits test image and seed, the automatic batch size):

- one at a time: each job is submitted when the previous one has ended;
- concurrent: all are submitted at once;

both on the same worker process (`--pool threads --concurrency 16`, cross-batching on: its
BatchScheduler merges the jobs' forward passes), after a warm-up job that loads the model
and measures the automatic batch size, which every job then uses. A second worker with
SMOOTHCERT_CROSS_BATCHING=false runs the concurrent round again: the jobs overlap but each
runs its own passes, which separates what merging gains from what mere overlap gains.
Every job must succeed, and on the merging worker each job's certificate must be the same
one at a time and concurrent (same seed, same batch size: merging must not change a job's
counts). The second worker measures its own batch size, so its certificates may differ.

`--in-process` runs the same three rounds on the worker's compute path without the stack:
one Certifier (loaded, warmed up and routed through a BatchScheduler as workers/runtime.py
does) and a pool of `--jobs` threads, as the threads pool runs jobs. It needs only torch,
NumPy, SciPy and scikit-learn, so it runs on a GPU machine that has no redis-server or Celery
(benchmarks/gpu.sh). The own-passes round runs first, on the same certifier before it is
routed, so all three rounds share one batch size and every certificate must be the same in
all of them. It leaves out what the stack adds per job (the API benchmark's overhead).

Target (issue 5): concurrent/one-at-a-time >= 3 on a GPU. On a CPU the ratio is reported.
The exit code is 0 whatever the outcome: this is a measurement, not a test.

    python benchmarks/batching.py
    python benchmarks/batching.py --n 20000 --json /tmp/batching.json
    python benchmarks/batching.py --in-process --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoothcert.batching import BatchScheduler
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.data import load_digits_split

try:  # the stack's packages: --in-process needs none of them (a GPU machine may lack them)
    from benchmarks.stack import Stack
    from service import queue
    from service.config import Settings
    from service.queue import ALL_QUEUES
    from service.store import TERMINAL
except ImportError as missing:
    STACK_MISSING: ImportError | None = missing
else:
    STACK_MISSING = None

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "digits"

TARGET_GPU = 3.0
# Every job's certification parameters, on the stack and in process alike (plus n and a seed).
CERTIFY = {"sigma": 0.25, "bound": "cohen", "n0": 100, "alpha": 0.001}


def worker_args(name: str, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--loglevel=INFO",
            "-Q", ALL_QUEUES, "--pool", "threads", f"--concurrency={concurrency}", "-n", name]


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


class Jobs:
    """Submits certification jobs the way the API does (store, then enqueue by name)."""

    def __init__(self, stack: Stack, n: int):
        self.store, self.redis_url, self.n = stack.store(), stack.redis_url, n
        self.model = self.store.get_model("digits")
        self.visibility = Settings(redis_url=stack.redis_url).visibility_timeout

    def submit(self, x: np.ndarray, seed: int) -> str:
        request = {**CERTIFY, "sigma_search": None, "n": self.n, "batch_size": None, "numeric_mode": "fp32",
                   "memory": False, "seed": seed}
        job, _ = self.store.create_job("certification", model="digits", digest=self.model.digest,
                                       request=request, input_bytes=npy(x))
        queue.enqueue(self.redis_url, self.visibility, "certification", job.id)
        return job.id

    def wait(self, ids: list[str], seconds: float = 1800) -> dict[str, dict]:
        deadline, done = time.monotonic() + seconds, {}
        while len(done) < len(ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids) - len(done)} jobs did not end in {seconds} s")
            for job_id in ids:
                if job_id not in done:
                    job = self.store.get_job(job_id)
                    if job is not None and job.status in TERMINAL:
                        done[job_id] = {"status": job.status, "result": job.result, "error": job.error}
            time.sleep(0.01)
        return done

    def one_at_a_time(self, images, seeds) -> tuple[float, list[dict]]:
        start, out = time.perf_counter(), []
        for x, seed in zip(images, seeds, strict=True):
            job_id = self.submit(x, seed)
            out.append(self.wait([job_id])[job_id])
        return time.perf_counter() - start, out

    def concurrent(self, images, seeds) -> tuple[float, list[dict]]:
        start = time.perf_counter()
        ids = [self.submit(x, seed) for x, seed in zip(images, seeds, strict=True)]
        done = self.wait(ids)
        return time.perf_counter() - start, [done[i] for i in ids]


class InProcess:
    """The worker's compute path without the stack: one Certifier of the demo model, jobs as
    threads (`--pool threads`), routed through a BatchScheduler as workers/runtime.py routes
    a merging worker's models. A job's record has the shape Jobs.wait gives."""

    def __init__(self, n: int, device: str):
        self.n = n
        self.certifier = Certifier(load_bundle(DEMO_MODEL, device=device), device=device)
        self.certifier.warm_up()  # the batch-size probe, as a worker pays it when it loads the model
        self.scheduler: BatchScheduler | None = None

    def route(self) -> None:
        self.scheduler = BatchScheduler()
        self.certifier.route_through(self.scheduler)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def job(self, x: np.ndarray, seed: int) -> dict:
        cert = self.certifier.certify(x, **CERTIFY, n=self.n, seed=seed)
        return {"status": "succeeded", "error": None,
                "result": {"prediction": cert.prediction, "radius": cert.radius, "batch_size": cert.batch_size}}

    def one_at_a_time(self, images, seeds) -> tuple[float, list[dict]]:
        start = time.perf_counter()
        out = [self.job(x, seed) for x, seed in zip(images, seeds, strict=True)]
        return time.perf_counter() - start, out

    def concurrent(self, images, seeds) -> tuple[float, list[dict]]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            out = list(pool.map(self.job, images, seeds))
        return time.perf_counter() - start, out


def in_process_rounds(args, images, seeds) -> dict[str, tuple[float, list[dict]]]:
    jobs = InProcess(args.n, args.device)
    jobs.job(images[0], 1)  # warm-up job, as on the stack
    try:
        own = jobs.concurrent(images, seeds)  # before routing: each job its own passes
        jobs.route()
        return {"one at a time": jobs.one_at_a_time(images, seeds),
                "concurrent, merged passes": jobs.concurrent(images, seeds),
                "concurrent, own passes": own}
    finally:
        jobs.close()


def stack_rounds(args, images, seeds) -> dict[str, tuple[float, list[dict]]]:
    if STACK_MISSING is not None:
        raise SystemExit(f"the stack needs packages this Python lacks ({STACK_MISSING}); try --in-process")
    rounds: dict[str, tuple[float, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="smoothcert-batching-") as logs, \
            Stack(Path(logs), device=args.device) as stack:
        jobs = Jobs(stack, args.n)
        for name, merging in (("merging", "true"), ("no merging", "false")):
            stack.worker(name, worker_args(f"bench-{name.replace(' ', '-')}@%h", args.jobs),
                         SMOOTHCERT_CROSS_BATCHING=merging)
            warm = jobs.wait([jobs.submit(images[0], 1)])  # loads the model, measures the batch size
            if next(iter(warm.values()))["status"] != "succeeded":
                raise RuntimeError(f"the warm-up job failed: {warm}\n{stack.tail()}")
            if merging == "true":
                rounds["one at a time"] = jobs.one_at_a_time(images, seeds)
                rounds["concurrent, merged passes"] = jobs.concurrent(images, seeds)
            else:
                rounds["concurrent, own passes"] = jobs.concurrent(images, seeds)
            stack.kill(name)
    return rounds


def answer(job: dict) -> tuple:
    r = job["result"] or {}
    return job["status"], r.get("prediction"), r.get("radius"), r.get("batch_size")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--in-process", action="store_true",
                        help="the worker's compute path in this process, without redis-server and Celery")
    parser.add_argument("--json", type=Path, help="write every measured number here")
    args = parser.parse_args(argv)

    _, _, x_test, _ = load_digits_split()
    images = [x_test[i] for i in range(args.jobs)]
    seeds = list(range(1000, 1000 + args.jobs))
    rounds = (in_process_rounds if args.in_process else stack_rounds)(args, images, seeds)

    base_seconds, base_jobs = rounds["one at a time"]
    samples = args.jobs * (100 + args.n)
    where = "in process, no stack" if args.in_process else "one worker"
    print(f"cross-job batching: {args.jobs} jobs of the demo model (n0 100, n {args.n}), {where} "
          f"(threads pool, concurrency {args.jobs}), device {args.device}")
    sizes = {name: js[0]["result"]["batch_size"] for name, (_, js) in rounds.items() if js[0]["result"]}
    print(f"automatic batch size (rows per job pass): {sizes}")
    print()
    print(f"{'round':<28} {'seconds':>8} {'samples/s':>11} {'speed-up':>9}")
    for name, (seconds, _) in rounds.items():
        print(f"{name:<28} {seconds:>8.2f} {samples / seconds:>11.0f} {base_seconds / seconds:>9.2f}")
    failed = sum(j["status"] != "succeeded" for _, js in rounds.values() for j in js)
    # On the stack the no-merging worker measured its own batch size: only the merged round
    # is compared there; in process all three rounds share one batch size.
    compared = [rounds["concurrent, merged passes"][1]]
    if args.in_process:
        compared.append(rounds["concurrent, own passes"][1])
    differ = sum(answer(a) != answer(b) for js in compared for a, b in zip(js, base_jobs, strict=True))
    speedup = base_seconds / rounds["concurrent, merged passes"][0]
    print()
    print(f"{'PASS' if failed == 0 else 'FAIL'} every job succeeded: {failed} failed (target 0)")
    print(f"{'PASS' if differ == 0 else 'FAIL'} same certificate in every round: {differ} differ (target 0)")
    if args.device.startswith("cuda"):
        print(f"{'PASS' if speedup >= TARGET_GPU else 'FAIL'} concurrent/one-at-a-time = {speedup:.2f} "
              f"(target >= {TARGET_GPU:.1f} on a GPU)")
    else:
        print(f"INFO concurrent/one-at-a-time = {speedup:.2f} on the CPU (the target of {TARGET_GPU:.0f} "
              "is for a GPU; on a CPU it is reported, whatever it is)")
    if args.json:
        args.json.write_text(json.dumps({
            "jobs": args.jobs, "n": args.n, "device": args.device, "in_process": args.in_process, "samples": samples,
            "seconds": {k: v[0] for k, v in rounds.items()}, "speedup": speedup,
            "failed": failed, "differ": differ,
            "batch_size": sizes,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
