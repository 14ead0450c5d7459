"""`smoothcert certify-local` end to end on a bundle with an exact answer."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from decimal import Decimal

import numpy as np
import pytest
import torch

from smoothcert.architectures import build_architecture
from smoothcert.bundle import ModelSpec, save_bundle
from smoothcert.cli import main

SPEC = {"name": "plane", "kind": "standard", "input_shape": [1, 4, 4], "num_classes": 2,
        "sigma": {"default": 0.25, "min": 0.05, "max": 1.0}, "architecture": "linear"}


def linear_bundle(path, kind="standard"):
    """logit_1 − logit_0 = 40·(mean pixel − 0.5): class 1 for bright images."""
    spec = ModelSpec.from_json(SPEC | {"kind": kind})
    shape = spec.network_shape

    def net():
        m = build_architecture("linear", shape, 2)
        with torch.no_grad():
            m.fc.weight.zero_()
            m.fc.weight[1].fill_(40.0 / np.prod(shape))
            m.fc.bias.copy_(torch.tensor([0.0, -20.0]))
        return m

    save_bundle(path, spec, net() if kind == "standard" else (net(), net()), fmt="state_dict")
    return path


def read_tsv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


@pytest.fixture()
def inputs(tmp_path):
    x = np.stack([np.full((1, 4, 4), v, np.float32) for v in (0.9, 0.1, 0.5, 0.88)])
    np.savez(tmp_path / "set.npz", x=x, y=np.array([1, 0, 1, 1]))
    np.save(tmp_path / "one.npy", np.full((4, 4), 0.8, np.float32))
    return tmp_path


def test_certify_local_writes_cohen_tsv(tmp_path, inputs, capsys):
    bundle = linear_bundle(tmp_path / "bundle")
    out = tmp_path / "out.tsv"
    code = main(["certify-local", "--bundle", str(bundle), str(inputs / "set.npz"), str(inputs / "one.npy"),
                 "--n", "2000", "--n0", "50", "--alpha", "0.01", "--seed", "4", "--out", str(out)])
    assert code == 0
    rows = read_tsv(out.read_text())
    assert list(rows[0])[:7] == ["idx", "label", "predict", "radius", "correct", "time", "sigma"]
    assert "pA_lower" in rows[0] and "seed" in rows[0]
    assert [r["predict"] for r in rows] == ["1", "0", "-1", "1", "1"]  # 0.5 sits on the boundary
    assert [r["correct"] for r in rows] == ["1", "1", "0", "1", "NA"]
    # The exact radius of a bright image is its distance to the plane mean = 0.5: 4·|v − 0.5|.
    assert 0 < float(rows[0]["radius"]) <= 4 * 0.4
    err = capsys.readouterr().err
    assert "certify 5/5" in err  # progress on stderr
    # The same request's certificate, printed rounded down (never to nearest): radius and
    # pA_lower at most one unit below, σ exactly; the progress line's radius at 3 decimals.
    from smoothcert.bundle import load_bundle
    from smoothcert.certifier import Certifier, default_device
    from smoothcert.sampling import derive_seed

    certifier = Certifier(load_bundle(bundle, device=default_device()), device=default_device())
    x = np.load(inputs / "set.npz")["x"]
    noted = [Decimal(r) for r in re.findall(r"radius (\S+)", err)]
    for idx in range(4):
        cert = certifier.certify(x[idx], n0=50, n=2000, alpha=0.01, seed=derive_seed(4, idx))
        radius, p_a_lower = Decimal(rows[idx]["radius"]), Decimal(rows[idx]["pA_lower"])
        assert radius <= Decimal(cert.radius) < radius + Decimal("1e-4")
        assert p_a_lower <= Decimal(cert.p_a_lower) < p_a_lower + Decimal("1e-6")
        assert noted[idx] <= Decimal(cert.radius) < noted[idx] + Decimal("1e-3")
        assert float(rows[idx]["sigma"]) == cert.sigma
    again = tmp_path / "again.tsv"
    main(["certify-local", "--bundle", str(bundle), str(inputs / "set.npz"), "--n", "2000", "--n0", "50",
          "--alpha", "0.01", "--seed", "4", "--out", str(again)])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(read_tsv(again.read_text())) == strip(rows[:4])


def test_memory_changes_certificates_in_order(tmp_path, inputs, capsys):
    bundle = linear_bundle(tmp_path / "bundle")
    code = main(["certify-local", "--bundle", str(bundle), str(inputs / "set.npz"), "--sigma-search", "ddrs",
                 "--search-steps", "5", "--n", "2000", "--alpha", "0.01", "--seed", "1",
                 "--out", str(tmp_path / "m.tsv")])
    assert code == 0
    rows = read_tsv((tmp_path / "m.tsv").read_text())
    assert rows[0]["memory"] == "new"
    assert rows[3]["memory"] == "inside"  # 0.88 lies in the ball certified around 0.9
    assert "memory: 3 entries" in capsys.readouterr().err


def test_two_sided_and_drs_columns(tmp_path, inputs):
    out = tmp_path / "o.tsv"
    main(["certify-local", "--bundle", str(linear_bundle(tmp_path / "b")), str(inputs / "one.npy"),
          "--bound", "two_sided", "--n", "500", "--alpha", "0.01", "--out", str(out)])
    assert {"pA_lower", "pB_upper"} <= set(read_tsv(out.read_text())[0])
    drs = linear_bundle(tmp_path / "drs", kind="drs")
    main(["certify-local", "--bundle", str(drs), str(inputs / "one.npy"), "--n", "500", "--alpha", "0.01",
          "--out", str(out)])
    row = read_tsv(out.read_text())[0]
    assert row["predict"] == "1" and {"pA_lower_left", "pA_lower_right"} <= set(row)


def test_adaptive_sampling_writes_the_n_used(tmp_path, inputs, capsys):
    out = tmp_path / "a.tsv"
    assert main(["certify-local", "--bundle", str(linear_bundle(tmp_path / "b")), str(inputs / "set.npz"),
                 "--sampling", "adaptive", "--tolerance", "0.1", "--n", "20000", "--seed", "4",
                 "--out", str(out)]) == 0
    rows = read_tsv(out.read_text())
    assert list(rows[0])[-2:] == ["seed", "n"]
    assert [r["predict"] for r in rows] == ["1", "0", "-1", "1"]
    assert all(0 <= int(r["n"]) <= 20_000 for r in rows) and int(rows[0]["n"]) < 20_000
    assert 0 < float(rows[0]["radius"]) <= 4 * 0.4
    bundle = str(linear_bundle(tmp_path / "c"))
    assert main(["certify-local", "--bundle", bundle, str(inputs / "one.npy"), "--tolerance", "0.1"]) == 2
    assert "tolerance applies to sampling 'adaptive' only" in capsys.readouterr().err
    assert main(["certify-local", "--bundle", bundle, str(inputs / "one.npy"), "--sampling", "adaptive",
                 "--tolerance", "-1"]) == 2
    assert "tolerance" in capsys.readouterr().err


def test_sequential_sampling_stops_at_the_target(tmp_path, inputs, capsys):
    out = tmp_path / "s.tsv"
    assert main(["certify-local", "--bundle", str(linear_bundle(tmp_path / "b")), str(inputs / "set.npz"),
                 "--sampling", "sequential", "--target-radius", "0.1", "--n", "20000", "--seed", "4",
                 "--out", str(out)]) == 0
    rows = read_tsv(out.read_text())
    assert list(rows[0])[-2:] == ["seed", "n"]
    assert rows[0]["predict"] == "1" and float(rows[0]["radius"]) >= 0.1 and int(rows[0]["n"]) < 20_000
    bundle = str(linear_bundle(tmp_path / "c"))
    assert main(["certify-local", "--bundle", bundle, str(inputs / "one.npy"), "--sampling", "sequential"]) == 2
    assert "needs target_radius" in capsys.readouterr().err
    assert main(["certify-local", "--bundle", bundle, str(inputs / "one.npy"), "--target-radius", "0.1"]) == 2
    assert "target_radius applies to sampling 'sequential' only" in capsys.readouterr().err


def test_refusals_exit_2_with_a_message(tmp_path, inputs, capsys):
    bundle = str(linear_bundle(tmp_path / "bundle"))
    assert main(["certify-local", "--bundle", bundle, str(inputs / "one.npy"), "--n", "5"]) == 2
    assert "n ≥ 10" in capsys.readouterr().err
    assert main(["certify-local", "--bundle", bundle, str(inputs / "one.npy"), "--sigma", "3"]) == 2
    assert "outside the model's range" in capsys.readouterr().err
    np.save(tmp_path / "big.npy", np.zeros((3, 8, 8), np.float32))
    assert main(["certify-local", "--bundle", bundle, str(tmp_path / "big.npy")]) == 2
    assert "shape" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "smoothcert.cli", "certify-local", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--sigma-search" in result.stdout and "--memory" in result.stdout
