"""Adaptive sampling against a fixed n on the digits test split: samples, ACR, certified accuracy.

Two settings, each certified twice through `smoothcert.evaluation.evaluate` (the path of
`smoothcert evaluate`) with the same root seed, so every example gets the same seed, hence
the same selection sample (and the same σ search) in both runs:

- fixed:    n = --n (100,000) estimation samples per example;
- adaptive: sampling="adaptive" with n_max = --n and the default tolerance (smoothcert.adaptive):
            each example's n is chosen from its own selection sample;
- sequential: sampling="sequential" with n_max = --n, once per --targets radius r*
            (smoothcert.sequential): votes in looks until the radius reaches r* or cannot.

Settings:
1. demo:   the demo model (models/digits) at its default σ, Cohen's bound;
2. search: the same model with the DDRS σ search per input (default search settings) and the
           memory off, so that the examples are independent (EVALUATION.md's
           ddrs-search-gaussian-0.25 run, without the memory).

n0 = 100, α = 0.001 throughout. Samples per example count every forward pass: the σ search,
the n0 selection samples and the n estimation samples.

Targets (issue 5): adaptive spends at least 3× fewer samples per example on average than
fixed; ACR within 0.02; certified accuracy at r = 0, 0.25, ..., 1.5 within 1 point at every
radius; for the search setting also the samples spent on the search against those spent on
certification. Sequential sampling answers "certified at r*?", so it is judged by the samples
and by the certified accuracy at r* (within 1 point of fixed n's there). The exit code is 0
whatever the outcome: this is a measurement, not a test. ACRs and certified accuracies are
printed rounded down (smoothcert.rounding.floor_text); differences to nearest.

With --every 6 (the default: 75 of the 450 test images) the benchmark takes about 16 minutes
on a 2-core CPU with nothing else running (a fixed certificate at n = 100,000 takes 3.5–5 s
there, the DDRS search ~0.3 s); each --sweep tolerance adds 1 to 4 minutes. One image is 1.33
points of certified accuracy at that size, so the 1-point target can only pass with no image
changing sides at any radius; --every 1 certifies all 450 (about 1.6 hours on that CPU).

    python benchmarks/adaptive.py
    python benchmarks/adaptive.py --every 1 --sweep 0.02,0.1 --json runs/adaptive.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import machine_lines
from smoothcert.adaptive import DEFAULT_TOLERANCE
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.data import load_data
from smoothcert.evaluation import EvaluationRun, evaluate, summarize
from smoothcert.rounding import floor_text
from smoothcert.search import SigmaSearch

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
TARGET_RATIO = 3.0
TARGET_ACR = 0.02
TARGET_POINTS = 1.0
SETTINGS = {
    "demo": "the model's default σ, Cohen's bound",
    "search": "DDRS σ search per input (default settings), memory off, Cohen's bound",
}


class Dots:
    """Evaluation progress on stderr: one line every `every` examples."""

    def __init__(self, label: str, total: int, every: int = 10):
        self.label, self.total, self.every, self.done = label, total, every, 0
        self.started = time.perf_counter()

    def stage(self, stage: str, done: int, total: int) -> None:
        pass

    def advance(self, note: str = "") -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            elapsed = time.perf_counter() - self.started
            print(f"  {self.label}: {self.done}/{self.total} examples, {elapsed:.0f} s", file=sys.stderr, flush=True)


def certify_split(certifier: Certifier, data, args, label: str, *, search: SigmaSearch | None,
                  sampling: str, tolerance: float | None = None,
                  target_radius: float | None = None) -> tuple[EvaluationRun, float]:
    total = len(range(0, len(data), args.every)[: args.limit])
    started = time.perf_counter()
    run = evaluate(
        certifier, data, every=args.every, limit=args.limit, sigma_search=search, n0=args.n0, n=args.n,
        alpha=args.alpha, sampling=sampling, tolerance=tolerance, target_radius=target_radius,
        batch_size=args.batch, seed=args.seed,
        memory=False, progress=Dots(label, total),
    )
    return run, time.perf_counter() - started


def figures(run: EvaluationRun, seconds: float) -> dict[str, Any]:
    """Every number the report needs from one run (and the per-example rows)."""
    summary = summarize(run.rows, RADII, parameters=run.parameters)
    certs = [row.certificate for row in run.rows]
    search = [c.search.samples_used if c.search is not None else 0 for c in certs]
    count = len(certs)
    return {
        "summary": summary,
        "samples_mean": summary["samples"]["mean"],
        "search_mean": sum(search) / count,
        "selection_mean": sum(c.n0 for c in certs) / count,
        "estimation_mean": sum(c.n for c in certs) / count,
        "certification_mean": sum(c.n0 + c.n for c in certs) / count,
        "acr": summary["acr"],
        "accuracy": {g["radius"]: g["accuracy"] for g in summary["certified_accuracy"]},
        "correct": {g["radius"]: g["count"] for g in summary["certified_accuracy"]},
        "early_abstentions": sum(c.sampling == "adaptive" and c.n == 0 for c in certs),
        "seconds": seconds,
        "rows": [{"idx": r.idx, "label": r.label, "prediction": r.certificate.prediction,
                  "radius": r.certificate.radius, "sigma": r.certificate.sigma, "n": r.certificate.n,
                  "samples": r.certificate.samples} for r in run.rows],
    }


def compare(fixed: dict, adaptive: dict, count: int) -> dict[str, Any]:
    points = {r: 100 * (adaptive["accuracy"][r] - fixed["accuracy"][r]) for r in RADII}
    worst = max(RADII, key=lambda r: (abs(points[r]), -r))
    return {
        "ratio": fixed["samples_mean"] / adaptive["samples_mean"],
        "certification_ratio": fixed["certification_mean"] / adaptive["certification_mean"],
        "acr_difference": adaptive["acr"] - fixed["acr"],
        "points": points,
        "images": {r: adaptive["correct"][r] - fixed["correct"][r] for r in RADII},
        "worst_radius": worst,
        "worst_points": abs(points[worst]),
        "point_per_image": 100 / count,
        "same_prediction": sum(a["prediction"] == f["prediction"]
                               for a, f in zip(adaptive["rows"], fixed["rows"], strict=True)),
    }


def table(name: str, fixed: dict, adaptive: dict, tolerance: float) -> list[str]:
    t = f"adaptive ({tolerance:g}σ)"
    lines = [f"{'':<34}{'fixed':>14}{t:>20}"]

    def line(label: str, a: str, b: str) -> None:
        lines.append(f"{label:<34}{a:>14}{b:>20}")

    line("samples per example", f"{fixed['samples_mean']:,.0f}", f"{adaptive['samples_mean']:,.0f}")
    if name == "search":
        line("  σ search", f"{fixed['search_mean']:,.0f}", f"{adaptive['search_mean']:,.0f}")
    line("  selection (n0)", f"{fixed['selection_mean']:,.0f}", f"{adaptive['selection_mean']:,.0f}")
    line("  estimation (n)", f"{fixed['estimation_mean']:,.0f}", f"{adaptive['estimation_mean']:,.0f}")
    line("ACR", floor_text(fixed["acr"], 4), floor_text(adaptive["acr"], 4))
    for r in RADII:
        line(f"certified accuracy r = {r:g}", floor_text(fixed["accuracy"][r], 3),
             floor_text(adaptive["accuracy"][r], 3))
    line("early abstentions", "–", str(adaptive["early_abstentions"]))
    line("seconds", f"{fixed['seconds']:.0f}", f"{adaptive['seconds']:.0f}")
    return lines


def verdicts(name: str, c: dict) -> list[str]:
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    r = c["worst_radius"]
    images = c["images"][r]
    return [
        f"{verdict(c['ratio'] >= TARGET_RATIO)} {name}: samples per example fixed/adaptive = "
        f"{c['ratio']:.2f}x (target >= {TARGET_RATIO:g}x)",
        f"{verdict(abs(c['acr_difference']) <= TARGET_ACR)} {name}: ACR difference adaptive - fixed = "
        f"{c['acr_difference']:+.4f} (target within {TARGET_ACR:g})",
        f"{verdict(c['worst_points'] <= TARGET_POINTS)} {name}: largest certified-accuracy difference = "
        f"{c['worst_points']:.2f} points at r = {r:g} ({images:+d} images; 1 image = "
        f"{c['point_per_image']:.2f} points) (target <= {TARGET_POINTS:g} point)",
    ]


def sequential_lines(name: str, fixed: dict, seq: dict, target: float, count: int) -> list[str]:
    """Verdicts for sequential sampling at one target radius: the issue's samples target, and
    certified accuracy at the radius the mode answers for (the only one it optimises)."""
    ratio = fixed["samples_mean"] / seq["samples_mean"]
    points = 100 * (seq["accuracy"][target] - fixed["accuracy"][target])
    images = seq["correct"][target] - fixed["correct"][target]
    return [
        f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'} {name}: sequential to r = {target:g}: samples per "
        f"example fixed/sequential = {ratio:.2f}x ({seq['samples_mean']:,.0f}) (target >= {TARGET_RATIO:g}x)",
        f"{'PASS' if abs(points) <= TARGET_POINTS else 'FAIL'} {name}: sequential to r = {target:g}: certified "
        f"accuracy at r = {target:g}: {floor_text(seq['accuracy'][target], 3)} vs fixed "
        f"{floor_text(fixed['accuracy'][target], 3)} "
        f"({points:+.2f} points, {images:+d} images; 1 image = {100 / count:.2f} points) "
        f"(target within {TARGET_POINTS:g} point)",
    ]


def curve_lines(name: str, fixed: dict, runs: dict[float, dict], count: int) -> list[str]:
    """Sequential sampling run once per target radius, as a way to the certified-accuracy
    curve at those radii: the samples of all the runs together (each draws its own selection
    sample) against fixed n, and the largest certified-accuracy difference at any of them.
    No ACR: a sequential radius stops at its target."""
    total = sum(run["samples_mean"] for run in runs.values())
    ratio = fixed["samples_mean"] / total
    points = {t: 100 * (run["accuracy"][t] - fixed["accuracy"][t]) for t, run in runs.items()}
    worst = max(points, key=lambda t: (abs(points[t]), -t))
    radii = ", ".join(f"{t:g}" for t in runs)
    return [
        f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'} {name}: sequential once per radius ({radii}): samples "
        f"per example, all runs together = {total:,.0f}, fixed/sequential = {ratio:.2f}x (target >= {TARGET_RATIO:g}x)",
        f"{'PASS' if abs(points[worst]) <= TARGET_POINTS else 'FAIL'} {name}: sequential once per radius: largest "
        f"certified-accuracy difference at those radii = {points[worst]:+.2f} points at r = {worst:g} "
        f"({runs[worst]['correct'][worst] - fixed['correct'][worst]:+d} images; 1 image = {100 / count:.2f} points) "
        f"(target within {TARGET_POINTS:g} point)",
    ]


def load_line() -> list[str]:
    try:
        return [f"load average at start: {os.getloadavg()[0]:.2f} (other processes slow the seconds, not the samples)"]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "digits"))
    parser.add_argument("--every", type=int, default=6, help="certify test images 0, K, 2K, ... (default 6: 75)")
    parser.add_argument("--limit", type=int, help="at most this many images")
    parser.add_argument("--n", type=int, default=100_000, help="fixed n, and the adaptive n_max")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"adaptive tolerance in units of σ (default {DEFAULT_TOLERANCE}, the engine's)")
    parser.add_argument("--sweep", default="", metavar="T1,T2",
                        help="also run adaptive at these tolerances (reported, no targets)")
    parser.add_argument("--settings", default="demo,search", help="comma list of: demo, search")
    parser.add_argument("--targets", default="0.25,0.5,0.75", metavar="R1,R2",
                        help="also run sampling 'sequential' to each of these target radii, judged by "
                             "the samples and the certified accuracy at the target ('' for none)")
    parser.add_argument("--batch", type=int, default=None,
                        help="noisy samples per forward pass (default: the automatic size, as a worker)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [s for s in args.settings.split(",") if s]
    if unknown := set(names) - set(SETTINGS):
        parser.error(f"unknown settings {sorted(unknown)}; choose from {sorted(SETTINGS)}")
    sweep = [float(t) for t in args.sweep.split(",") if t]
    targets = [float(t) for t in args.targets.split(",") if t]
    if off_grid := [t for t in targets if t not in RADII]:
        parser.error(f"targets must be among the reported radii {RADII}, got {off_grid}")

    device = torch.device(args.device)
    certifier = Certifier(load_bundle(args.model, device=device), device=device)
    data = load_data("sklearn-digits", "test")
    count = len(range(0, len(data), args.every)[: args.limit])
    if args.batch is None:
        args.batch = certifier.batch.rows
    spec = certifier.spec
    print(f"adaptive sampling benchmark: {spec.name} ({certifier.bundle.digest[:19]}...), sklearn-digits test "
          f"split, every {args.every}th image ({count} of {len(data)}), n0 {args.n0}, n {args.n:,} "
          f"(adaptive: n_max), alpha {args.alpha}, tolerance {args.tolerance:g} of σ, batch {args.batch}, "
          f"seed {args.seed}")
    for line in machine_lines(device) + load_line():
        print(line)

    report: dict[str, Any] = {"arguments": vars(args), "count": count, "radii": list(RADII), "settings": {},
                              "targets": {"ratio": TARGET_RATIO, "acr": TARGET_ACR, "points": TARGET_POINTS}}
    lines: list[str] = []
    for name in names:
        search = SigmaSearch("ddrs").resolved() if name == "search" else None
        what = f"σ = {spec.sigma.default:g}, " + SETTINGS[name] if name == "demo" else SETTINGS[name]
        print(f"\nsetting {name}: {what}", flush=True)
        fixed = figures(*certify_split(certifier, data, args, f"{name} fixed", search=search,
                                       sampling="fixed", tolerance=None))
        adaptive = figures(*certify_split(certifier, data, args, f"{name} adaptive", search=search,
                                          sampling="adaptive", tolerance=args.tolerance))
        c = compare(fixed, adaptive, count)
        for line in table(name, fixed, adaptive, args.tolerance):
            print(line)
        print(f"same prediction (or abstention) as fixed: {c['same_prediction']} of {count}; adaptive n: "
              f"min {min(r['n'] for r in adaptive['rows']):,}, max {max(r['n'] for r in adaptive['rows']):,}")
        entry: dict[str, Any] = {"fixed": fixed, "adaptive": adaptive, "comparison": c, "sweep": {}}
        setting_lines = verdicts(name, c)
        if name == "search":
            for label, f in (("fixed", fixed), ("adaptive", adaptive)):
                share = f["search_mean"] / f["samples_mean"]
                setting_lines.append(
                    f"INFO {name}: {label}: samples on σ search {f['search_mean']:,.0f} vs on certification "
                    f"{f['certification_mean']:,.0f} per example (search {100 * share:.1f}% of the total)")
            setting_lines.append(f"INFO {name}: certification samples alone fixed/adaptive = "
                                 f"{c['certification_ratio']:.2f}x")
        for t in sweep:
            other = figures(*certify_split(certifier, data, args, f"{name} adaptive {t:g}", search=search,
                                           sampling="adaptive", tolerance=t))
            s = compare(fixed, other, count)
            entry["sweep"][t] = {"adaptive": other, "comparison": s}
            setting_lines.append(
                f"INFO {name}: tolerance {t:g}σ: samples {other['samples_mean']:,.0f} per example "
                f"(fixed/adaptive {s['ratio']:.2f}x), ACR {floor_text(other['acr'], 4)} ({s['acr_difference']:+.4f}), "
                f"largest certified-accuracy difference {s['worst_points']:.2f} points at r = {s['worst_radius']:g}")
        entry["sequential"] = {}
        for target in targets:
            seq = figures(*certify_split(certifier, data, args, f"{name} sequential {target:g}", search=search,
                                         sampling="sequential", target_radius=target))
            entry["sequential"][target] = seq
            setting_lines += sequential_lines(name, fixed, seq, target, count)
        if len(targets) > 1:
            setting_lines += curve_lines(name, fixed, entry["sequential"], count)
        report["settings"][name] = entry
        lines += setting_lines
        print()
        for line in setting_lines:
            print(line, flush=True)

    print("\nsummary:")
    for line in lines:
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
