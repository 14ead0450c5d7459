"""Training: a short run gives a bundle that loads and certifies; seeded runs repeat; the
committed demo model loads and certifies its example images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from smoothcert.architectures import Normalize, build_architecture
from smoothcert.bundle import ModelSpec, load_bundle, save_bundle
from smoothcert.certifier import Certifier
from smoothcert.data import load_digits_split
from smoothcert.imageio import decode_image
from smoothcert.training import METHODS, accuracy, gaussian_loss, train, train_gaussian

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "digits"
NORMALIZE = ((0.5,), (0.5,))
SPEC = ModelSpec.from_json({
    "name": "digits", "input_shape": [1, 8, 8], "num_classes": 10,
    "sigma": {"default": 0.25, "min": 0.12, "max": 1.0},
    "normalize": {"mean": [0.5], "std": [0.5]}, "architecture": "digits_cnn",
})


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def fresh_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_architecture("digits_cnn", (1, 8, 8), 10)


def test_short_training_gives_a_bundle_that_loads_and_certifies(digits, tmp_path):
    x_train, y_train, x_test, y_test = digits
    epochs_seen = []
    net = train_gaussian(fresh_net(), x_train, y_train, sigma=0.25, epochs=2, lr=3e-3, seed=0,
                         normalize=NORMALIZE, progress=lambda e, n, loss: epochs_seen.append(
                             (e, n, loss)))
    assert [e for e, _, _ in epochs_seen] == [1, 2] and all(np.isfinite(loss) for *_, loss in epochs_seen)
    assert not net.training
    assert accuracy(net, x_test, y_test, normalize=NORMALIZE) > 0.3  # chance is 0.1

    digest = save_bundle(tmp_path / "b", SPEC, net, fmt="state_dict")
    bundle = load_bundle(tmp_path / "b")
    # The bundle prepends the same Normalize the loop trained through: identical logits.
    x = torch.as_tensor(x_test[:16])
    with torch.no_grad():
        expected = net(Normalize(*NORMALIZE)(x))
        torch.testing.assert_close(bundle.classifier(x), expected)
    cert = Certifier(bundle, device="cpu").certify(x_test[0], sigma=0.25, n=200, seed=0)
    assert cert.model_digest == digest and cert.n == 200 and cert.radius >= 0


def test_training_is_seeded():
    x, y = load_digits_split()[:2]
    x, y = x[:256], y[:256]

    def weights(seed: int) -> dict[str, torch.Tensor]:
        net = train(fresh_net(), x, y, sigma=0.25, epochs=1, batch_size=64, seed=seed,
                    normalize=NORMALIZE)
        return net.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    for k in first:
        torch.testing.assert_close(first[k], again[k], rtol=0, atol=0)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_gaussian_loss_adds_seeded_noise():
    torch.manual_seed(0)
    model, x, y = nn.Linear(4, 3), torch.rand(8, 4), torch.randint(0, 3, (8,))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    clean = F.cross_entropy(model(x), y)
    torch.testing.assert_close(gaussian_loss(model, x, y, 0.0, g()), clean)
    noisy = gaussian_loss(model, x, y, 0.5, g())
    torch.testing.assert_close(noisy, gaussian_loss(model, x, y, 0.5, g()))
    assert not torch.equal(noisy, clean)
    assert "gaussian" in METHODS


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope"), "unknown training method"),
    (dict(optimizer="lbfgs"), "optimizer"),
    (dict(epochs=0), "epochs"),
    (dict(sigma=float("nan")), "sigma"),
])
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(sigma=0.25, epochs=1, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        train(fresh_net(), np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64), **args)


# ---------------------------------------------------------------- the committed demo model


def test_demo_bundle_is_committed_small_and_as_documented():
    assert (DEMO / "weights.pt").stat().st_size < 1_000_000
    bundle = load_bundle(DEMO)
    spec = bundle.spec
    assert spec.name == "digits" and spec.architecture == "digits_cnn"
    assert spec.input_shape == (1, 8, 8) and spec.labels == tuple(str(i) for i in range(10))
    assert (spec.sigma.default, spec.sigma.min, spec.sigma.max) == (0.25, 0.12, 1.0)
    assert spec.normalize == NORMALIZE
    # models/digits/README.md quotes the digest; it must describe these very files.
    assert bundle.digest in (DEMO / "README.md").read_text()


def test_demo_model_is_accurate(digits):
    _, _, x_test, y_test = digits
    classifier = load_bundle(DEMO).classifier
    with torch.no_grad():
        predicted = classifier(torch.as_tensor(x_test)).argmax(1).numpy()
    assert np.mean(predicted == y_test) > 0.95


def test_demo_model_certifies_the_examples():
    paths = sorted((ROOT / "examples").glob("digit-*.png"))
    assert len(paths) == 10
    certifier = Certifier(load_bundle(DEMO), device="cpu")
    correct = 0
    for path in paths:
        label = int(re.fullmatch(r"digit-(\d)\.png", path.name).group(1))
        cert = certifier.certify(decode_image(path.read_bytes(), channels=1), n=500, seed=0)
        correct += cert.prediction == label and cert.radius > 0
    assert correct >= 8
