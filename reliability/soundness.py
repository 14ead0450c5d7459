"""Soundness under load: certificates of the exact-answer linear model, issued by the real
stack to concurrent clients, exceed the exact robust radius no more often than α allows, in
every bound mode, with the memory on and off; the memory keeps its invariant.

How. The exact model of docs/algorithms.md §8 (tests/workers/helpers.py::make_bundle: class 1
iff mean pixel > 0.5, input 1×4×4, exact robust radius of x = 4·|mean(x) − 0.5|) and its
DRS twin "tiny-drs" (`drs_bundle`: the same rule on each checkerboard half; the same exact
radius) are uploaded through `POST /v1/models` with the admin key; `--workers` Celery
workers and uvicorn serve `--clients` concurrent SDK clients submitting `--jobs`
certifications, spread evenly over the cells bound (cohen, two_sided: tiny; drs: tiny-drs;
every bound the API accepts) × memory (off, on); within a cell, fixed or adaptive sampling
and a fixed σ or a σ search (ddrs, insta; not for DRS, which the API refuses) are drawn per
job. α is large
(`--alpha`, 0.1) and n small (`--n`, 100) so that violations are frequent enough for the
test to have power. By default the service refuses both (α ≤ 0.05 for every request; with the
memory on, α one of 0.001, 0.01, 0.05 and n ≥ 1000: docs/api.md), so this scenario's stack
runs with SMOOTHCERT_MAX_ALPHA = SMOOTHCERT_MEMORY_ALPHAS = `--alpha` and
SMOOTHCERT_MEMORY_MIN_N = `--memory-min-n` (half of `--n` unless given, so that adaptive
sampling still chooses among several sizes with the memory on): lax settings of this test,
never a service default. Memory-off jobs carry their own seed (drawn from `--seed`);
memory-on jobs carry none, as the memory requires: the service draws it. Inputs are fresh
points at chosen exact distances (`--distances`, either
side of the boundary), where the certificates are tight (the radius is a large fraction of
the exact distance, so an unsound bound shows), or (`--revisit`) close neighbours of earlier
inputs, so that the memory answers from committed balls ("inside") and shrinks certificates
("shrunk").

A violation: a non-abstained answer whose radius exceeds the exact distance of its input, or
whose class is wrong. Checks:
- each cell and all together: violations / certifications is not significantly above α
  (one-sided binomial test at 1e-3, tests/smoothcert/exact.py::rate_is_too_high; a sound
  procedure fails it with probability < 0.001);
- each fresh certificate's estimation counts, as its result reports them (`n_a`; DRS:
  `n_a_halves`), reproduce its bounds exactly (p_a_lower, p_b_upper, p_a_lower_halves, from
  smoothcert.bounds at its α with its `noise_tail`) and its radius (from `noise_sigma`; a
  "shrunk" radius is at most that);
- the test can fail: from the same counts the radius of an unsound variant is recomputed:
  the plug-in σ'·Φ⁻¹(nA/n) (DRS: σ'/√2·(Φ⁻¹(nA_l/n) + Φ⁻¹(nA_r/n))), σ' the noise σ, instead
  of the lower bounds. The same test, over the fresh certificates, must flag it in every cell
  and overall (the bound at 3α is reported beside it);
- the memory: one memory per model, at `--alpha` (its namespace digest/fp32/cpu/α); zero
  invariant violations, one entry per committed job, each answer its entry, every entry and
  every answer naming its root (the "new" or "shrunk" entry whose own sampling produced the
  ball) and reporting the root's sampling (reliability/soak.py::check_memory); every memory
  answer ("inside") above its exact distance or of the wrong class comes from a committed ball
  that is itself unsound, and so is that ball's root (which the triangle inequality makes
  necessary: sound balls only give sound answers, and an inside ball lies in its root's), and
  the number of unsound roots is itself consistent with α (per model: each root is one
  sampling at level α);
- every job accepted and succeeded, none lost.

    python reliability/soundness.py                 # full size: 6,000 certifications
    python reliability/soundness.py --jobs 400 --json /tmp/soundness.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reliability.memory_log import ROOT_OUTCOMES, MemoryLog, read_log
from reliability.report import Report, main, run_scenario, scenario_parser
from reliability.soak import (
    Driver,
    Outcome,
    Spec,
    check_jobs,
    check_memory,
    check_processes,
    check_seeds,
    memory_outcomes,
    near,
    running_stack,
    tiny_bundle,
    upload,
)
from smoothcert import bounds
from smoothcert.results import memory_namespace
from tests.smoothcert.exact import rate_is_too_high

SHAPE = (1, 4, 4)
BOUNDS = ("cohen", "two_sided", "drs")
SIGMA_MODES = ("fixed", "ddrs", "insta")


def exact(x: np.ndarray) -> tuple[int, float]:
    """(true class, exact robust radius) of input x for the tiny model."""
    mean = float(np.mean(np.asarray(x, dtype=np.float64)))
    return int(mean > 0.5), 4 * abs(mean - 0.5)


def point_at(rng: np.random.Generator, distance: float, side: int) -> np.ndarray:
    """A random input in [0, 1] whose exact distance to the boundary is `distance` (mean
    pixel 0.5 ± distance/4; the zero-mean offset keeps pixels in [0.05, 0.95])."""
    offset = rng.uniform(-0.2, 0.2, SHAPE)
    return (0.5 + side * distance / 4 + offset - offset.mean()).astype(np.float32)


def specs_for(args: argparse.Namespace) -> list[Spec]:
    """`--jobs` certifications, evenly over bound × memory, in a seeded order. An input is a
    fresh point at one of `--distances` (a random side), or, with probability `--revisit`, a
    neighbour (`soak.near`: within `--spread`, a near duplicate, or the same) of an earlier
    input of the same memory setting. Each memory-off job has its own seed, drawn from
    `--seed`; memory-on jobs have none (the service draws it)."""
    rng = np.random.default_rng(args.seed)
    order = [(BOUNDS[i % 3], bool((i // 3) % 2)) for i in range(args.jobs)]
    rng.shuffle(order)
    earlier: dict[tuple[str, bool], list[np.ndarray]] = {}
    specs = []
    for bound, memory in order:
        model = "tiny-drs" if bound == "drs" else "tiny"
        seen = earlier.setdefault((model, memory), [])
        while True:
            if seen and rng.random() < args.revisit:
                x = near(rng, seen[rng.integers(len(seen))], args.spread)
            else:
                x = point_at(rng, float(rng.choice(args.distances)), int(rng.choice([-1, 1])))
            x = x.astype(np.float32)
            if exact(x)[1] > 1e-3:  # never on the boundary itself
                break
        seen.append(x)
        # DRS takes a fixed σ only (the API refuses a σ search for it).
        sigma_mode = "fixed" if bound == "drs" else str(rng.choice(SIGMA_MODES, p=[0.5, 0.25, 0.25]))
        sampling = "adaptive" if rng.random() < args.adaptive else "fixed"
        options: dict[str, Any] = {"n0": args.n0, "n": args.n, "alpha": args.alpha, "bound": bound,
                                   "memory": memory, "sampling": sampling}
        seed = int(rng.integers(2**62))  # drawn either way, so the workload is the same sequence
        if not memory:
            options["seed"] = seed
        if sigma_mode == "fixed":
            options["sigma"] = args.sigma
        else:
            options["sigma_search"] = sigma_mode
        specs.append(Spec("certification", model, x, options,
                          {"bound": bound, "memory": "on" if memory else "off",
                           "sigma": sigma_mode, "sampling": sampling}))
    return specs


def violates(x: np.ndarray, prediction: int | None, radius: float | None) -> bool:
    """A non-abstained answer above the exact distance of x, or of the wrong class."""
    if prediction is None:
        return False
    truth, distance = exact(x)
    return prediction != truth or float(radius or 0.0) > distance


def estimate_counts(result: dict[str, Any]) -> list[int] | None:
    """The estimation counts of a fresh certificate, as its result reports them: [nA] (cohen,
    two_sided) or [nA_left, nA_right] (drs); None if absent."""
    counts = result.get("n_a_halves") if result["bound"] == "drs" else [result.get("n_a")]
    if not result.get("n") or not counts or None in counts:
        return None
    return [int(k) for k in counts]


def reproduce(result: dict[str, Any], counts: list[int]) -> str | None:
    """None when the counts give exactly the result's bounds (smoothcert.bounds at its α, less
    its noise tail) and its radius (from its noise σ; a "shrunk" radius: at most that), else
    what differs. tiny has two classes, so the two-sided runner-up holds the other n − nA votes."""
    n, alpha, bound, tail = result["n"], result["alpha"], result["bound"], result["noise_tail"]
    sigma = result["noise_sigma"]
    if bound == "drs":
        halves = bounds.drs_bounds(counts[0], counts[1], n, alpha, tail)
        got = {"p_a_lower_halves": list(halves)}
        radius = bounds.drs_radius(sigma, *halves)
    elif bound == "cohen":
        p_low = bounds.cohen_bound(counts[0], n, alpha, tail)
        got = {"p_a_lower": p_low}
        radius = bounds.cohen_radius(sigma, p_low)
    else:
        p_low, p_up, _ = bounds.two_sided_bound([counts[0], n - counts[0]], 0, alpha, tail)
        got = {"p_a_lower": p_low, "p_b_upper": p_up}
        radius = bounds.two_sided_radius(sigma, p_low, p_up)
    reported = {k: result.get(k) for k in got}
    if reported != got:
        return f"bounds {reported}, the counts {counts} of n = {n} give {got}"
    shrunk = (result.get("memory") or {}).get("outcome") == "shrunk"
    expected = 0.0 if radius is None else radius
    if not (result["radius"] <= expected if shrunk else result["radius"] == expected):
        return f"radius {result['radius']}, the bounds give {expected}"
    return None


def fresh(o: Outcome) -> bool:
    """The answer is this job's own sampling (not a memory answer, nor the rule's "inside")."""
    m = o.result.get("memory") or {}
    return not m.get("used") or (m.get("entry") is not None and m.get("outcome") in ("new", "shrunk"))


def variant_radius(result: dict[str, Any], counts: list[int], variant: str) -> float | None:
    """The radius an unsound variant gives from the same counts, with the certificate's noise
    σ (None: it abstains); the 3α variant also takes off its noise tail."""
    n, alpha, bound = result["n"], result["alpha"], result["bound"]
    sigma, tail = result["noise_sigma"], result["noise_tail"]
    if variant == "plug-in":  # the estimates themselves in place of the lower bounds
        if bound == "drs":
            a_plus_b = sum(float(norm.ppf(k / n)) for k in counts)
            return sigma / math.sqrt(2) * a_plus_b if a_plus_b > 0 else None
        p = counts[0] / n
        return sigma * float(norm.ppf(p)) if p > 0.5 else None
    # "3α": the same bound with three times the α (K = 2: the runner-up holds the other votes)
    if bound == "drs":
        return bounds.drs_radius(sigma, *bounds.drs_bounds(counts[0], counts[1], n, 3 * alpha, tail))
    if bound == "cohen":
        return bounds.cohen_radius(sigma, bounds.cohen_bound(counts[0], n, 3 * alpha, tail))
    p_low, p_up, _ = bounds.two_sided_bound([n - counts[0], counts[0]], 1, 3 * alpha, tail)
    return bounds.two_sided_radius(sigma, p_low, p_up)


def binomial(violations: int, count: int, alpha: float) -> dict[str, Any]:
    p = binomtest(violations, count, alpha, alternative="greater").pvalue if count else 1.0
    return {"count": count, "violations": violations, "rate": round(violations / count, 4) if count else None,
            "allowed": alpha, "p_value": float(f"{p:.3g}"),
            "too_high": bool(rate_is_too_high(violations, count, alpha)) if count else False}


def drs_bundle() -> bytes:
    """The exact model as a DRS bundle "tiny-drs": each checkerboard half (1×4×2) has the
    linear classifier [mean(half) > 0.5]. With signed half distances d_h = √8·(mean_h − 0.5),
    the DRS-smoothed classifier flips where d_l + d_r = 0, first reached by a perturbation of
    norm (d_l + d_r)/√2 (docs/algorithms.md §8) = 4·(mean(x) − 0.5): the same exact radius and
    class as "tiny"."""
    import tempfile

    import torch

    from smoothcert.architectures import build_architecture
    from smoothcert.bundle import ModelSpec, SigmaRange, save_bundle, zip_bundle

    spec = ModelSpec(name="tiny-drs", kind="drs", input_shape=SHAPE, num_classes=2, labels=("low", "high"),
                     sigma=SigmaRange(0.25, 0.05, 1.0), architecture="linear")

    def half() -> torch.nn.Module:
        net = build_architecture("linear", spec.network_shape, 2)
        with torch.no_grad():
            net.fc.weight.zero_()
            net.fc.bias.zero_()
            net.fc.weight[1].fill_(40.0 / 8)  # logit gap 40·(mean(half) − 0.5), as tiny's
            net.fc.bias[1] = -20.0
        return net

    with tempfile.TemporaryDirectory() as folder:
        save_bundle(folder, spec, (half(), half()), fmt="state_dict")
        return zip_bundle(folder)


def lax_memory_env(args: argparse.Namespace) -> dict[str, str]:
    """This test's memory settings (see the module docstring), never a service default."""
    return {"SMOOTHCERT_MAX_ALPHA": repr(args.alpha), "SMOOTHCERT_MEMORY_ALPHAS": repr(args.alpha),
            "SMOOTHCERT_MEMORY_MIN_N": str(memory_min_n(args))}


