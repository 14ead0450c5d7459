"""Sampler throughput, measured as ratios against baselines in the same run.

Ways of pushing `--num` samples of one image through one model, in batches of `--batch`
(default: the automatic batch size smoothcert.batching picks here, as a worker would: the
fp32 model's for naive, raw and engine[fp32], each mode's own for engine[MODE], so every
method runs at its best size and no baseline is slowed down):

- engine[MODE]: `smoothcert.sampling.sample_counts` (seeded generator, in-place noise, counts
  kept on the device) with the network run in numeric mode MODE (smoothcert.modes);
- naive:  the reference loop of Cohen et al.'s `core.py` (`_sample_noise`): repeat, `randn_like`,
  add, forward, `argmax`, `np.bincount` on the host after every batch, under `no_grad`, fp32
  (on CUDA IEEE float32, as the engine's fp32; naive[tf32], for information, is the same loop
  with cuDNN's default TF32 convolutions);
- raw:    `model(x_batch)` on a pre-built batch, no noise, no counting, under `inference_mode`,
  fp32 (the ceiling of the fp32 sampler: what the forward pass alone costs). Always the
  network as stored: +fuse modes are engine modes, measured against this unfused baseline;
- raw[fused]: for information only (no target reads it), when a +fuse mode is measured: the
  same forward passes with BatchNorm folded into the convolutions (the fp32+fuse network).

Same model (eval mode, seeded random init), same input, same batch size for all. Each is
warmed up once (compiled modes compile then), then the repeats are interleaved so that
machine drift hits all alike, and the median of each is reported.

Targets (issue 5): engine[fp32]/raw >= 0.95 and engine[fp32]/naive > 1.00; the best mode
against the fp32 naive loop >= 1.8 on a CPU, >= 3 on a GPU. When fp32 modes with flags are
measured (e.g. --compile), the fastest of them against the naive loop too (> 1.00). The exit
code is 0 whatever the outcome: this is a measurement, not a test.

    python benchmarks/sampler.py                       # CIFAR ResNet-110, CPU modes
    python benchmarks/sampler.py --compile             # also the torch.compile'd modes
    python benchmarks/sampler.py --modes fp32 --probe-runs 5   # the batch-size probe's picks
    python benchmarks/sampler.py --device cuda --modes fp32,fp16,fp16+channels_last,fp16+cuda_graphs
"""

from __future__ import annotations

import argparse
import json
import os
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

from benchmarks.machine import OtherLoad, machine_lines
from smoothcert.architectures import build_architecture
from smoothcert.batching import auto_batch_size
from smoothcert.modes import canonical_mode, parse_mode
from smoothcert.numerics import ModeNetwork, in_mode
from smoothcert.sampling import make_generator, sample_counts

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
TARGET_VS_NAIVE = 1.00  # engine[fp32] strictly faster than the naive loop
TARGET_VS_RAW = 0.95
TARGET_BEST_CPU = 1.8  # best mode / fp32 naive loop
TARGET_BEST_GPU = 3.0
CPU_MODES = "fp32,fp32+channels_last,bf16,bf16+channels_last,fp32+fuse,bf16+fuse,bf16+fuse+channels_last"


def with_tf32(run: Callable[[], None]) -> Callable[[], None]:
    """`run` with cuDNN allowed TF32 float32 convolutions (PyTorch's default, which the
    engine switches off: smoothcert.numerics.pin_ieee_fp32), then switched off again."""
    def tf32() -> None:
        torch.backends.cudnn.allow_tf32 = True
        try:
            run()
        finally:
            torch.backends.cudnn.allow_tf32 = False
    return tf32


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


