"""The σ selector's tables in EVALUATION.md, from one folder of runs (scripts/evaluation_mnist.sh,
scripts/evaluation_digits_selector.sh): each fixed σ, their envelope (the best fixed σ at each
radius, chosen after the fact), DDRS with the memory, and the σ selector. Prints Markdown and
writes the overlaid curves to docs/<name>.png.

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

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def rows(run: Path) -> list[dict]:
    with open(run / "results.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def accuracy(table: list[dict], r: float) -> float:
    return sum(row["correct"] == "1" and float(row["radius"]) >= r for row in table) / len(table)


def acr(table: list[dict]) -> float:
    return sum(float(row["radius"]) for row in table if row["correct"] == "1") / len(table)


def main(folder: str, figure: str) -> None:
    runs = {p.parent.name: p.parent for p in Path(folder).glob("*/summary.json")}  # finished runs only
    tables = {name: rows(run) for name, run in runs.items()}
    summaries = {name: json.loads((run / "summary.json").read_text()) for name, run in runs.items()}
    fixed = sorted(name for name in runs if name.startswith("cohen-"))
    order = [*fixed, "envelope", *(n for n in ("ddrs-memory", "selector") if n in runs)]
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
            continue
        t, s = tables[name], summaries[name]
        sigmas = Counter(float(row["sigma"]) for row in t if row["predict"] != "-1")
        chosen = ", ".join(f"{k:g}: {v}" for k, v in sorted(sigmas.items())) if name != "ddrs-memory" else \
            f"mean {s['sigma']['mean']:.3f} ({s['sigma']['min']:.3f}–{s['sigma']['max']:.3f})"
        print(f"| {name} | " + " | ".join(floor_text(accuracy(t, r), 3) for r in RADII)
              + f" | {floor_text(acr(t), 3)} | {s['abstention_rate']:.3f} | {s['seconds']['mean']:.2f}"
              + f" | {s['samples']['mean']:,.0f} | {chosen} |")
    if "selector" in runs and fixed:
        sel = tables["selector"]
        above = [r for r in RADII if accuracy(sel, r) > envelope[r]]
        print(f"\nselector above the envelope at r = {', '.join(f'{r:g}' for r in above) or 'none'}; "
              f"ACR {acr(sel):.4f} against the best single σ's {max(acr(tables[f]) for f in fixed):.4f}")
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
