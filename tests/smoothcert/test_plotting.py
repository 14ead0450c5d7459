"""Certified-accuracy plots of run directories (made from hand-made rows: no model needed)."""

from __future__ import annotations

import pytest
from PIL import Image

from smoothcert.evaluation import EvaluationRow, EvaluationRun, write_run
from smoothcert.plotting import default_label, load_run, plot_runs, step_curve
from smoothcert.results import Certificate

PARAMS = {"model": {"name": "toy"}, "data": {"source": "toy.npz", "split": "test"}, "method": "fixed",
          "sigma": 0.5, "bound": "cohen", "memory": False}


def make_run(path, radii, params=PARAMS):
    rows = tuple(
        EvaluationRow(i, 1, Certificate(prediction=None if r is None else 1, radius=r or 0.0, sigma=0.5,
                                        bound="cohen", n0=10, n=100, alpha=0.01, batch_size=10, seed=i))
        for i, r in enumerate(radii)
    )
    write_run(path, EvaluationRun(rows, params))
    return path


def test_step_curve_drops_by_one_row_at_each_radius():
    assert step_curve([0.5, 0.2], 4, 1.0) == ([0.0, 0.2, 0.5, 1.0], [0.5, 0.25, 0.0, 0.0])
    assert step_curve([], 3, 1.0) == ([0.0, 1.0], [0.0, 0.0])


def test_plot_overlays_two_runs(tmp_path):
    a = make_run(tmp_path / "sigma050", [0.1, 0.4, 0.9, None])
    search = PARAMS | {"method": "ddrs", "sigma": None, "memory": True}
    b = make_run(tmp_path / "ddrs", [0.3, 1.2, 1.6], search)
    assert (a / "curve.png").is_file()  # write_run draws the run's own curve
    out = plot_runs([a, b], tmp_path / "plots" / "both.png")
    png = out.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    with Image.open(out) as im:
        assert im.size == (768, 528)
    assert default_label(a, load_run(a)[0]) == "sigma050: σ=0.5, cohen"
    assert default_label(b, load_run(b)[0]) == "ddrs: ddrs σ search, memory"
    # Wider x range when a run certifies further; the single-run PNG differs from the overlay.
    assert png != (a / "curve.png").read_bytes()


def test_labels_and_a_run_without_results_tsv(tmp_path):
    a = make_run(tmp_path / "a", [0.2, 0.6])
    (a / "results.tsv").unlink()  # the grid from summary.json is drawn instead of the steps
    assert load_run(a)[1] is None
    plot_runs([a], tmp_path / "a.png", labels=["mine"], title="t")
    assert (tmp_path / "a.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="labels"):
        plot_runs([a], tmp_path / "x.png", labels=["1", "2"])
    with pytest.raises(ValueError):
        plot_runs([], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
