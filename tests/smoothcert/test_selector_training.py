"""Training a σ selector's estimator (smoothcert.selector_training) and `smoothcert train
--method selector`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.stats import norm

from smoothcert.architectures import build_architecture
from smoothcert.bundle import ModelSpec, SigmaRange, load_bundle, save_bundle
from smoothcert.certifier import Certifier
from smoothcert.cli import main
from smoothcert.selector_training import (
    SelectorTraining,
    level_weights,
    radius_estimates,
    soft_labels,
    train_estimator,
)

from .exact import HalfSpace, point_at


def test_soft_labels_favour_the_largest_radius_and_are_uniform_where_nothing_classifies():
    radii = np.array([[0.1, 0.5, 0.2], [0.0, 0.0, 0.0], [0.30, 0.31, 0.0]])
    labels = soft_labels(radii, temperature=0.1)
    assert np.allclose(labels.sum(axis=1), 1) and labels[0].argmax() == 1
    assert np.allclose(labels[1], 1 / 3)  # every level misclassifies: no preference
    assert abs(labels[2, 0] - labels[2, 1]) < 0.05  # within T of each other: shared
    assert soft_labels(radii, temperature=0.01)[0, 1] > labels[0, 1]  # colder: sharper


def test_level_weights_undo_the_levels_frequencies():
    targets = np.array([[0.9, 0.1]] * 3 + [[0.2, 0.8]])
    w = level_weights(targets)
    assert np.isclose(w.mean(), 1) and np.isclose(w[3], 3 * w[0])
    assert np.isclose(sum(w[:3]), w[3])  # each level weighs the same in all


def test_radius_estimates_follow_the_exact_probabilities():
    """A half-space expert: P(label 1) = Φ(d/σ) exactly, so the estimate's mean is near σ·Φ⁻¹ of it."""
    model = HalfSpace(torch.linspace(-1.0, 1.0, 16), b=0.0).eval()
    x = torch.stack([point_at(model, (1, 4, 4), d, seed=i) for i, d in enumerate([0.3] * 50 + [-0.3] * 50)])
    y = torch.tensor([1] * 50 + [1] * 50)
    radii = radius_estimates([model], x, y, (0.25, 0.5), samples=400, seed=0)
    assert radii.shape == (100, 2) and (radii[50:] == 0).mean() > 0.9  # wrong side: rarely a majority
    for i, sigma in enumerate((0.25, 0.5)):
        exact = sigma * norm.ppf(norm.cdf(0.3 / sigma))  # = 0.3 for every σ
        assert abs(radii[:50, i].mean() - exact) < 0.05
    again = radius_estimates([model, model], x, y, (0.25, 0.5), samples=400, seed=0)
    assert np.array_equal(again, radii)  # per-level experts, same draws: same estimates


