"""Sampler throughput, measured as ratios against baselines in the same run.

Three ways of pushing `--num` samples of one image through one model, in batches of `--batch`:

- engine: `smoothcert.sampling.sample_counts` (seeded generator, in-place noise, counts kept
  on the device);
- naive:  the reference loop of Cohen et al.'s `core.py` (`_sample_noise`): repeat, `randn_like`,
  add, forward, `argmax`, `np.bincount` on the host after every batch, under `no_grad`;
- raw:    `model(x_batch)` on a pre-built batch, no noise, no counting, under `inference_mode`
  (the ceiling: what the forward pass alone costs).

Same model (eval mode, seeded random init), same input, same batch size for all three. Each is
warmed up once, then the repeats are interleaved (engine, naive, raw, engine, ...) so that
machine drift hits all three alike, and the median of each is reported.

Targets: engine/naive ≥ 1.00 and engine/raw ≥ 0.90. The exit code is 0 whatever the outcome:
this is a measurement, not a test.

    python benchmarks/sampler.py --arch cifar_resnet20
    python benchmarks/sampler.py --arch cifar_resnet110 --num 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoothcert.architectures import build_architecture
from smoothcert.sampling import make_generator, sample_counts

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
TARGET_VS_NAIVE = 1.00
TARGET_VS_RAW = 0.90


def naive_counts(
    model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int
) -> np.ndarray:
    """Cohen et al.'s `Smooth._sample_noise`, kept as written there (the baseline)."""
    with torch.no_grad():
        counts = np.zeros(NUM_CLASSES, dtype=int)
        remaining = num
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch, device=x.device) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=NUM_CLASSES)
        return counts


def raw_inference(model: nn.Module, x_batch: torch.Tensor, num: int) -> None:
    """The forward passes alone, on a batch built once: the sampler's ceiling."""
    batch_size = x_batch.shape[0]
    with torch.inference_mode():
        remaining = num
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            model(x_batch[:this_batch])
    _sync(x_batch.device)


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: stop the clock only once they are done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class OtherLoad:
    """CPU time used by every other process on the machine while timing: noise made visible.

    /proc/stat's busy time for the whole machine, less this process's own CPU time, divided
    by the wall time: the average number of cores taken by someone else (None off Linux).
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        jiffies = [int(v) for v in fields]
        idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
        # guest time is already counted in user time: only the first 8 fields are summed.
        busy = (sum(jiffies[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start, strict=True))
        return max(0.0, (busy - own) / wall)


def cpu_model() -> str:
    """The CPU's model name (and family/model numbers) from /proc/cpuinfo, else `platform`'s."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    # Virtual machines often report a bare "AMD EPYC": family/model tell the generation.
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, " \
        f"model {fields.get('model', '?')})"


def machine_lines(device: torch.device) -> list[str]:
    lines = [
        f"cpu:     {cpu_model()} ({os.cpu_count()} logical cores)",
        (
            f"torch:   {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
            f"CPU kernels {torch.backends.cpu.get_cpu_capability()}"
        ),
        f"python:  {platform.python_version()} on {platform.system()} {platform.release()}",
    ]
    if device.type == "cuda":
        lines.append(f"device:  {torch.cuda.get_device_name(device)}")
    else:
        lines.append(f"device:  {device}")
    return lines


