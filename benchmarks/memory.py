"""The certificate memory at scale: conflict check and inside lookup against memory size.

Entries are 3×32×32 uint8 patches cropped at random from scikit-learn's two sample photographs
(`load_sample_images`), with random classes (10) and radii uniform in [0.05, 1.0], in entry
format v3 (workers/shared_memory.py: each carries its provenance record, here a Cohen
certificate's at σ = 0.25, n = 10⁵, α = 0.001, in the namespace digest/fp32/cpu/0.001). They are
loaded through a real redis-server (started here on a free port, `--save "" --appendonly no`,
killed at exit) with the store's compare-and-set commit, pipelined (`Store.memory_commit_many`),
and pulled into the worker's copy by a real `SharedMemory.sync` (pages of 4096 entries), one
size after the other: each sync pulls only the entries added since the last. The entries do
not satisfy the memory rule (balls of different classes intersect): this measures latency, and
the pruning is exact whatever the table holds.

Queries are fresh crops as an 8-bit image decodes (float32 u/255), each with a random class
and radius for the conflict check; for the lookup, every other query is moved inside an
existing ball (an entry plus half its radius in a random direction, clipped to [0, 1]).

For each size: median and p99 latency of the conflict check (`Memory.decide`) and the inside
lookup (`Memory.lookup`), pruned (norm and pivot lower bounds, exact float64 distances for the
entries they cannot rule out) and brute force (`apply_rule` / `lookup`: the blocked scan over
every entry), interleaved query by query; their ratio (medians). A pruned query's latency is
the fastest of `--repeats` runs, so that a moment when other processes held the core does not
count as the query's cost (every run is in the JSON); brute force runs once per query. Also the
fraction of entries pruned; whether the answers are identical (they must be); Redis bytes per
entry (INFO used_memory growth, and MEMORY USAGE of the log, per entry); the sync's time; and
the worker's resident memory (VmRSS of this process) after the sync.

Torch runs one intra-op thread unless `--threads` says otherwise: a check is a few small
kernels, and on a machine whose cores are shared a thread pool waits for its slowest thread.

Targets: conflict check and lookup ≤ 10 ms at 10⁵ entries (p99 of the queries), and pruned
answers identical to brute force on every query. The exit code is 0 whatever the outcome: this
is a measurement, not a test. 10⁶ entries take ~3.3 GB in Redis and as much in this process.

    python benchmarks/memory.py
    python benchmarks/memory.py --sizes 1000,10000 --json /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import torch
from scipy.stats import norm

# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import OtherLoad, machine_lines
from service.store import Store
from smoothcert.memory import apply_rule, lookup, point_values
from smoothcert.results import Provenance, memory_namespace
from workers.shared_memory import PAGE, SharedMemory, encode_entry, make_entry

SHAPE = (3, 32, 32)
DIM = math.prod(SHAPE)
NUM_CLASSES = 10
RADII = (0.05, 1.0)
SIGMA = 0.25
ALPHA = 0.001
N0, N = 100, 100_000
TARGET_MS = 10.0
TARGET_SIZE = 100_000
NAMESPACE = memory_namespace("sha256:memory-benchmark", "fp32", "cpu", ALPHA)
LOAD_CHUNK = 4096


class RedisServer:
    """A private redis-server on a free port, no persistence; stopped on exit."""

    def __init__(self, binary: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="smoothcert-bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "no", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        self.client = redis.Redis(port=self.port, socket_timeout=120)
        for _ in range(200):
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def photographs() -> list[np.ndarray]:
    """scikit-learn's sample photographs (china.jpg, flower.jpg) as uint8 [3, H, W]."""
    from sklearn.datasets import load_sample_images

    return [np.ascontiguousarray(img.transpose(2, 0, 1)) for img in load_sample_images().images]


