"""Filling the device: an automatic batch size, and cross-job batching.

`auto_batch_size` picks the number of noisy copies per forward pass from the model and the
device: the smallest power of two whose measured throughput (the median of interleaved
measurements) is within 5% of the best, bounded by a memory budget (free CUDA memory, or a
share of available RAM, over the per-row activation footprint).

`BatchScheduler` owns one thread that does a process's sampling work: jobs running in other
threads hand it a batch to sample (input, σ, rows, their generator, their counts) and wait;
batches for the same networks that are waiting together are drawn into one buffer and run
in one pass of at most `max_rows` rows. Guarantees:
- a job's counts are its own: its noise comes from its own generator, drawn in its own
  batch sizes exactly as the sampler draws it alone, and only its rows reach its counts; the
  counts of a job run among others equal the counts of the same job run alone with the same
  seed, up to the floating-point differences of a different batch composition (none for the
  exact models and the demo model in the tests);
- a request is never split across passes, and a failing pass fails only the requests in it.
"""

from __future__ import annotations

import math
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from smoothcert.sampling import count_batch, noisy_batch

Network = Callable[[torch.Tensor], torch.Tensor]

PROBE_SECONDS = 4.0  # at most this long probing throughput (once per model and mode)
MEASURE_SECONDS = 0.1  # one throughput measurement: back-to-back passes for at least this long
REFINE_SHARE = 0.8  # sizes within this share of the best sweep rate are measured again
REFINE_ROUNDS = 4  # at most this many more measurements of each of them
MAX_ROWS = 2**16
CPU_MEMORY_SHARE = 0.25  # of MemAvailable, for activations of one merged pass
CPU_MEMORY_CAP = 4 * 2**30
CUDA_MEMORY_SHARE = 0.5  # of free device memory


