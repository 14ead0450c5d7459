"""The σ selector's tables in EVALUATION.md, from one folder of runs (scripts/evaluation_mnist.sh,
scripts/evaluation_digits_selector.sh): each fixed σ, their envelope (the best fixed σ at each
radius, chosen after the fact), the oracle (the best fixed σ for each image, chosen after the
fact: an upper bound for any selector over the same experts, before R_σ and the α split), DDRS
with the memory, and the σ selector. Prints Markdown and writes the overlaid curves to
docs/<name>.png.

Read from each run's results.tsv, so every figure is recomputed from the certificates: the
certified accuracy at r counts the correct certificates of radius ≥ r; the ACR is the mean of
the certified radius over all examples (0 when wrong or abstained). Figures are printed
rounded down (smoothcert.rounding), never up.

    .venv/bin/python scripts/evaluation_selector_report.py runs/evaluation-mnist docs/evaluation-mnist.png
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smoothcert.plotting import plot_runs  # noqa: E402
from smoothcert.rounding import floor_text  # noqa: E402

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def rows(run: Path) -> list[dict]:
    with open(run / "results.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def accuracy(table: list[dict], r: float) -> float:
    return sum(row["correct"] == "1" and float(row["radius"]) >= r for row in table) / len(table)


def acr(table: list[dict]) -> float:
    return sum(float(row["radius"]) for row in table if row["correct"] == "1") / len(table)


def oracle(tables: list[list[dict]]) -> list[dict]:
    """Per image (matched by idx), the fixed-σ row with the largest correct radius."""
    by_idx = [{row["idx"]: row for row in t} for t in tables]
    best = []
    for idx in by_idx[0]:
        rows_ = [t[idx] for t in by_idx]
        best.append(max(rows_, key=lambda row: float(row["radius"]) if row["correct"] == "1" else -1.0))
    return best


def diagnosis(sel: list[dict], by_sigma: dict[float, list[dict]]) -> str:
    """Where a selector's certificates fall short of its chosen level's fixed-σ run on the same
    image: a level chosen where that run was wrong or abstained (misrouted; "rescuable" when
    another level's run was right), and a radius under 90% of that run's (the stage-2 α/2
    costs about 1%; the rest is R_σ capping the radius)."""
    idx = {s: {row["idx"]: row for row in t} for s, t in by_sigma.items()}
    misrouted = rescuable = capped = chosen = 0
    for row in sel:
        sigma = float(row["sigma"])
        if row["predict"] == "-1" or sigma not in idx:
            continue
        chosen += 1
        ref = idx[sigma][row["idx"]]
        if ref["correct"] != "1":
            misrouted += 1
            rescuable += any(t[row["idx"]]["correct"] == "1" for t in idx.values())
        elif row["correct"] == "1" and float(row["radius"]) < 0.9 * float(ref["radius"]):
            capped += 1
    return (f"of {chosen} answered: {misrouted} chose a level whose fixed-σ run was wrong or abstained "
            f"({rescuable} of them right at another level); {capped} certified under 90% of that level's radius")


def main(folder: str, figure: str) -> None:
    runs = {p.parent.name: p.parent for p in Path(folder).glob("*/summary.json")}  # finished runs only
    tables = {name: rows(run) for name, run in runs.items()}
    summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    fixed = sorted(name for name in runs if name.startswith("cohen-"))
    selectors = sorted(name for name in runs if name.startswith("selector"))
    order = [*fixed, "envelope", *(n for n in ("ddrs-memory",) if n in runs), *selectors]
    counts = {len(t) for t in tables.values()}
    envelope = {r: max(accuracy(tables[f], r) for f in fixed) for r in RADII} if fixed else {}
    print(f"{counts.pop() if len(counts) == 1 else counts} test images per run\n")
    print("| run | " + " | ".join(f"r={r:g}" for r in RADII)
          + " | ACR | abstained | s/image | samples/image | σ chosen |")
    print("|---|" + "---|" * (len(RADII) + 5))
    for name in order:
        if name == "envelope":
            print("| best fixed σ at each radius (envelope) | "
                  + " | ".join(floor_text(envelope[r], 3) for r in RADII) + " | "
                  + f"{floor_text(max(acr(tables[f]) for f in fixed), 3)} (best single σ) | | | | |")
            best = oracle([tables[f] for f in fixed])
            levels = Counter(float(row["sigma"]) for row in best)
            print("| best fixed σ for each image (oracle) | "
                  + " | ".join(floor_text(accuracy(best, r), 3) for r in RADII)
                  + f" | {floor_text(acr(best), 3)} | | | | "
                  + ", ".join(f"{k:g}: {v}" for k, v in sorted(levels.items())) + " |")
            continue
        t, s = tables[name], summaries[name]
        sigmas = Counter(float(row["sigma"]) for row in t if row["predict"] != "-1")
        chosen = ", ".join(f"{k:g}: {v}" for k, v in sorted(sigmas.items())) if name != "ddrs-memory" else \
            f"mean {s['sigma']['mean']:.3f} ({s['sigma']['min']:.3f}–{s['sigma']['max']:.3f})"
        print(f"| {name} | " + " | ".join(floor_text(accuracy(t, r), 3) for r in RADII)
              + f" | {floor_text(acr(t), 3)} | {s['abstention_rate']:.3f} | {s['seconds']['mean']:.2f}"
              + f" | {s['samples']['mean']:,.0f} | {chosen} |")
    for name in selectors if fixed else ():
        sel = tables[name]
        above = [r for r in RADII if accuracy(sel, r) > envelope[r]]
        print(f"\n{name} above the envelope at r = {', '.join(f'{r:g}' for r in above) or 'none'}; "
              f"ACR {acr(sel):.4f} against the best single σ's {max(acr(tables[f]) for f in fixed):.4f}")
        print(diagnosis(sel, {float(summaries[f]["parameters"]["sigma"]): tables[f] for f in fixed}))
        if "ddrs-memory" in runs:
            ddrs = tables["ddrs-memory"]
            gains = [f"r={r:g}: {100 * (accuracy(sel, r) / accuracy(ddrs, r) - 1):+.1f}%"
                     for r in (0.5, 0.75, 1.0) if accuracy(ddrs, r) > 0]
            print("relative gain over DDRS with the memory: " + ", ".join(gains))
    out = Path(figure)
    plot_runs([runs[n] for n in order if n in runs], out)
    print(f"\n(curves: {out})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