def test_the_estimator_learns_its_targets_and_is_seeded():
    """Targets by a linear feature: level 0 on one side, level 1 on the other."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, 4, 4, generator=g)
    side = (x.mean(dim=(1, 2, 3)) > 0.5).numpy()
    targets = np.where(side[:, None], [0.1, 0.9], [0.9, 0.1])
    settings = SelectorTraining(sigmas=(0.25, 0.5), sigma_e=0.1, copies=2)

    def run() -> tuple[list, torch.nn.Module]:
        torch.manual_seed(0)
        net = build_architecture("linear", (1, 4, 4), 2)
        return train_estimator(net, x, targets, level_weights(targets), settings=settings, epochs=30,
                               batch_size=64, lr=0.05, seed=1), net

    history, net = run()
    assert history[-1].loss < history[0].loss and history[-1].agreement > max(0.7, history[0].agreement + 0.2)
    again, net2 = run()
    assert [h.loss for h in again] == [h.loss for h in history]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True))


def test_an_interrupted_estimator_training_resumes_bit_for_bit(tmp_path):
    """Checkpoint after every epoch, stop after 3 of 6 (a run told epochs=6 that dies), resume:
    the weights and losses equal an uninterrupted run's; another run's checkpoint is refused."""
    from smoothcert.checkpoint import CheckpointMismatch

    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 4, 4, generator=g)
    targets = np.where((x.mean(dim=(1, 2, 3)) > 0.5).numpy()[:, None], [0.2, 0.8], [0.8, 0.2])
    settings = SelectorTraining(sigmas=(0.25, 0.5), sigma_e=0.1, copies=2)
    fresh = lambda: (torch.manual_seed(0), build_architecture("linear", (1, 4, 4), 2))[1]  # noqa: E731
    kw = dict(settings=settings, epochs=6, batch_size=32, lr=0.05, seed=1, config={"run": "a"})

    whole = fresh()
    expected = train_estimator(whole, x, targets, None, **kw)

    class Died(Exception):
        pass

    def die_after_3(stats):
        if stats.epoch == 3:
            raise Died

    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Died):
        train_estimator(fresh(), x, targets, None, checkpoint=ckpt, on_epoch=die_after_3, **kw)
    resumed = fresh()  # new weights: everything must come from the checkpoint
    history = train_estimator(resumed, x, targets, None, checkpoint=ckpt, resume=True, **kw)
    assert [h.loss for h in history] == [h.loss for h in expected] and [h.epoch for h in history] == list(range(1, 7))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(),
                                                  strict=True))
    with pytest.raises(CheckpointMismatch, match="run differ"):
        train_estimator(fresh(), x, targets, None, checkpoint=ckpt, resume=True, **(kw | {"config": {"run": "b"}}))


def test_train_selector_resumes_from_its_checkpoint(tmp_path, experts, capsys):
    args = ["train", "--method", "selector", "--experts", *experts, "--sigmas", "0.25", "0.5", "--sigma", "0.5",
            "--arch", "linear", "--data", "sklearn-digits", "--limit", "48", "--epochs", "3",
            "--label-samples", "5", "--name", "sel"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "checkpoint.pt").exists()  # removed at the end by default
    assert main([*args, "--epochs", "1", "--keep-checkpoint", "--out", str(tmp_path / "half")]) == 0
    # A checkpoint of a run with other settings (here: 1 epoch in all) is refused, not continued.
    assert main([*args, "--resume", "--out", str(tmp_path / "half")]) == 2
    assert "epochs differ" in capsys.readouterr().err
    # One written by the same run continues to the same weights (epochs mid-run: the test above).
    shutil.rmtree(tmp_path / "half")
    assert main([*args, "--keep-checkpoint", "--checkpoint-every", "1", "--out", str(tmp_path / "half")]) == 0
    assert torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)["epoch"] == 3
    assert main([*args, "--resume", "--out", str(tmp_path / "half")]) == 0
    record = json.loads((tmp_path / "half" / "train.json").read_text())
    assert record["resumed_from_epoch"] == 3 and len(record["epochs"]) == 3
    assert load_bundle(tmp_path / "half").digest == load_bundle(tmp_path / "whole").digest


@pytest.fixture()
def experts(tmp_path):
    """Two linear digits classifiers (untrained: the command's plumbing is what is tested)."""
    paths = []
    for i, sigma in enumerate((0.25, 0.5)):
        torch.manual_seed(i)
        spec = ModelSpec(name=f"e{i}", input_shape=(1, 8, 8), num_classes=10, sigma=SigmaRange(sigma, sigma, sigma),
                         normalize=((0.5,), (0.5,)), architecture="linear")
        save_bundle(tmp_path / f"e{i}", spec, build_architecture("linear", (1, 8, 8), 10), fmt="state_dict")
        paths.append(str(tmp_path / f"e{i}"))
    return paths


def test_train_selector_writes_a_selector_bundle_that_certifies(tmp_path, experts, capsys):
    out = tmp_path / "sel"
    code = main(["train", "--method", "selector", "--experts", *experts, "--sigmas", "0.25", "0.5",
                 "--sigma", "0.5", "--arch", "linear", "--data", "sklearn-digits", "--limit", "64",
                 "--epochs", "2", "--label-samples", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    spec = bundle.spec
    assert (spec.kind, spec.selector.sigmas, spec.selector.sigma_e, spec.selector.experts) == (
        "selector", (0.25, 0.5), 0.5, "per_sigma")
    assert spec.normalize is None  # each network carries its own
    record = json.loads((out / "train.json").read_text())
    assert record["selector"]["temperature"] == 0.1 and record["selector"]["label_samples"] == 10
    assert [e["digest"] for e in record["experts"]] == [load_bundle(p).digest for p in experts]
    assert len(record["labels"]["mean_radius"]) == 2 and len(record["epochs"]) == 2
    assert "--method selector" in record["command"] and record["bundle"]["digest"] == bundle.digest
    x = np.full((1, 8, 8), 0.5, np.float32)
    cert = Certifier(bundle, device="cpu").certify(x, n0=20, n=100, alpha=0.01, seed=0)
    assert cert.selector is not None
    # the experts are the given networks, normalisation included
    e0 = load_bundle(experts[0]).classifier
    probe = torch.rand(3, 1, 8, 8)
    assert torch.allclose(bundle.experts[0](probe), e0(probe), atol=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    ([], "needs --experts"),
    (["--sigmas", "0.25", "0.5", "0.75"], "one per level (3), got 2"),
    (["--sigmas", "0.25", "0.5", "--data", "mnist-5k"], "for [1, 28, 28] and 10"),
])
def test_train_selector_refusals(tmp_path, experts, capsys, extra, message):
    args = ["train", "--method", "selector", "--sigma", "0.5", "--arch", "linear", "--data", "sklearn-digits",
            "--epochs", "1", "--out", str(tmp_path / "sel")]
    if extra or message != "needs --experts":
        args += ["--experts", *experts]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_train_selector_init_starts_the_estimator_from_an_experts_features(tmp_path, experts, capsys, monkeypatch):
    """--init copies every tensor whose name and shape fit (all but the class head) and says which
    did not; the copy is what the estimator starts from (checked before any step is taken)."""
    torch.manual_seed(3)
    donor = build_architecture("digits_cnn", (1, 8, 8), 10)
    spec = ModelSpec(name="donor", input_shape=(1, 8, 8), num_classes=10, sigma=SigmaRange(0.5, 0.5, 0.5),
                     normalize=((0.5,), (0.5,)), architecture="digits_cnn")
    save_bundle(tmp_path / "donor", spec, donor, fmt="state_dict")
    started = {}

    def first_state(estimator, *args, **kwargs):
        started.update({k: v.detach().clone() for k, v in estimator.state_dict().items()})
        return train_estimator(estimator, *args, **kwargs)

    monkeypatch.setattr("smoothcert.selector_training.train_estimator", first_state)
    out = tmp_path / "sel"
    code = main(["train", "--method", "selector", "--experts", *experts, "--sigmas", "0.25", "0.5",
                 "--sigma", "0.5", "--arch", "digits_cnn", "--init", str(tmp_path / "donor"),
                 "--data", "sklearn-digits", "--limit", "32", "--epochs", "1", "--label-samples", "5",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name, value in donor.state_dict().items():
        if name.startswith("head.3"):
            assert started[f"1.{name}"].shape[0] == 2  # one output per level, not per class
        else:
            assert torch.equal(started[f"1.{name}"], value), name
    init = json.loads((out / "train.json").read_text())["init"]
    assert init["copied"] == 8 and init["skipped"] == ["head.3.bias", "head.3.weight"]
    assert init["digest"] == load_bundle(tmp_path / "donor").digest


def test_train_selector_init_refuses_another_architecture(tmp_path, experts, capsys):
    code = main(["train", "--method", "selector", "--experts", *experts, "--sigmas", "0.25", "0.5",
                 "--sigma", "0.5", "--arch", "digits_cnn", "--init", experts[0], "--data", "sklearn-digits",
                 "--epochs", "1", "--out", str(tmp_path / "sel")])
    assert code == 2
    assert "--init needs a standard digits_cnn bundle for input [1, 8, 8]" in capsys.readouterr().err
