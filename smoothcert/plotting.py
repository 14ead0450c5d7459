"""Certified accuracy against radius, for one evaluation run or several overlaid.

Each run is read from its directory (`smoothcert.evaluation`): `summary.json` for its
parameters and grid, and `results.tsv`, when present, for the step curve (certified
accuracy at r = #{correct rows with radius ≥ r} / count, at every r). The file's radii are
rounded down at 4 decimals, so that curve never lies above the exact one. matplotlib is
imported inside the functions and drives the Agg canvas directly, never pyplot: no global
backend is switched, no display is needed, and importing this module costs nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smoothcert import tsv


def step_curve(correct_radii: Sequence[float], count: int, right: float) -> tuple[list[float], list[float]]:
    """(x, y) for a post-step plot of certified accuracy over [0, right]: y drops by 1/count
    at the radius of each correct row. `correct_radii` are the radii of the correct rows."""
    radii = sorted(correct_radii)
    m = len(radii)
    x = [0.0, *radii, max(right, radii[-1] if radii else 0.0)]
    y = [m / count, *((m - j) / count for j in range(1, m + 1)), 0.0]
    return x, y


def load_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[float] | None]:
    """A run's summary and the radii of its correct rows (None without results.tsv)."""
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    results = run / "results.tsv"
    if not results.is_file():
        return summary, None
    return summary, [float(r["radius"]) for r in tsv.read(results) if r["correct"] == "1"]


def default_label(run_dir: str | os.PathLike, summary: dict[str, Any]) -> str:
    """Run name and method: "name: σ=0.25, cohen", "name: ddrs σ search, memory" or
    "name: σ selector, cohen"."""
    p = summary.get("parameters", {})
    name = Path(run_dir).resolve().name
    if p.get("method", "fixed") == "fixed":
        sigma = p.get("sigma")
        method = f"σ={sigma:g}, {p.get('bound', '?')}" if sigma is not None else p.get("bound", "?")
    elif p["method"] == "selector":
        method = f"σ selector, {p.get('bound', '?')}"
    else:
        method = f"{p['method']} σ search" + (", memory" if p.get("memory") else "")
    return f"{name}: {method}"


def plot_runs(
    run_dirs: Sequence[str | os.PathLike], out_png: str | os.PathLike,
    labels: Sequence[str] | None = None, title: str | None = None,
) -> Path:
    """Overlay the certified-accuracy curves of `run_dirs` in one PNG; returns its path.

    Lines are the exact step curves (from results.tsv), markers the summary's grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(d) for d in run_dirs]
    right = max(max((g["radius"] for g in s["certified_accuracy"]), default=1.0) for s, _ in runs)

    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (summary, radii) in enumerate(runs):
        color = f"C{i % 10}"
        label = labels[i] if labels is not None else default_label(run_dirs[i], summary)
        grid = summary["certified_accuracy"]
        gx, gy = [g["radius"] for g in grid], [g["accuracy"] for g in grid]
        if radii is not None:
            x, y = step_curve(radii, summary["count"], right)
            ax.step(x, y, where="post", color=color, label=label)
            ax.plot(gx, gy, "o", color=color, markersize=3.5, clip_on=False)
        else:
            ax.plot(gx, gy, "o-", color=color, markersize=3.5, clip_on=False, label=label)
    ax.set_xlim(0, right)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(r"radius $r$ ($\ell_2$, pixel units in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_title(title or _title([s for s, _ in runs]))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _title(summaries: Sequence[dict[str, Any]]) -> str:
    # Name the model and data only when every run shares them.
    def shared(key: str, field: str) -> str | None:
        values = {str(s.get("parameters", {}).get(key, {}).get(field)) for s in summaries}
        return values.pop() if len(values) == 1 and "None" not in values else None

    model, source, split = shared("model", "name"), shared("data", "source"), shared("data", "split")
    where = " on ".join(v for v in (model, f"{source} ({split})" if source else None) if v)
    return "Certified accuracy" + (f": {where}" if where else "")
