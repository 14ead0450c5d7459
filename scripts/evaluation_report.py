"""The tables of EVALUATION.md, from the summary.json of each run in a folder (printed as
Markdown), and their overlaid curves (docs/evaluation.png). Certified accuracies and the ACR
are printed rounded down (smoothcert.rounding.floor_text), never up: a printed figure never
claims more than the run certified."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smoothcert.plotting import plot_runs  # noqa: E402
from smoothcert.rounding import floor_text  # noqa: E402

RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


def accuracy_at(summary: dict, radius: float) -> float:
    for point in summary["certified_accuracy"]:
        if abs(point["radius"] - radius) < 1e-9:
            return point["accuracy"]
    return 0.0  # beyond the grid: nothing certified that far


def main(folder: str) -> None:
    runs = sorted(p.parent for p in Path(folder).glob("*/summary.json"))
    print("| run | certification | n | " + " | ".join(f"r={r:g}" for r in RADII)
          + " | ACR | abstained | mean σ | s/example | search samples | memory changed |")
    print("|---|---|---|" + "---|" * (len(RADII) + 6))
    for run in runs:
        s = json.loads((run / "summary.json").read_text())
        p = s["parameters"]
        method = p["method"] if p["method"] != "fixed" else f"σ={p['sigma']:g}"
        search = s["samples"]["search_mean"]
        memory = s["memory"]["changed"] if s["memory"] else "–"
        print(f"| {run.name} | {method}, {p['bound']} | {p['n']:,} | "
              + " | ".join(floor_text(accuracy_at(s, r), 3) for r in RADII)
              + f" | {floor_text(s['acr'], 3)} | {s['abstention_rate']:.3f} | {s['sigma']['mean']:.3f}"
              + f" | {s['seconds']['mean']:.2f} | {'–' if search is None else f'{search:,.0f}'} | {memory} |")
    out = ROOT / "docs" / "evaluation.png"
    out.parent.mkdir(exist_ok=True)
    plot_runs(runs, out)
    print(f"\n(curves: {out.relative_to(ROOT)}; {runs and json.loads((runs[0] / 'summary.json').read_text())['count']} "
          "test examples per run)")


if __name__ == "__main__":
    main(sys.argv[1])
