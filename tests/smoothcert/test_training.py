"""Training: a short run of every method gives a bundle that loads and certifies; seeded runs
repeat; the losses equal their formulas computed by hand; a resumed run ends with the weights
of an uninterrupted one; the committed demo model loads and certifies its example images."""

from __future__ import annotations

import dataclasses
import math
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
from smoothcert.losses import FENG_FLOOR, ddrs_sigma_ascent, feng_step, macer_step
from smoothcert.sigma import ddrs_ascent
from smoothcert.training import (
    METHODS,
    MethodOptions,
    accuracy,
    fit,
    gaussian_loss,
    train,
    train_gaussian,
)

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


# ---------------------------------------------------------------- the other methods


def subset(digits, n: int = 320):
    x_train, y_train, *_ = digits
    return x_train[:n], y_train[:n]


def fresh_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return (build_architecture("digits_cnn", (1, 8, 4), 10), build_architecture("digits_cnn", (1, 8, 4), 10))


QUICK = MethodOptions(k=4, ddrs_samples=4, insta_samples=16, insta_steps=1, stage1_epochs=1)


@pytest.mark.parametrize("method, options", [
    ("feng", QUICK),
    ("ddrs", QUICK),
    ("ddrs", dataclasses.replace(QUICK, ddrs_loss="macer", lam=1.0)),
    ("insta", QUICK),
    ("drs", QUICK),
], ids=["feng", "ddrs-ce", "ddrs-macer", "insta", "drs"])
def test_each_method_gives_a_bundle_that_loads_and_certifies(digits, tmp_path, method, options):
    x, y = subset(digits)
    seen = []
    result = fit(fresh_pair() if method == "drs" else fresh_net(), x, y, method=method, sigma=0.25,
                 epochs=2, batch_size=64, lr=3e-3, seed=0, normalize=NORMALIZE, options=options,
                 on_epoch=seen.append)
    assert [s.epoch for s in seen] == [1, 2] and all(np.isfinite(s.loss) and 0 <= s.accuracy <= 1 for s in seen)
    assert (result.sigma_table is not None) == (method in ("ddrs", "insta"))
    spec = dataclasses.replace(SPEC, kind="drs") if method == "drs" else SPEC
    save_bundle(tmp_path / "b", spec, result.net, fmt="state_dict")
    bundle = load_bundle(tmp_path / "b")
    _, _, x_test, y_test = digits
    cert = Certifier(bundle, device="cpu").certify(x_test[0], n=200, alpha=0.01, seed=0)
    assert cert.bound == ("drs" if method == "drs" else "cohen") and cert.n == 200 and cert.radius >= 0


def test_ddrs_sigma_table_moves_within_its_range(digits):
    x, y = subset(digits, 256)
    low, high = 0.2, 0.3
    options = MethodOptions(sigma_min=low, sigma_max=high, k=2, ddrs_samples=4, ddrs_steps=3, ddrs_lr=0.05)
    result = fit(fresh_net(), x, y, method="ddrs", sigma=0.25, epochs=2, batch_size=64, lr=3e-3,
                 seed=0, normalize=NORMALIZE, options=options)
    table = result.sigma_table
    assert table.shape == (256,) and torch.all((table >= low) & (table <= high))
    assert (table != 0.25).float().mean() > 0.9 and table.std() > 0
    last = result.history[-1].sigma
    assert last == pytest.approx({"min": float(table.min()), "mean": float(table.mean()), "max": float(table.max())})


def test_batched_ddrs_ascent_is_the_test_time_ascent():
    # One image at a time, the training ascent draws the same noise as sigma.ddrs_ascent.
    model = fresh_net(3).eval()
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    args = dict(sigma_min=0.1, sigma_max=1.0, steps=4, lr=0.05, samples=16)
    ours = ddrs_sigma_ascent(model, x[None], torch.tensor([0.3]), **args,
                             generator=torch.Generator().manual_seed(7))
    theirs = ddrs_ascent(model, x, 0.3, **args, generator=torch.Generator().manual_seed(7))
    assert ours.item() == pytest.approx(theirs, abs=1e-5) and ours.item() != pytest.approx(0.3)