def crops(photos: list[np.ndarray], rng: np.random.Generator, n: int) -> np.ndarray:
    """n random 3×32×32 crops, uint8 [n, 3, 32, 32]."""
    out = np.empty((n, *SHAPE), dtype=np.uint8)
    which = rng.integers(0, len(photos), n)
    for k in range(n):
        img = photos[which[k]]
        y = rng.integers(0, img.shape[1] - SHAPE[1] + 1)
        x = rng.integers(0, img.shape[2] - SHAPE[2] + 1)
        out[k] = img[:, y:y + SHAPE[1], x:x + SHAPE[2]]
    return out


def load(store: Store, photos, rng, start: int, stop: int, capacity: int) -> None:
    """Entries start..stop-1 into the log, LOAD_CHUNK per pipelined compare-and-set round trip."""
    for a in range(start, stop, LOAD_CHUNK):
        b = min(a + LOAD_CHUNK, stop)
        patches = crops(photos, rng, b - a).reshape(b - a, DIM)
        classes = rng.integers(0, NUM_CLASSES, b - a)
        radii = rng.uniform(*RADII, b - a)
        p_a_lower = norm.cdf(radii / SIGMA)  # the pA_low each radius comes from: R = σ·Φ⁻¹(pA_low)
        batch = []
        for k in range(b - a):
            c, r = int(classes[k]), float(radii[k])
            job = f"bench-{a + k}"
            entry = make_entry(c, r, "new", c, r, SIGMA, -1, provenance(float(p_a_lower[k])), job, patches[k])
            batch.append((job, encode_entry(entry)))
        results = store.memory_commit_many(NAMESPACE, epoch=0, length=a, entries=batch, capacity=capacity)
        bad = [r for r in results if r.status != "committed"]
        if bad:
            raise RuntimeError(f"bulk load refused at entry {a}: {bad[0]}")


def provenance(p_a_lower: float) -> Provenance:
    """The sampling of a "new" entry (its own root): a fixed-n Cohen certificate with this
    pA_low. A record has a fixed size, so an entry has the size of a real one."""
    return Provenance(root=None, sigma=SIGMA, bound="cohen", n0=N0, n=N, alpha=ALPHA, level=ALPHA,
                      sampling="fixed", p_a_lower=p_a_lower, noise_sigma=SIGMA)