def breakdown(
    model: nn.Module, x: torch.Tensor, sigma: float, batch_size: int, repeats: int
) -> list[tuple[str, float]]:
    """Median seconds per batch of each step the engine and the naive loop take."""
    generator = make_generator(0, x.device)
    shape = (batch_size, *x.shape)
    x_batch = x.repeat((batch_size, 1, 1, 1))
    out = torch.zeros(NUM_CLASSES, dtype=torch.int64, device=x.device)

    def engine_noise() -> torch.Tensor:
        b = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        return b.mul_(sigma).add_(x)

    def naive_noise() -> torch.Tensor:
        b = x.repeat((batch_size, 1, 1, 1))
        return b + torch.randn_like(b) * sigma

    with torch.inference_mode():
        logits = model(x_batch)
        predictions = logits.argmax(1)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("randn with generator (engine)", lambda: torch.randn(
                shape, generator=generator, device=x.device, dtype=x.dtype)),
            ("noisy batch, engine (randn, mul_, add_)", engine_noise),
            ("noisy batch, naive (repeat, randn_like, *, +)", naive_noise),
            ("forward pass", lambda: model(x_batch)),
            ("argmax + index_add_ (engine)", lambda: out.index_add_(
                0, logits.argmax(1), torch.ones_like(predictions))),
            ("argmax + host bincount (naive)", lambda: np.bincount(
                logits.argmax(1).cpu().numpy(), minlength=NUM_CLASSES)),
        ]
        results = []
        for name, fn in steps:
            fn()
            times = []
            for _ in range(max(3, repeats)):
                _sync(x.device)
                times.append(_timed(lambda fn=fn: (fn(), _sync(x.device))))
            results.append((name, statistics.median(times)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_resnet20")
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--num", type=int, default=4000, help="samples per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each step of one batch"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    model = build_architecture(args.arch, INPUT_SHAPE, NUM_CLASSES).to(device).eval()
    x = torch.rand(INPUT_SHAPE, device=device)
    x_batch = x.repeat((args.batch, 1, 1, 1))

    def engine() -> None:
        generator = make_generator(args.seed, device)
        sample_counts(
            model, x, args.sigma, args.num, num_classes=NUM_CLASSES,
            batch_size=args.batch, generator=generator,
        )

    def naive() -> None:
        naive_counts(model, x, args.sigma, args.num, args.batch)

    def raw() -> None:
        raw_inference(model, x_batch, args.num)

    methods: dict[str, Callable[[], None]] = {"engine": engine, "naive": naive, "raw": raw}
    print(f"sampler benchmark: {args.arch} {INPUT_SHAPE}, batch {args.batch}, "
          f"{args.num} samples per run, {args.repeats} interleaved repeats, sigma {args.sigma}")
    for line in machine_lines(device):
        print(line)

    for fn in methods.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice, caches
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    other = OtherLoad()
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(_timed(fn))

    rate = {name: args.num / statistics.median(t) for name, t in times.items()}
    best = {name: args.num / min(t) for name, t in times.items()}
    print()
    print(f"{'method':<8} {'median samples/s':>17} {'best samples/s':>15}   per-run seconds")
    for name, t in times.items():
        runs = " ".join(f"{s:.2f}" for s in t)
        print(f"{name:<8} {rate[name]:>17.1f} {best[name]:>15.1f}   {runs}")
    other_cores = other.cores()
    if other_cores is not None:
        print(f"other processes used {other_cores:.2f} of {os.cpu_count()} cores on average "
              "during the timed runs")
        if other_cores > 0.25:
            print("WARNING: other processes competed for the cores; the ratios are noisy")
    print()
    for label, ratio, target in (
        ("engine/naive", rate["engine"] / rate["naive"], TARGET_VS_NAIVE),
        ("engine/raw", rate["engine"] / rate["raw"], TARGET_VS_RAW),
    ):
        verdict = "PASS" if ratio >= target else "FAIL"
        print(f"{verdict} {label} = {ratio:.3f} (target >= {target:.2f}, medians)")
    print(f"info: best-run ratios engine/naive = {best['engine'] / best['naive']:.3f}, "
          f"engine/raw = {best['engine'] / best['raw']:.3f}")

    if args.breakdown:
        print()
        print(f"per-batch breakdown ({args.batch} samples, median seconds):")
        for name, seconds in breakdown(model, x, args.sigma, args.batch, args.repeats):
            print(f"  {name:<46} {seconds * 1e3:9.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