class Tiny(nn.Module):
    """logits = W·x for x [B, 1, 1, 2]: three classes, class c bright along w_c."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[4.0, 0.0], [0.0, 4.0], [-3.0, -3.0]]))

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def by_hand(model, x, y, sigma, k, seed):
    noise = torch.randn((k, *x.shape), generator=torch.Generator().manual_seed(seed))
    sig = sigma.view(-1, 1, 1, 1) if isinstance(sigma, torch.Tensor) else sigma
    probs = [[torch.softmax(model((x[b] + sig[b] * noise[j, b] if isinstance(sigma, torch.Tensor)
                                    else x[b] + sigma * noise[j, b])[None])[0], 0)
              for b in range(len(x))] for j in range(k)]
    ce = -sum(torch.log(probs[j][b][y[b]]) for j in range(k) for b in range(len(x))) / (k * len(x))
    g = [sum(probs[j][b] for j in range(k)) / k for b in range(len(x))]
    return ce, g


def test_feng_loss_is_ce_plus_lambda_log_strongest_wrong_class():
    model = Tiny()
    x = torch.tensor([[[[0.9, 0.1]]], [[[0.1, 0.8]]], [[[0.5, 0.45]]]])
    y = torch.tensor([0, 2, 1])  # top class is the label, is not, and a close call
    k, lam, sigma = 6, 0.3, 0.2
    loss, acc = feng_step(model, x, y, sigma, torch.Generator().manual_seed(4), k, lam)
    ce, g = by_hand(model, x, y, sigma, k, seed=4)
    regulariser = []
    for b in range(len(x)):
        order = torch.argsort(g[b], descending=True)
        top = int(order[0])
        c = int(order[1]) if top == int(y[b]) else top  # runner-up if the top is the label
        regulariser.append(torch.log(g[b][c]).clamp(min=math.log(FENG_FLOOR)))
    assert int(torch.argmax(g[0])) == 0 and int(torch.argmax(g[1])) == 1  # both cases present
    torch.testing.assert_close(loss, ce + lam * sum(regulariser) / len(x))
    loss.backward()
    assert torch.isfinite(model.w.grad).all() and 0 <= float(acc) <= 1


def test_feng_regulariser_is_floored():
    """A confident network's runner-up probability (≈ e^-200) sits far below FENG_FLOOR: the
    term is exactly λ·log FENG_FLOOR and gives no gradient, so nothing rewards larger logits."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[100.0, 100.0], [-100.0, -100.0], [-100.0, -100.0]]))
        model[1].bias.zero_()
    x, y = torch.full((4, 1, 1, 2), 0.5), torch.zeros(4, dtype=torch.int64)
    loss, _ = feng_step(model, x, y, 0.01, torch.Generator().manual_seed(0), 4, 0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * math.log(FENG_FLOOR)), atol=1e-4, rtol=0)
    loss.backward()
    assert float(model[1].weight.grad.abs().max()) < 1e-6


def test_macer_loss_with_per_example_sigma_by_hand():
    model = Tiny()
    x = torch.tensor([[[[0.9, 0.1]]], [[[0.1, 0.8]]], [[[0.6, 0.5]]]])
    y = torch.tensor([0, 2, 0])
    sigma = torch.tensor([0.2, 0.3, 0.4])
    k, lam, beta, gamma = 5, 2.0, 4.0, 3.0
    loss, _ = macer_step(model, x, y, sigma, torch.Generator().manual_seed(1), k, lam, beta, gamma)
    noise = torch.randn((k, *x.shape), generator=torch.Generator().manual_seed(1))
    total, hinges = 0.0, []
    for b in range(len(x)):
        logits = torch.stack([model((x[b] + sigma[b] * noise[j, b])[None])[0] for j in range(k)])
        g = torch.softmax(logits, 1).mean(0)
        soft = torch.softmax(beta * logits, 1).mean(0)
        top2 = torch.topk(soft, 2)
        hinge = 0.0
        if int(top2.indices[0]) == int(y[b]):  # MACER's hinge: correctly classified only
            xi = torch.special.ndtri(top2.values[0].double()) - torch.special.ndtri(top2.values[1].double())
            hinge = max(0.0, gamma - float(xi.detach()))
        hinges.append(hinge)
        total = total - torch.log(g[y[b]]) + lam * float(sigma[b]) / 2 * hinge
    assert hinges[0] == hinges[1] == 0 and hinges[2] > 0  # past the margin, misclassified, inside
    torch.testing.assert_close(loss, total / len(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- checkpoints and resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["gaussian", "ddrs", "insta", "drs"])
def test_resume_gives_the_uninterrupted_weights(digits, tmp_path, method):
    x, y = subset(digits, 192)
    net = (lambda: fresh_pair()) if method == "drs" else (lambda: fresh_net())
    kwargs = dict(method=method, sigma=0.25, epochs=2, batch_size=64, lr=3e-3, seed=0,
                  normalize=NORMALIZE, options=QUICK)
    whole = fit(net(), x, y, **kwargs)

    def stop(epoch, epochs, loss):
        if epoch == 1:
            raise Interrupt()

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):
        fit(net(), x, y, checkpoint=str(path), progress=stop, **kwargs)
    state = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert (state["sigma_table"] is not None) == (method in ("ddrs", "insta"))
    fresh = net()  # other initial weights would not matter: the checkpoint replaces them
    resumed = fit(fresh, x, y, checkpoint=str(path), resume=True, **kwargs)
    assert resumed.resumed_from == 1 and [h.epoch for h in resumed.history] == [1, 2]
    nets = (whole.net, resumed.net) if method == "drs" else ((whole.net,), (resumed.net,))
    for a, b in zip(*nets, strict=True):
        for key, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    if whole.sigma_table is not None:
        assert torch.equal(whole.sigma_table, resumed.sigma_table)