def memory_min_n(args: argparse.Namespace) -> int:
    return args.memory_min_n if args.memory_min_n is not None else max(1, args.n // 2)


def soundness(report: Report, logs: Path, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.deadline
    specs = specs_for(args)
    report.figures["stack_env"] = env = lax_memory_env(args)
    with running_stack(logs, args.workers, env=env) as (stack, url):
        models = {m["name"]: m for m in (upload(url, tiny_bundle()[1]), upload(url, drs_bundle()))}
        report.figures["models"] = models
        print(f"stack up at {url}: {args.workers} worker(s); {len(specs)} certifications of "
              f"{', '.join(models)} from {args.clients} clients", flush=True)
        started = time.monotonic()
        outcomes = Driver(url, args.clients, deadline, "soundness").run(specs)
        wall = time.monotonic() - started
        report.figures["wall_seconds"] = round(wall, 1)
        report.figures["jobs_per_second"] = round(len(outcomes) / wall, 2) if wall > 0 else 0.0
        check_processes(report, stack)
        store = stack.store()
        try:
            check_jobs(report, store, outcomes, len(specs))
            check_seeds(report, outcomes)
            report.figures["memory"] = check_memory(report, store, outcomes)
            memory = {}
            for name, m in models.items():
                wanted = memory_namespace(m["digest"], "fp32", "cpu", args.alpha)
                found = store.memory_namespaces(m["digest"])
                report.check(found == [wanted], f"memory of {name}: one, at alpha {args.alpha}",
                             f"its namespaces {found}, expected [{wanted}]")
                memory[name] = read_log(store, wanted)
        finally:
            store.r.close()
    done = [o for o in outcomes if o.status == "succeeded"]
    report.figures["memory_outcomes"] = seen = memory_outcomes(done)
    report.check(seen.get("shrunk", 0) > 0 and seen.get("inside", 0) + seen.get("inside (answered, no commit)", 0) > 0,
                 "the memory was exercised", f"memory outcomes {seen}")
    soundness_by_cell(report, args, done)
    memory_soundness(report, args, done, memory)
    if time.monotonic() > deadline:
        report.check(False, "finished within the deadline", f"{args.deadline} s passed")


def soundness_by_cell(report: Report, args: argparse.Namespace, done: list[Outcome]) -> None:
    """The binomial test per (bound, memory) cell and overall, of the answers and of the
    unsound variants recomputed from the same fresh certificates."""
    def cell(o: Outcome) -> str:
        return f"{o.spec.tags['bound']}/memory {o.spec.tags['memory']}"

    variants = ("plug-in", "3α")
    reproduced, wrong = 0, []
    counts: dict[str, Counter] = {}
    for o in done:
        r = o.result
        flags = {"sound": violates(o.spec.x, r.get("prediction"), r.get("radius")), "fresh": fresh(o)}
        if fresh(o):
            estimates = estimate_counts(r)
            problem = "no estimation counts" if estimates is None else reproduce(r, estimates)
            if problem is not None:
                wrong.append(f"job {o.job_id}: {problem}")
            else:
                reproduced += 1
                # An abstention names no class (the variant's class is unknown): no variant violation.
                for v in variants if r.get("prediction") is not None else ():
                    flags[v] = violates(o.spec.x, r["prediction"], variant_radius(r, estimates, v))
        for key in (cell(o), "all"):
            c = counts.setdefault(key, Counter())
            c["count"] += 1
            c["abstentions"] += r.get("prediction") is None
            for name, flagged in flags.items():
                c[name] += bool(flagged)
    report.check(not wrong, "every fresh certificate's counts reproduce its bounds and radius",
                 f"{reproduced} reproduced exactly (n_a / n_a_halves, at its alpha, noise tail and noise sigma), "
                 f"{len(wrong)} not" + (f"; first: {wrong[0]}" if wrong else ""))
    table: dict[str, dict[str, Any]] = {}
    for key in sorted(counts, key=lambda k: (k == "all", k)):
        c = counts[key]
        sound = binomial(c["sound"], c["count"], args.alpha)
        # The variants re-derive fresh certificates: their rate is over the fresh ones.
        by_variant = {v: binomial(c[v], c["fresh"], args.alpha) for v in variants}
        table[key] = {**sound, "abstentions": c["abstentions"], "fresh": c["fresh"],
                      "memory_answers": c["count"] - c["fresh"], "unsound_variants": by_variant}
        report.check(not sound["too_high"], f"soundness, {key}",
                     f"{c['count']} certifications ({c['count'] - c['fresh']} answered by the memory), "
                     f"{c['abstentions']} abstentions, {c['sound']} violations (rate {sound['rate']}, "
                     f"allowed {args.alpha}, binomial p = {sound['p_value']})")
        plug = by_variant["plug-in"]
        report.check(plug["too_high"], f"the test flags the plug-in radius, {key}",
                     f"{plug['violations']}/{c['fresh']} fresh certificates violate (rate {plug['rate']}, "
                     f"p = {plug['p_value']}); the bound at 3α: {by_variant['3α']['violations']} "
                     f"(p = {by_variant['3α']['p_value']})")
    report.figures["cells"] = table
    groups: dict[str, list[Outcome]] = {}
    for o in done:
        groups.setdefault("/".join(o.spec.tags[k] for k in ("bound", "sigma", "sampling", "memory")), []).append(o)
    report.figures["by_bound_sigma_sampling_memory"] = {
        key: binomial(sum(violates(o.spec.x, o.result.get("prediction"), o.result.get("radius")) for o in group),
                      len(group), args.alpha)
        for key, group in sorted(groups.items())}
    report.figures["adaptive_n_chosen"] = dict(sorted(Counter(
        o.result.get("n") for o in done if o.spec.tags["sampling"] == "adaptive" and fresh(o)).items()))
    # How tight the certificates are: radius / exact distance of the fresh, non-abstained ones.
    ratios: dict[str, list[float]] = {}
    for o in done:
        if fresh(o) and o.result.get("prediction") is not None and o.result.get("radius"):
            ratios.setdefault(o.spec.tags["bound"], []).append(o.result["radius"] / exact(o.spec.x)[1])
    report.figures["median_radius_over_exact_distance"] = {
        bound: round(float(np.median(values)), 3) for bound, values in sorted(ratios.items())}


def memory_soundness(report: Report, args: argparse.Namespace, done: list[Outcome],
                     memory: dict[str, MemoryLog]) -> None:
    """Answers from committed balls are unsound only where the ball that answered and its root
    are; the roots (one sampling each) are unsound no more often than α allows."""
    figures = {}
    for name, log in memory.items():
        unsound = {i for i, e in enumerate(log.entries) if e.prediction != -1
                   and violates(log.points[i], e.prediction, e.radius)}
        roots = [i for i, e in enumerate(log.entries) if e.outcome in ROOT_OUTCOMES]
        unsound_roots = [i for i in roots if i in unsound]
        answers = [o for o in done
                   if o.spec.model == name and (o.result.get("memory") or {}).get("outcome") == "inside"]
        bad = [o for o in answers if violates(o.spec.x, o.result.get("prediction"), o.result.get("radius"))]
        unexplained = []
        for o in bad:
            j = int(o.result["memory"]["conflict"])  # the ball that answered (or decided "inside")
            if j not in unsound or log.root_of(j) not in unsound:
                unexplained.append(o.job_id)
        balls = binomial(len(unsound_roots), len(roots), args.alpha)
        figures[name] = {"entries": len(log.entries), "unsound_entries": len(unsound), "roots": len(roots),
                         "unsound_roots": len(unsound_roots), "inside_answers": len(answers),
                         "inside_answers_above_exact": len(bad), "roots_binomial": balls}
        report.check(not unexplained, f"memory of {name}: answers are sound unless their ball and its root are",
                     f"{len(answers)} inside answers, {len(bad)} above the exact distance or of the wrong "
                     f"class, {len(unexplained)} of them from a sound ball or a ball of a sound root"
                     + (f" (first: job {unexplained[0]})" if unexplained else ""))
        report.check(len(roots) > 0 and not balls["too_high"], f"memory of {name}: committed roots "
                     "are consistent with α", f"{len(unsound_roots)}/{len(roots)} roots (new or shrunk entries) "
                     f"unsound (rate {balls['rate']}, p = {balls['p_value']}); all entries: "
                     f"{len(unsound)}/{len(log.entries)}")
    report.figures["memory_soundness"] = figures


def parser() -> argparse.ArgumentParser:
    p = scenario_parser(__doc__, deadline=1200.0)
    p.add_argument("--jobs", type=int, default=6000, help="certifications in all (1/6 per cell)")
    p.add_argument("--clients", type=int, default=16, help="concurrent SDK clients")
    p.add_argument("--workers", type=int, default=2, help="Celery workers (processes)")
    p.add_argument("--alpha", type=float, default=0.1, help="α of every certification")
    p.add_argument("--n0", type=int, default=20, help="selection samples")
    p.add_argument("--n", type=int, default=100, help="estimation samples (the maximum, adaptive)")
    p.add_argument("--memory-min-n", type=int, default=None,
                   help="the stack's SMOOTHCERT_MEMORY_MIN_N (default: half of --n)")
    p.add_argument("--sigma", type=float, default=0.25, help="the fixed σ")
    p.add_argument("--adaptive", type=float, default=0.3, help="fraction of jobs with adaptive sampling")
    p.add_argument("--distances", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4],
                   help="exact distances of the fresh inputs (either side)")
    p.add_argument("--revisit", type=float, default=0.3, help="fraction of inputs near an earlier one")
    p.add_argument("--spread", type=float, default=0.05, help="largest distance of a neighbour from its input")
    return p


def run(args: argparse.Namespace) -> Report:
    return run_scenario("soundness", args, lambda report, logs: soundness(report, logs, args))


if __name__ == "__main__":
    sys.exit(main(parser(), run))
