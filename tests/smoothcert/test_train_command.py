"""`smoothcert train` end to end: the bundle it writes loads and certifies, train.json records
the run, progress goes to stderr one line per epoch, and bad input is refused with exit 2."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.commands.train import register
from smoothcert.data import load_data

QUICK = ["--data", "sklearn-digits", "--limit", "256", "--epochs", "2", "--sigma", "0.25",
         "--batch-size", "64", "--lr", "3e-3", "--device", "cpu"]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="smoothcert")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.run(args)


@pytest.fixture(scope="module")
def test_images():
    return load_data("sklearn-digits", "test").x


@pytest.fixture(scope="module")
def gaussian_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "digits-g"
    assert run_cli("--arch", "digits_cnn", "--normalize", "0.5,0.5", "--out", str(out), *QUICK) == 0
    return out


def test_train_writes_bundle_record_and_progress(tmp_path, capsys, test_images):
    out = tmp_path / "digits-small"
    assert run_cli("--method", "gaussian", "--arch", "digits_cnn", "--normalize", "0.5,0.5",
                   "--out", str(out), "--seed", "3", *QUICK) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]  # not a tty: one line per epoch
    assert all(" loss " in line and " acc " in line for line in lines)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "train.json", "weights.pt"]

    spec = json.loads((out / "model.json").read_text())
    assert spec["name"] == "digits-small" and spec["kind"] == "standard"
    assert spec["input_shape"] == [1, 8, 8] and spec["num_classes"] == 10
    assert spec["labels"] == [str(i) for i in range(10)] and spec["architecture"] == "digits_cnn"
    assert spec["sigma"] == {"default": 0.25, "min": 0.125, "max": 1.0}
    assert spec["normalize"] == {"mean": [0.5], "std": [0.5]}

    record = json.loads((out / "train.json").read_text())
    assert record["command"].startswith("smoothcert train ") and "--seed 3" in record["command"]
    assert record["seed"] == 3 and record["config"]["method"] == "gaussian"
    assert record["data"]["source"] == "sklearn-digits" and record["data"]["images"] == 256
    assert record["normalize"]["mean"] == [0.5] and "no resize" in record["transforms"]
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    assert all(e["loss"] > 0 and 0 <= e["accuracy"] <= 1 for e in record["epochs"])
    bundle = load_bundle(out)
    assert record["bundle"]["digest"] == bundle.digest and record["sigma_table"] is None
    cert = Certifier(bundle, device="cpu").certify(test_images[0], n=200, alpha=0.01, seed=0)
    assert cert.bound == "cohen" and cert.radius >= 0


def test_ddrs_records_its_sigma_table_within_the_declared_range(tmp_path):
    out = tmp_path / "ddrs"
    assert run_cli("--method", "ddrs", "--arch", "digits_cnn", "--out", str(out), "--k", "2",
                   "--ddrs-samples", "4", "--ddrs-lr", "0.05", "--sigma-min", "0.2",
                   "--sigma-max", "0.5", "--normalize", "auto", *QUICK) == 0
    spec = json.loads((out / "model.json").read_text())
    record = json.loads((out / "train.json").read_text())
    assert spec["sigma"] == {"default": 0.25, "min": 0.2, "max": 0.5}
    table = record["sigma_table"]
    assert table["allowed"] == [0.2, 0.5] and 0.2 <= table["min"] <= table["mean"] <= table["max"] <= 0.5
    assert table["max"] > table["min"]
    assert record["normalize"]["from"] == "auto" and spec["normalize"]["mean"] == record["normalize"]["mean"]
    assert record["config"]["options"]["ddrs_lr"] == 0.05


def test_drs_starts_both_halves_from_a_full_image_bundle(tmp_path, gaussian_bundle, test_images):
    out = tmp_path / "drs"
    assert run_cli("--method", "drs", "--init", str(gaussian_bundle), "--out", str(out), *QUICK) == 0
    assert {"left.pt", "right.pt", "model.json", "train.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "train.json").read_text())
    assert record["init"]["weights"] == "weights copied into both halves"
    bundle = load_bundle(out)
    assert bundle.spec.kind == "drs" and bundle.spec.normalize == ((0.5,), (0.5,))
    assert bundle.spec.architecture == "digits_cnn"  # the --init bundle's
    cert = Certifier(bundle, device="cpu").certify(test_images[0], n=200, alpha=0.01, seed=0)
    assert cert.bound == "drs" and cert.radius >= 0


def test_drs_trains_halves_from_scratch_when_the_weights_cannot_fit(tmp_path, capsys):
    linear = tmp_path / "lin"
    assert run_cli("--arch", "linear", "--out", str(linear), *QUICK) == 0
    assert run_cli("--method", "drs", "--init", str(linear), "--out", str(tmp_path / "d"), *QUICK) == 0
    assert "from scratch" in capsys.readouterr().err
    assert "from scratch" in json.loads((tmp_path / "d" / "train.json").read_text())["init"]["weights"]
    assert load_bundle(tmp_path / "d").spec.network_shape == (1, 8, 4)


def test_resume_continues_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "m"
    common = ["--arch", "digits_cnn", "--out", str(out), *QUICK]
    assert run_cli(*common, "--keep-checkpoint") == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    digest = load_bundle(out).digest
    assert run_cli(*common, "--resume") == 0  # nothing left to train: the same weights
    assert json.loads((out / "train.json").read_text())["resumed_from_epoch"] == 2
    assert load_bundle(out).digest == digest and not (out / "checkpoint.pt").exists()
    assert run_cli(*common, "--keep-checkpoint") == 0
    capsys.readouterr()
    assert run_cli(*common[:-2], "--lr", "0.1", "--resume") == 2
    assert "lr" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--arch", "digits_cnn", "--normalize", "0.5,0.5", "0.4,0.2"], "one MEAN,STD pair per channel"),
    (["--arch", "digits_cnn", "--name", "no spaces"], "--name"),
    ([], "--arch"),
    (["--arch", "digits_cnn", "--method", "ddrs", "--sigma-min", "0.3"], "sigma_min"),
    (["--arch", "digits_cnn", "--data", "missing.npz"], "missing.npz"),
])
def test_bad_input_is_refused(tmp_path, capsys, argv, message):
    assert run_cli(*QUICK, "--out", str(tmp_path / "x"), *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