def test_resume_refuses_a_checkpoint_of_other_settings(digits, tmp_path):
    x, y = subset(digits, 64)
    path = str(tmp_path / "checkpoint.pt")
    fit(fresh_net(), x, y, sigma=0.25, epochs=1, seed=0, checkpoint=path)
    with pytest.raises(ValueError, match="lr"):
        fit(fresh_net(), x, y, sigma=0.25, epochs=1, lr=0.1, seed=0, checkpoint=path, resume=True)


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="sigma_min"):
        MethodOptions(sigma_min=0.3).resolved("ddrs", 0.25, 2)
    with pytest.raises(ValueError, match="ddrs_loss"):
        MethodOptions(ddrs_loss="hinge").resolved("ddrs", 0.25, 2)
    with pytest.raises(ValueError, match="pair"):
        fit(fresh_net(), np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64), method="drs",
            sigma=0.25, epochs=1, seed=0)
    resolved = MethodOptions().resolved("feng", 0.25, 10)
    assert (resolved.k, resolved.lam, resolved.sigma_min, resolved.sigma_max) == (8, 0.1, 0.125, 1.0)
    assert MethodOptions(ddrs_loss="macer").resolved("ddrs", 0.5, 4).lam == 12.0
    assert MethodOptions().resolved("insta", 0.5, 5).stage1_epochs == 2


def test_feng_lowers_the_runner_up_probability_against_gaussian():
    """Three overlapping classes of 2×2 images, one linear network, the same seed and epochs:
    Feng's regulariser leaves clearly less probability on the strongest wrong class of the
    noisy vote Ĝ than Gaussian augmentation alone (measured on fixed noise)."""
    from smoothcert.architectures import build_architecture
    from smoothcert.methods import MethodOptions
    from smoothcert.training import train

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.3, 0.3, 0.7, 0.7], [0.7, 0.7, 0.3, 0.3], [0.5, 0.5, 0.5, 0.5]])
    y = torch.arange(3).repeat(200)
    x = (centers[y] + 0.05 * torch.randn(600, 4, generator=g)).clamp(0, 1).view(600, 1, 2, 2)

    def trained(method: str, **options):
        torch.manual_seed(0)
        net = build_architecture("linear", (1, 2, 2), 3)
        return train(net, x.numpy(), y.numpy(), method=method, sigma=0.25, epochs=30, lr=0.05, seed=0,
                     options=MethodOptions(**options) if options else None)

    def runner_up(net) -> float:
        xs, ys = x[:90], y[:90]
        noise = torch.randn(256, *xs.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            p = torch.softmax(net((xs[None] + 0.25 * noise).flatten(0, 1)), -1).view(256, 90, 3).mean(0)
        return float(p.masked_fill(F.one_hot(ys, 3).bool(), -1.0).max(-1).values.mean())

    gaussian, feng = runner_up(trained("gaussian")), runner_up(trained("feng", k=8, lam=1.0))
    assert feng < 0.85 * gaussian, (feng, gaussian)  # measured here: 0.231 against 0.305