def rss_bytes() -> int:
    """VmRSS of this process (the worker's resident memory), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def queries(shared: SharedMemory, photos, rng, count: int) -> tuple[list, list]:
    """(conflict-check queries (x, class, radius), lookup queries x): fresh crops as float32 u/255;
    every other lookup query is inside an existing ball."""
    fresh = torch.from_numpy(crops(photos, rng, 2 * count)).to(torch.float32) / 255
    checks = [(fresh[k], int(rng.integers(0, NUM_CLASSES)), float(rng.uniform(*RADII))) for k in range(count)]
    looks = []
    for k in range(count):
        x = fresh[count + k]
        if k % 2:
            i = int(rng.integers(0, len(shared)))
            centre = point_values(shared.local.points[i]).reshape(SHAPE)
            step = torch.from_numpy(rng.standard_normal(SHAPE)).to(torch.float64)
            step *= 0.5 * float(shared.local.radii[i]) / float(step.norm())
            x = (centre.to(torch.float64) + step).clamp(0, 1).to(torch.float32)  # clipping moves no closer
        looks.append(x)
    return checks, looks


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "p99_ms": float(np.percentile(ms, 99)), "max_ms": max(ms)}


def measure(shared: SharedMemory, checks: list, looks: list, repeats: int) -> dict:
    """Pruned and brute force on the same queries, interleaved; answers compared. A pruned
    query's latency is the fastest of `repeats` runs (all runs are kept in the JSON)."""
    mem = shared.local
    n = len(mem)
    pts, cls, rad = mem.points, mem.classes, mem.radii
    x0, c0, r0 = checks[0]  # warm-up: allocator, kernels
    mem.decide(x0, c0, r0), mem.lookup(x0), apply_rule(pts, cls, rad, x0, c0, r0), lookup(pts, cls, rad, x0)
    out = {kind: {"pruned_s": [], "pruned_runs_s": [], "brute_s": [], "exact_rows": []} for kind in ("check", "lookup")}
    mismatches, inside, outcomes = 0, 0, {}

    def pruned(kind: str, fn):
        runs = [timed(fn) for _ in range(repeats)]
        out[kind]["pruned_runs_s"].append([t for t, _ in runs])
        out[kind]["pruned_s"].append(min(t for t, _ in runs))
        out[kind]["exact_rows"].append(mem.exact_rows)
        return runs[-1][1]

    for x, c, r in checks:
        mine = pruned("check", lambda x=x, c=c, r=r: mem.decide(x, c, r))
        t, ref = timed(lambda x=x, c=c, r=r: apply_rule(pts, cls, rad, x, c, r))
        out["check"]["brute_s"].append(t)
        mismatches += mine != ref
        outcomes[ref.outcome] = outcomes.get(ref.outcome, 0) + 1
    for x in looks:
        mine = pruned("lookup", lambda x=x: mem.lookup(x))
        t, ref = timed(lambda x=x: lookup(pts, cls, rad, x))
        out["lookup"]["brute_s"].append(t)
        mismatches += mine != ref
        inside += ref is not None
    for kind in out.values():
        kind["pruned"], kind["brute"] = summary(kind["pruned_s"]), summary(kind["brute_s"])
        kind["pruned_every_run"] = summary([t for runs in kind["pruned_runs_s"] for t in runs])
        kind["speedup_median"] = kind["brute"]["median_ms"] / kind["pruned"]["median_ms"]
        pruned = [1 - e / n for e in kind["exact_rows"]]
        kind["pruned_fraction_median"], kind["pruned_fraction_worst"] = statistics.median(pruned), min(pruned)
    out["mismatches"], out["comparisons"] = mismatches, len(checks) + len(looks)
    out["check_outcomes"], out["lookup_inside"] = outcomes, inside
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000",
                        help="memory sizes, comma-separated, measured in increasing order")
    parser.add_argument("--queries", type=int, default=100, help="queries of each kind per size")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each pruned query; its latency is the fastest (brute force runs once)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1; 0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--json", default=None, help="write every measured number here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sorted({int(float(s)) for s in args.sizes.split(",") if s.strip()})
    rng = np.random.default_rng(args.seed)
    photos = photographs()

    print(f"memory benchmark: {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} uint8 crops of scikit-learn's sample photographs, "
          f"{NUM_CLASSES} random classes, radii uniform in [{RADII[0]}, {RADII[1]}], sizes "
          f"{', '.join(f'{s:,}' for s in sizes)}, {args.queries} queries of each kind per size, each pruned query "
          f"timed {args.repeats} times (its latency: the fastest run)")
    print("entries are bulk-loaded without the memory rule (balls of different classes may intersect): "
          "a latency benchmark; pruned answers are compared with the brute-force scan on every query")
    for line in machine_lines(torch.device("cpu")):
        print(line)
    rss_start = rss_bytes()
    results: dict = {"sizes": {}, "rss_start_bytes": rss_start, "queries": args.queries, "repeats": args.repeats,
                     "seed": args.seed}
    with RedisServer(args.redis_server) as server:
        store = Store(server.client, prefix="bench")
        shared = SharedMemory(store, NAMESPACE, DIM, capacity=max(sizes), device="cpu", page=PAGE)
        used_start = server.used_memory()
        for size in sizes:
            have = store.memory_size(NAMESPACE)[0]
            load_s, _ = timed(lambda have=have, size=size: load(store, photos, rng, have, size, max(sizes)))
            before = len(shared)
            sync_s, _ = timed(shared.sync)
            if len(shared) != size:
                raise RuntimeError(f"synced {len(shared)} entries, expected {size}")
            used, (log_n, log_bytes) = server.used_memory() - used_start, store.memory_size(NAMESPACE)
            rss = rss_bytes()
            checks, looks = queries(shared, photos, rng, args.queries)
            other = OtherLoad()
            m = measure(shared, checks, looks, args.repeats)
            other_cores = other.cores()
            r = results["sizes"][size] = {
                "load_s": load_s, "sync_s": sync_s, "synced_entries": size - before,
                "redis_used_bytes_per_entry": used / size, "redis_log_bytes_per_entry": log_bytes / log_n,
                "worker_rss_bytes": rss, "local_table_bytes": shared.local.nbytes,
                "table_dtype": str(shared.local.points.dtype), "other_cores": other_cores, **m,
            }
            report(size, r)
    print()
    verdicts(results, sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


def report(size: int, r: dict) -> None:
    mib = 1 << 20
    print()
    print(f"== {size:,} entries ==")
    print(f"load {r['load_s']:.1f} s (pipelined compare-and-set commits); sync {r['sync_s']:.2f} s for "
          f"{r['synced_entries']:,} new entries (pages of {PAGE})")
    print(f"redis: {r['redis_used_bytes_per_entry']:,.0f} B/entry (INFO used_memory growth, log + job index), "
          f"{r['redis_log_bytes_per_entry']:,.0f} B/entry (MEMORY USAGE of the log)")
    print(f"worker: VmRSS {r['worker_rss_bytes'] / mib:,.0f} MiB after the sync; local table "
          f"{r['local_table_bytes'] / mib:,.0f} MiB allocated ({r['table_dtype']} points)")
    for kind, label in (("check", "conflict check"), ("lookup", "inside lookup ")):
        k = r[kind]
        every = k["pruned_every_run"]
        print(f"{label}  pruned median {k['pruned']['median_ms']:8.2f} ms  p99 {k['pruned']['p99_ms']:8.2f} ms "
              f"(every run: median {every['median_ms']:.2f}, p99 {every['p99_ms']:.2f}) | "
              f"brute force median {k['brute']['median_ms']:8.1f} ms  p99 {k['brute']['p99_ms']:8.1f} ms | "
              f"brute/pruned {k['speedup_median']:6.1f}x (medians) | pruned {100 * k['pruned_fraction_median']:.2f} % "
              f"of entries (median), {100 * k['pruned_fraction_worst']:.2f} % (worst)")
    print(f"answers: {r['mismatches']} mismatches in {r['comparisons']} comparisons; conflict checks "
          f"{r['check_outcomes']}; lookups inside a ball {r['lookup_inside']} of {len(r['lookup']['pruned_s'])}")
    if r["other_cores"] is not None:
        print(f"other processes used {r['other_cores']:.2f} of {os.cpu_count()} cores on average while timing")
        if r["other_cores"] > 0.25:
            print("WARNING: other processes competed for the cores; latencies are noisy")


def verdicts(results: dict, sizes: list[int]) -> None:
    at = results["sizes"].get(TARGET_SIZE)
    for kind, label in (("check", "conflict check"), ("lookup", "inside lookup")):
        if at is None:
            print(f"SKIP {label} at {TARGET_SIZE:,} entries: not measured (target p99 <= {TARGET_MS:g} ms)")
            continue
        k = at[kind]["pruned"]
        verdict = "PASS" if k["p99_ms"] <= TARGET_MS else "FAIL"
        print(f"{verdict} {label} at {TARGET_SIZE:,} entries: p99 {k['p99_ms']:.2f} ms, median {k['median_ms']:.2f} ms "
              f"(target p99 <= {TARGET_MS:g} ms)")
    bad = sum(r["mismatches"] for r in results["sizes"].values())
    total = sum(r["comparisons"] for r in results["sizes"].values())
    print(f"{'PASS' if bad == 0 else 'FAIL'} pruned answers identical to brute force: {bad} mismatches in "
          f"{total} comparisons (target 0)")
    top = results["sizes"][sizes[-1]]
    print(f"info: at {sizes[-1]:,} entries: Redis {top['redis_used_bytes_per_entry']:,.0f} B/entry (used_memory), "
          f"{top['redis_log_bytes_per_entry']:,.0f} B/entry (log); worker VmRSS "
          f"{top['worker_rss_bytes'] / (1 << 20):,.0f} MiB ({results['rss_start_bytes'] / (1 << 20):,.0f} MiB before "
          f"the first sync)")


if __name__ == "__main__":
    sys.exit(main())
