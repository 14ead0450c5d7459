"""Evaluation: the §9 metrics on hand-made rows, and runs of the demo model end to end."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothcert.bounds import InvalidParameters
from smoothcert.data import Dataset, load_data
from smoothcert.evaluation import EvaluationRow, EvaluationRun, evaluate, radius_grid, summarize, write_run
from smoothcert.plotting import step_curve
from smoothcert.results import Certificate
from smoothcert.sampling import derive_seed
from smoothcert.search import SigmaSearch
from smoothcert.tsv import read

FAST = dict(n0=50, n=200, alpha=0.01, batch_size=250)  # ~0.1 s per digit on a shared CPU core


def row(label: int, prediction: int | None, radius: float, idx: int = 0, **cert) -> EvaluationRow:
    return EvaluationRow(idx, label, Certificate(
        prediction=prediction, radius=radius, sigma=0.25, bound="cohen", n0=100, n=1000, alpha=0.001,
        batch_size=100, seed=idx, samples=1100, seconds=0.5, **cert))


HAND_MADE = [
    row(1, 1, 0.6),    # correct
    row(2, 2, 0.25),   # correct, exactly at a grid radius: counts there (radius ≥ r)
    row(3, 3, 0.0),    # correct with radius 0 (pA_lower = 0.5): counts at r = 0 only
    row(4, 7, 0.9),    # wrong: counts nowhere, 0 in the ACR however large its radius
    row(5, None, 0.0),  # abstained
]


def test_summarize_hand_made_rows_as_algorithms_9_defines():
    s = summarize(HAND_MADE)
    assert s["count"] == 5
    curve = {g["radius"]: (g["accuracy"], g["count"]) for g in s["certified_accuracy"]}
    assert curve == {0.0: (0.6, 3), 0.25: (0.4, 2), 0.5: (0.2, 1), 0.75: (0.0, 0), 1.0: (0.0, 0)}
    assert s["clean_accuracy"] == curve[0.0][0] == 0.6
    assert s["acr"] == pytest.approx((0.6 + 0.25 + 0.0) / 5)
    assert s["abstention_rate"] == 0.2
    assert s["samples"] == {"mean": 1100, "search_mean": None, "certification_mean": 1100, "estimation_mean": 1000}
    assert s["seconds"] == {"mean": 0.5, "total": 2.5}
    assert s["memory"] is None and s["schema"] == "smoothcert.evaluation/1"
    custom = summarize(HAND_MADE, [0.5, 0.1, 0.5])
    assert [(g["radius"], g["accuracy"]) for g in custom["certified_accuracy"]] == [(0.1, 0.4), (0.5, 0.2)]
    with pytest.raises(ValueError, match="≥ 0"):
        summarize(HAND_MADE, [-0.25])
    with pytest.raises(ValueError):
        summarize([])


def test_default_grid_reaches_one_then_the_largest_certified_radius_then_a_cap():
    assert radius_grid(HAND_MADE) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert radius_grid([row(1, 1, 1.3)])[-1] == 1.5
    assert radius_grid([row(1, 1, 1.25)])[-1] == 1.25
    assert radius_grid([row(1, 2, 3.0)])[-1] == 1.0  # a wrong row's radius certifies nothing
    assert radius_grid([row(1, 1, 50.0)])[-1] == 10.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0, 1, 2, None]),
                          st.floats(0, 3, allow_nan=False)), min_size=1, max_size=30))
def test_acr_is_the_area_under_the_certified_accuracy_curve(spec):
    rows = [row(label, pred, 0.0 if pred is None else r) for label, pred, r in spec]
    s = summarize(rows)
    accuracies = [g["accuracy"] for g in s["certified_accuracy"]]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[0] == s["clean_accuracy"]
    x, y = step_curve([r.certificate.radius for r in rows if r.correct], len(rows), 0.0)
    area = sum((x[i + 1] - x[i]) * y[i] for i in range(len(x) - 1))
    assert area == pytest.approx(s["acr"], abs=1e-12)


@pytest.fixture(scope="module")
def certifier():
    from smoothcert.bundle import load_bundle
    from smoothcert.certifier import Certifier

    return Certifier(load_bundle("models/digits"), device="cpu")


@pytest.fixture(scope="module")
def digits():
    return load_data("sklearn-digits", "test")


class Notes:
    """A Progress that keeps the notes."""

    def __init__(self):
        self.notes: list[str] = []

    def stage(self, stage: str, done: int, total: int) -> None:
        pass

    def advance(self, note: str = "") -> None:
        self.notes.append(note)


def below_by_less_than(printed: str, value: float, unit: str) -> bool:
    """printed ≤ value < printed + unit, exactly: `value` rounded down, not to nearest."""
    return Decimal(printed) <= Decimal(value) < Decimal(printed) + Decimal(unit)


def test_run_directory_of_the_demo_model(certifier, digits, tmp_path):
    notes = Notes()
    run = evaluate(certifier, digits, every=45, seed=3, progress=notes, **FAST)
    assert [r.idx for r in run.rows] == list(range(0, 450, 45))
    summary = write_run(tmp_path / "a", run)
    rows = read(tmp_path / "a" / "results.tsv")
    assert list(rows[0]) == ["idx", "label", "predict", "radius", "correct", "time", "sigma", "pA_lower", "seed"]
    assert [int(r["idx"]) for r in rows] == [r.idx for r in run.rows]
    # Radii and lower bounds are printed rounded down, σ exactly, the progress notes' radii too.
    noted = [re.fullmatch(r"#\d+: .* radius (\S+)", note).group(1) for note in notes.notes]
    for printed, note, r in zip(rows, noted, run.rows, strict=True):
        c = r.certificate
        assert below_by_less_than(printed["radius"], c.radius, "1e-4") and below_by_less_than(note, c.radius, "1e-3")
        assert below_by_less_than(printed["pA_lower"], c.p_a_lower, "1e-6")
        assert float(printed["sigma"]) == c.sigma
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == summary
    assert set(summary) == {"schema", "parameters", "count", "clean_accuracy", "abstention_rate", "acr",
                            "certified_accuracy", "sigma", "seconds", "samples", "memory"}
    p = summary["parameters"]
    assert p["model"]["digest"] == certifier.bundle.digest and p["data"] == {
        "source": "sklearn-digits", "split": "test", "size": 450}
    assert (p["method"], p["sigma"], p["bound"], p["n"], p["alpha"], p["seed"], p["every"]) == (
        "fixed", 0.25, "cohen", 200, 0.01, 3, 45)
    assert summary["count"] == 10 and summary["clean_accuracy"] >= 0.8  # 99% clean accuracy in the README
    assert summary["samples"]["mean"] == 250 and summary["memory"] is None
    png = (tmp_path / "a" / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # Same seed → same rows but for the time; an example's seed depends on its index only.
    write_run(tmp_path / "b", evaluate(certifier, digits, every=45, seed=3, **FAST))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(read(tmp_path / "b" / "results.tsv")) == strip(rows)
    sparse = evaluate(certifier, digits, every=90, limit=2, seed=3, **FAST)
    assert [(r.idx, r.certificate.radius) for r in sparse.rows] == [
        (r.idx, r.certificate.radius) for r in run.rows if r.idx in (0, 90)]
    # start picks the examples start, start + every, ...: disjoint from start 0, same seeds per index.
    shifted = evaluate(certifier, digits, every=45, start=2, limit=2, seed=3, **FAST)
    assert [r.idx for r in shifted.rows] == [2, 47] and shifted.parameters["start"] == 2
    assert shifted.rows[0].certificate.seed == derive_seed(3, 2)


def test_search_with_memory_reports_changes_and_search_samples(certifier, digits, tmp_path):
    # The digits are far apart; a near-copy of example 0 lands in its ball and the memory answers it.
    x = np.concatenate([digits.x[:3], digits.x[:1] + 0.01 * np.sign(digits.x[:1] - 0.5)])
    data = Dataset(x.clip(0, 1).astype(np.float32), np.r_[digits.y[:3], digits.y[:1]], digits.classes, "dup", "test")
    search = SigmaSearch("ddrs", steps=2, samples=16)
    run = evaluate(certifier, data, sigma_search=search, memory=True, seed=0, **FAST)
    summary = write_run(tmp_path, run)
    m = summary["memory"]
    assert m == {"entries": 3, "new": 3, "inside": 1, "shrunk": 0, "changed": 1}
    assert [r["memory"] for r in read(tmp_path / "results.tsv")] == ["new", "new", "new", "inside"]
    s = summary["samples"]
    assert s["search_mean"] == pytest.approx(3 * 2 * 16 / 4)  # the memory's answer sampled nothing
    assert s["certification_mean"] == pytest.approx(3 * 250 / 4)
    assert s["mean"] == pytest.approx(s["search_mean"] + s["certification_mean"])
    p = summary["parameters"]
    assert p["method"] == "ddrs" and p["sigma"] is None and p["memory"] is True
    assert p["sigma_search"] == {"method": "ddrs", "steps": 2, "lr": 0.01, "samples": 16, "init": None}


def test_adaptive_sampling_run_records_n_per_row(certifier, digits, tmp_path):
    kw = FAST | {"n": 10_000, "batch_size": 5000}
    run = evaluate(certifier, digits, every=150, seed=3, sampling="adaptive", **kw)
    fixed = evaluate(certifier, digits, every=150, seed=3, **kw)
    summary = write_run(tmp_path, run)
    certs = [r.certificate for r in run.rows]
    assert all(c.sampling == "adaptive" and c.n_max == 10_000 and c.n <= 10_000 for c in certs)
    assert [c.prediction for c in certs] == [r.certificate.prediction for r in fixed.rows]
    p, s = summary["parameters"], summary["samples"]
    assert (p["sampling"], p["tolerance"], p["n"]) == ("adaptive", 0.05, 10_000)
    assert s["estimation_mean"] == pytest.approx(sum(c.n for c in certs) / 3) and s["estimation_mean"] < 10_000
    assert s["mean"] == pytest.approx(50 + s["estimation_mean"])
    assert [int(r["n"]) for r in read(tmp_path / "results.tsv")] == [c.n for c in certs]
    assert fixed.summary()["parameters"]["sampling"] == "fixed" and fixed.summary()["parameters"]["tolerance"] is None
    with pytest.raises(InvalidParameters, match="tolerance"):
        evaluate(certifier, digits, limit=1, tolerance=0.1, **FAST)


def test_sequential_sampling_run_records_target_and_samples(certifier, digits, tmp_path):
    kw = FAST | {"n": 10_000, "batch_size": 5000}
    run = evaluate(certifier, digits, every=150, seed=3, sampling="sequential", target_radius=0.25, **kw)
    summary = write_run(tmp_path, run)
    certs = [r.certificate for r in run.rows]
    assert all(c.sampling == "sequential" and c.target_radius == 0.25 and c.n <= 10_000 for c in certs)
    p, s = summary["parameters"], summary["samples"]
    assert (p["sampling"], p["target_radius"], p["tolerance"]) == ("sequential", 0.25, None)
    assert s["mean"] == pytest.approx(sum(c.samples for c in certs) / 3) and s["mean"] < 10_050
    with pytest.raises(InvalidParameters, match="target_radius"):
        evaluate(certifier, digits, limit=1, target_radius=0.1, **FAST)


def test_refusals(certifier, digits):
    for bad in ({"every": 0}, {"limit": 0}, {"seed": None}, {"start": -1}, {"start": True}):
        with pytest.raises(InvalidParameters):
            evaluate(certifier, digits, **FAST, **({"seed": 0} | bad))
    with pytest.raises(InvalidParameters, match="n ≥"):
        evaluate(certifier, digits, n0=10, n=5, alpha=0.001, limit=1)


def parser() -> argparse.ArgumentParser:
    from smoothcert.commands.evaluate import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    return p


def run_cli(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    return args.run(args)


def test_evaluate_and_plot_commands(tmp_path, capsys):
    common = ["--bundle", "models/digits", "--data", "sklearn-digits", "--limit", "3", "--n0", "50",
              "--n", "200", "--alpha", "0.01", "--batch", "250"]
    assert run_cli("evaluate", *common, "--out", str(tmp_path / "fixed")) == 0
    err = capsys.readouterr().err
    assert "evaluate 3/3" in err and "clean accuracy" in err  # progress and result on stderr
    summary = json.loads((tmp_path / "fixed" / "summary.json").read_text())
    acr, clean = re.search(r"clean accuracy (\S+), ACR (\S+),", err).group(2, 1)
    assert below_by_less_than(acr, summary["acr"], "1e-3")  # rounded down, never up
    assert below_by_less_than(clean, summary["clean_accuracy"], "1e-3")
    assert run_cli("evaluate", *common, "--sigma-search", "insta", "--search-steps", "1", "--search-samples", "16",
                   "--radii", "0", "0.4", "--out", str(tmp_path / "insta")) == 0
    summary = json.loads((tmp_path / "insta" / "summary.json").read_text())
    assert summary["parameters"]["memory"] is True  # on by default with a search
    assert [g["radius"] for g in summary["certified_accuracy"]] == [0.0, 0.4]
    with pytest.raises(InvalidParameters, match="--overwrite"):
        run_cli("evaluate", *common, "--out", str(tmp_path / "fixed"))
    with pytest.raises(InvalidParameters, match="n ≥"):  # refused up front: no half-made run left
        run_cli("evaluate", *common, "--n", "5", "--alpha", "0.001", "--out", str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "results.tsv").exists()
    out = tmp_path / "both.png"
    assert run_cli("evaluate", *common, "--sampling", "adaptive", "--tolerance", "0.1",
                   "--out", str(tmp_path / "adaptive")) == 0
    assert "samples per example" in capsys.readouterr().err
    summary = json.loads((tmp_path / "adaptive" / "summary.json").read_text())
    assert (summary["parameters"]["sampling"], summary["parameters"]["tolerance"]) == ("adaptive", 0.1)
    with pytest.raises(InvalidParameters, match="tolerance"):
        run_cli("evaluate", *common, "--tolerance", "0.1", "--out", str(tmp_path / "bad"))
    assert run_cli("plot", str(tmp_path / "fixed"), str(tmp_path / "insta"), "--out", str(out)) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(InvalidParameters, match="labels"):
        run_cli("plot", str(tmp_path / "fixed"), "--labels", "a", "b", "--out", str(out))


def test_evaluation_modules_load_neither_torch_nor_matplotlib():
    code = ("import sys, smoothcert.evaluation, smoothcert.plotting, smoothcert.tsv, smoothcert.commands.evaluate; "
            "assert not {'torch', 'matplotlib'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)[:3]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_is_a_plain_record():
    run = EvaluationRun(tuple(HAND_MADE), {"bound": "cohen", "memory": False})
    assert run.summary()["parameters"] == {"bound": "cohen", "memory": False}