@dataclass(frozen=True)
class BatchSize:
    """`rows`: copies per forward pass for one job; `max_rows`: the memory bound, the most
    rows one merged pass may carry."""

    rows: int
    max_rows: int


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def bytes_per_row(network: Network, input_shape: tuple[int, ...], device: torch.device) -> int:
    """Memory one row of a batch costs in a forward pass (an upper bound on CPU: the input
    plus every module's output, as if none were freed; measured peak on CUDA)."""
    x = torch.zeros((8, *input_shape), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            network(x)
        torch.cuda.synchronize(device)
        return max(1, math.ceil((torch.cuda.max_memory_allocated(device) - base) / 8))
    total = x.numel() * x.element_size()
    modules = getattr(getattr(network, "base", network), "modules", None)
    hooks = []

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    if modules is not None:
        hooks = [m.register_forward_hook(count) for m in modules()]
    try:
        with torch.inference_mode():
            network(x)
    finally:
        for h in hooks:
            h.remove()
    return max(1, math.ceil(total / 8))


def memory_budget(device: torch.device) -> int:
    """Bytes one merged forward pass may use on `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_MEMORY_SHARE)
    return int(min(CPU_MEMORY_CAP, _available_ram() * CPU_MEMORY_SHARE))


def _rate(network: Network, x: torch.Tensor, min_seconds: float = MEASURE_SECONDS) -> tuple[float, float]:
    """(rows per second, seconds per pass) over back-to-back passes on `x`: at least two,
    for at least `min_seconds`. The mean over the passes, not the fastest one: the fastest
    of more passes looks better, and small batches get more passes in the same time."""
    cuda = x.device.type == "cuda"
    runs = 0
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        while True:
            network(x)
            runs += 1
            if cuda:
                torch.cuda.synchronize(x.device)
            spent = time.perf_counter() - start
            if runs >= 2 and spent >= min_seconds:
                break
    per_pass = max(spent / runs, 1e-9)
    return x.shape[0] / per_pass, per_pass


def auto_batch_size(network: Network, input_shape: tuple[int, ...], device: torch.device | str,
                    *, budget_bytes: int | None = None, probe_seconds: float = PROBE_SECONDS) -> BatchSize:
    """The batch size for `network` on `device` (see the module docstring).

    1. Sweep: throughput at 16, 32, 64, ... rows (a warm-up pass, then one measurement) up
       to the memory bound, while the sweep stays within half of `probe_seconds` and
       throughput has not fallen below half the best twice in a row.
    2. Refine: the sizes within REFINE_SHARE of the best are measured again, in interleaved
       rounds (so that a slow spell of the machine hits them alike), while the probe stays
       within `probe_seconds`; each size's rate is the median of its measurements.

    The answer is the smallest size whose median is within 5% of the best median: one noisy
    measurement no longer decides it (a single fastest-pass probe picked 16 rows for a CIFAR
    ResNet-110 on a 2-core CPU where 64 sustain 30% more).
    """
    device = torch.device(device)
    budget = memory_budget(device) if budget_bytes is None else budget_bytes
    max_rows = int(max(1, min(MAX_ROWS, budget // bytes_per_row(network, input_shape, device))))
    rates: dict[int, list[float]] = {}
    inputs: dict[int, torch.Tensor] = {}
    passes: dict[int, float] = {}
    rows, worse = min(16, max_rows), 0
    started = time.perf_counter()
    while True:
        inputs[rows] = x = torch.rand((rows, *input_shape), device=device)
        # warm-up: allocator, kernel selection, compilation; the first size also pays the
        # process's first passes, slower for a while after (measured, not guessed)
        _rate(network, x, MEASURE_SECONDS if len(inputs) == 1 else 0.0)
        rate, passes[rows] = _rate(network, x)
        rates[rows] = [rate]
        best = max(r[0] for r in rates.values())
        worse = worse + 1 if rate < 0.5 * best else 0
        # the next size costs about twice this one: a warm-up and two passes or more
        if rows >= max_rows or worse >= 2 or time.perf_counter() - started + 6 * passes[rows] > probe_seconds / 2:
            break
        rows = min(rows * 2, max_rows)
    candidates = [r for r, rate in sorted(rates.items()) if rate[0] >= REFINE_SHARE * best]
    if len(candidates) > 1:
        for _round in range(REFINE_ROUNDS):
            round_cost = sum(max(MEASURE_SECONDS, 2 * passes[r]) for r in candidates)
            if time.perf_counter() - started + round_cost > probe_seconds:
                break
            for r in candidates if _round % 2 else reversed(candidates):  # alternating order: drift cancels
                rates[r].append(_rate(network, inputs[r])[0])
    medians = {r: statistics.median(rates[r]) for r in candidates}
    chosen = min(r for r, rate in medians.items() if rate >= 0.95 * max(medians.values()))
    return BatchSize(rows=chosen, max_rows=max(max_rows, chosen))


@dataclass
class _Request:
    networks: tuple[Network, ...]
    views: tuple[Callable[[torch.Tensor], torch.Tensor], ...]
    x: torch.Tensor
    sigma: float
    rows: int
    generator: torch.Generator
    counts: list[torch.Tensor]
    future: Future

    @property
    def key(self) -> tuple:
        return (self.networks, self.views, tuple(self.x.shape), self.x.dtype, self.x.device)


class BatchScheduler:
    """One thread that draws the noise and runs the forward passes of every job of this
    process, merging concurrent jobs' batches (see the module docstring). Keeping all the
    heavy tensor work on one thread also keeps a CPU's cores from being oversubscribed by
    one intra-op thread team per job."""

    def __init__(self, name: str = "smoothcert-batcher"):
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._limits: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self.passes = 0  # forward passes run
        self.requests = 0  # batches served
        self.rows = 0  # rows carried
        self._thread.start()

    def bind(self, network: Network, max_rows: int) -> _Bound:
        """`network` for the sampler: batches sampled through it run on this scheduler,
        merged with other jobs' batches up to `max_rows` rows per pass."""
        self._limits[id(network)] = max_rows
        return _Bound(self, network)

    def count(self, networks: tuple[Network, ...], views: tuple, x: torch.Tensor, sigma: float, rows: int,
              generator: torch.Generator, counts: list[torch.Tensor]) -> None:
        """Draw `rows` noisy copies of x from `generator` and add each network's predictions
        on its view of them to `counts`, on the scheduler's thread, possibly in one pass with
        other jobs' rows. Blocks until done; re-raises the pass's exception."""
        if self._closed:
            raise RuntimeError("the batch scheduler is closed")
        request = _Request(networks, views, x, sigma, rows, generator, counts, Future())
        if threading.current_thread() is self._thread:
            self._run_pack([request])
        else:
            self._queue.put(request)
        request.future.result()

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pending: list[_Request] = []
        while True:
            if not pending:
                item = self._queue.get()
                if item is None:
                    return
                pending.append(item)
            while True:  # take everything that is waiting now
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._fail(pending, RuntimeError("the batch scheduler is closed"))
                    return
                pending.append(item)
            pending = self._run_one_pass(pending)

    def _run_one_pass(self, pending: list[_Request]) -> list[_Request]:
        """Run the oldest request with every waiting request of the same kind that fits;
        returns the requests left for later passes."""
        key = pending[0].key
        limit = min(self._limits.get(id(n), MAX_ROWS) for n in pending[0].networks)
        pack, rest, rows = [], [], 0
        for r in pending:
            if r.key == key and (not pack or rows + r.rows <= limit):
                pack.append(r)
                rows += r.rows
            else:
                rest.append(r)
        self._run_pack(pack)
        return rest

    def _run_pack(self, pack: list[_Request]) -> None:
        first = pack[0]
        try:
            with torch.inference_mode():
                total = sum(r.rows for r in pack)
                batch = torch.empty((total, *first.x.shape), dtype=first.x.dtype, device=first.x.device)
                spans, start = [], 0
                for r in pack:  # each job's draws from its own generator, in its own sizes
                    noisy_batch(r.x, r.sigma, r.rows, r.generator, out=batch[start:start + r.rows])
                    spans.append((start, start + r.rows))
                    start += r.rows
                count_batch(first.networks, first.views, batch, [r.counts for r in pack], spans)
            self.passes += 1
            self.requests += len(pack)
            self.rows += total
            for r in pack:
                r.future.set_result(None)
        except BaseException as e:  # handed to the waiting jobs, never lost on this thread
            self._fail(pack, e)

    @staticmethod
    def _fail(requests: list[_Request], error: BaseException) -> None:
        for r in requests:
            if not r.future.done():
                r.future.set_exception(error)


class _Bound:
    """`network` as the sampler sees it when it runs through a scheduler. Called directly
    (the σ search, a probe) it is just the network."""

    def __init__(self, scheduler: BatchScheduler, network: Network):
        self.scheduler, self.network = scheduler, network
        self.base = getattr(network, "base", network)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.network(batch)