def probe_quality(model: nn.Module, x: torch.Tensor, args: argparse.Namespace,
                  device: torch.device) -> dict[str, object]:
    """The automatic batch size against what it is for: `--probe-runs` probes of the fp32
    model, then the sustained engine[fp32] rate (`--num` samples, `--repeats` interleaved
    rounds, medians) at every power of two from 16 to 128 or twice the largest pick. Prints how
    close each pick's sustained rate is to the best size's."""
    picks = [auto_batch_size(model, INPUT_SHAPE, device).rows for _ in range(args.probe_runs)]
    sizes = [16]
    while sizes[-1] < max(128, 2 * max(picks)):
        sizes.append(sizes[-1] * 2)

    def sustained(rows: int) -> float:
        generator = make_generator(args.seed, device)
        seconds = _timed(lambda: (sample_counts(model, x, args.sigma, args.num, num_classes=NUM_CLASSES,
                                                batch_size=rows, generator=generator), _sync(device)))
        return args.num / seconds

    for rows in sizes:  # warm-up at each size
        sustained(rows)
    rates: dict[int, list[float]] = {rows: [] for rows in sizes}
    for i in range(args.repeats):
        for rows in sizes if i % 2 else sizes[::-1]:
            rates[rows].append(sustained(rows))
    median = {rows: statistics.median(r) for rows, r in rates.items()}
    best = max(median, key=median.get)
    print()
    print(f"automatic batch size, {args.probe_runs} probes of the fp32 model: picks {picks}")
    print("sustained engine[fp32] samples/s by batch: "
          + ", ".join(f"{rows} {rate:.1f}" for rows, rate in median.items()))
    shares = [median[p] / median[best] for p in picks]
    print(f"INFO probe: each pick's sustained rate / the best size's ({best}): "
          + ", ".join(f"{s:.3f}" for s in shares)
          + f"; within 5% in {sum(s >= 0.95 for s in shares)} of {len(picks)}")
    return {"picks": picks, "sustained": median, "best": best, "shares": shares}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="cifar_resnet110")
    parser.add_argument("--batch", type=int, default=None, help="default: the automatic batch size")
    parser.add_argument("--num", type=int, default=2000, help="samples per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default=None, help=f"engine numeric modes (default CPU: {CPU_MODES}; "
                        "CUDA: those plus fp16, fp16+channels_last, fp16+fuse+channels_last)")
    parser.add_argument("--compile", action="store_true", help="also each mode +compile (slow to compile)")
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every measured number here")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each step of one batch"
    )
    parser.add_argument("--probe-runs", type=int, default=0, metavar="K",
                        help="also run the automatic batch-size probe K times on the fp32 model and "
                             "compare its picks with the sustained engine[fp32] rate at each size")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = args.modes or (CPU_MODES if device.type == "cpu"
                           else CPU_MODES + ",fp16,fp16+channels_last,fp16+fuse+channels_last")
    modes = [canonical_mode(m) for m in modes.split(",")]
    if args.compile:
        modes += [canonical_mode(m + "+compile") for m in modes if "compile" not in m and "cuda_graphs" not in m]
    if "fp32" not in modes:
        modes.insert(0, "fp32")

    torch.manual_seed(args.seed)
    model = build_architecture(args.arch, INPUT_SHAPE, NUM_CLASSES).to(device).eval()
    batch_size = args.batch or auto_batch_size(model, INPUT_SHAPE, device).rows
    x = torch.rand(INPUT_SHAPE, device=device)
    x_batch = x.repeat((batch_size, 1, 1, 1))
    networks = {m: in_mode(model, m, device) for m in modes}
    sizes = {m: args.batch or (batch_size if m == "fp32" else auto_batch_size(networks[m], INPUT_SHAPE, device).rows)
             for m in modes}

    def engine(mode: str) -> Callable[[], None]:
        def run() -> None:
            generator = make_generator(args.seed, device)
            sample_counts(networks[mode], x, args.sigma, args.num, num_classes=NUM_CLASSES,
                          batch_size=sizes[mode], generator=generator)
            _sync(device)
        return run

    def naive() -> None:
        naive_counts(model, x, args.sigma, args.num, batch_size)

    def raw() -> None:
        raw_inference(model, x_batch, args.num)

    methods: dict[str, Callable[[], None]] = {"naive": naive, "raw": raw}
    if device.type == "cuda":  # information: the naive loop under PyTorch's default TF32 convolutions
        methods["naive[tf32]"] = with_tf32(naive)
    folded = {m: n.folded for m, n in networks.items() if getattr(n, "folded", 0)}
    if any(parse_mode(m).fuse for m in modes):  # information only: no target reads it
        fused_model = ModeNetwork(model, "fp32+fuse", device).network
        methods["raw[fused]"] = lambda: raw_inference(fused_model, x_batch, args.num)
    methods |= {f"engine[{m}]": engine(m) for m in modes}
    print(f"sampler benchmark: {args.arch} {INPUT_SHAPE}, batch {batch_size}"
          f"{' (automatic)' if args.batch is None else ''}, {args.num} samples per run, "
          f"{args.repeats} interleaved repeats, sigma {args.sigma}")
    print("batch per engine mode: " + ", ".join(f"{m} {b}" for m, b in sizes.items()))
    if folded:
        print("BatchNorms folded into convolutions: " + ", ".join(f"{m} {n}" for m, n in folded.items()))
    for line in machine_lines(device):
        print(line)

    for fn in methods.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice, compilation
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    other = OtherLoad()
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(_timed(fn))

    rate = {name: args.num / statistics.median(t) for name, t in times.items()}
    best = {name: args.num / min(t) for name, t in times.items()}
    width = max(map(len, methods))
    print()
    print(f"{'method':<{width}} {'median samples/s':>17} {'best samples/s':>15} {'/naive':>7}   per-run seconds")
    for name, t in times.items():
        runs = " ".join(f"{s:.2f}" for s in t)
        print(f"{name:<{width}} {rate[name]:>17.1f} {best[name]:>15.1f} {rate[name] / rate['naive']:>7.2f}   {runs}")
    other_cores = other.cores()
    if other_cores is not None:
        print(f"other processes used {other_cores:.2f} of {os.cpu_count()} cores on average "
              "during the timed runs")
        if other_cores > 0.25:
            print("WARNING: other processes competed for the cores; the ratios are noisy")
    print()
    fastest = max((m for m in methods if m.startswith("engine")), key=rate.get)
    best_target = TARGET_BEST_GPU if device.type == "cuda" else TARGET_BEST_CPU
    checks = (
        ("engine[fp32]/raw", rate["engine[fp32]"] / rate["raw"], TARGET_VS_RAW, ">="),
        ("engine[fp32]/naive", rate["engine[fp32]"] / rate["naive"], TARGET_VS_NAIVE, ">"),
        (f"best mode {fastest}/naive", rate[fastest] / rate["naive"], best_target, ">="),
    )
    # The fp32 sampler with its opt-in flags (+compile, +fuse, ...): still float32 arithmetic.
    fastest_fp32 = max((m for m in methods if m.startswith("engine[fp32")), key=rate.get)
    if fastest_fp32 != "engine[fp32]":
        checks += ((f"fastest fp32 mode {fastest_fp32}/naive", rate[fastest_fp32] / rate["naive"],
                    TARGET_VS_NAIVE, ">"),)
    verdicts = {}
    for label, ratio, target, op in checks:
        ok = ratio > target if op == ">" else ratio >= target
        verdicts[label] = ok
        print(f"{'PASS' if ok else 'FAIL'} {label} = {ratio:.3f} (target {op} {target:.2f}, medians)")
    if "naive[tf32]" in rate:
        print(f"info: {fastest}/naive[tf32] = {rate[fastest] / rate['naive[tf32]']:.3f} (the naive loop with "
              "cuDNN's default TF32 convolutions, which is not fp32 arithmetic)")
    print(f"info: best-run ratios engine[fp32]/naive = {best['engine[fp32]'] / best['naive']:.3f}, "
          f"engine[fp32]/raw = {best['engine[fp32]'] / best['raw']:.3f}")

    if args.breakdown:
        print()
        print(f"per-batch breakdown ({batch_size} samples, median seconds):")
        for name, seconds in breakdown(model, x, args.sigma, batch_size, args.repeats):
            print(f"  {name:<46} {seconds * 1e3:9.2f} ms")
    probe = probe_quality(model, x, args, device) if args.probe_runs else None
    if args.json:
        args.json.write_text(json.dumps({
            "probe": probe,
            "arch": args.arch, "batch": batch_size, "batch_per_mode": sizes, "folded_per_mode": folded,
            "num": args.num, "device": str(device),
            "machine": machine_lines(device), "other_cores": other_cores, "seconds": times,
            "samples_per_second": rate, "checks": {k: [r, t, verdicts[k]] for k, r, t, _ in checks},
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
