"""Selector bundles (kind "selector"): model.json's levels, the estimator and the experts as
files, loading, and the Certifier's selector path with its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smoothcert import bounds
from smoothcert.architectures import build_architecture
from smoothcert.bundle import BundleError, ModelSpec, load_bundle, save_bundle
from smoothcert.certifier import Certifier
from smoothcert.selector import certify_selector
from smoothcert.sigma import SigmaSearch

SHAPE = (1, 4, 4)
LEVELS = [0.12, 0.25, 0.5]


def spec(experts: str = "shared", **extra) -> dict:
    return {"name": "sel", "kind": "selector", "input_shape": list(SHAPE), "num_classes": 4,
            "selector": {"sigmas": LEVELS, "sigma_e": 0.5, "experts": experts}, **extra}


def nets(experts: str = "shared", seed: int = 0) -> tuple[torch.nn.Module, ...]:
    torch.manual_seed(seed)
    count = 1 if experts == "shared" else len(LEVELS)
    estimator = build_architecture("linear", SHAPE, len(LEVELS))
    return (estimator, *(build_architecture("linear", SHAPE, 4) for _ in range(count)))


@pytest.mark.parametrize("experts", ["shared", "per_sigma"])
@pytest.mark.parametrize("fmt", ["pt2", "state_dict"])
def test_a_selector_bundle_round_trips_and_certifies(tmp_path, experts, fmt):
    model = spec(experts, architecture="linear") if fmt == "state_dict" else spec(experts)
    digest = save_bundle(tmp_path, model, nets(experts), fmt=fmt)
    files = sorted(p.name for p in tmp_path.iterdir())
    suffix = ".pt2" if fmt == "pt2" else ".pt"
    experts_files = ["expert" + suffix] if experts == "shared" else [f"expert{i}{suffix}" for i in range(3)]
    assert files == sorted(["model.json", "estimator" + suffix, *experts_files])
    bundle = load_bundle(tmp_path)
    assert bundle.digest == digest and bundle.spec.selector.sigmas == tuple(LEVELS)
    assert bundle.spec.sigma.min == 0.12 and bundle.spec.sigma.max == 0.5  # derived from the levels
    assert len(bundle.networks) == 1 + len(experts_files)
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
    certifier = Certifier(bundle, device="cpu")
    cert = certifier.certify(x, n0=20, n=200, alpha=0.01, batch_size=100, seed=5)
    assert cert.model_digest == digest and cert.selector is not None and cert.alpha == 0.01
    # exactly the engine's two stages on the bundle's networks
    alone = certify_selector(bundle.estimator, bundle.experts, x, sigmas=LEVELS, sigma_e=0.5, num_classes=4,
                             n0=20, n=200, alpha=0.01, batch_size=100, seed=5)
    assert (alone.prediction, alone.radius, alone.selector.sigma_index) == (
        cert.prediction, cert.radius, cert.selector.sigma_index)
    pred = certifier.predict(x, n=300, alpha=0.01, batch_size=100, seed=5)
    assert pred.selector is not None and pred.model_digest == digest


def test_the_certifier_refuses_sigma_search_and_memory_saying_why(tmp_path):
    save_bundle(tmp_path, spec(), nets())
    certifier = Certifier(load_bundle(tmp_path), device="cpu")
    x = np.zeros(SHAPE, np.float32)
    for kwargs, why in ((dict(sigma=0.25), "chooses sigma for each input"),
                        (dict(sigma_search=SigmaSearch()), "certified choice"),
                        (dict(memory=certifier.new_memory(0.01)), "without a memory")):
        with pytest.raises(bounds.InvalidParameters, match=why):
            certifier.certify(x, n0=20, n=200, alpha=0.01, **kwargs)
    with pytest.raises(bounds.InvalidParameters, match="chooses sigma"):
        certifier.predict(x, sigma=0.25, n=100)
    with pytest.raises(bounds.InvalidParameters, match="drs"):
        certifier.certify(x, n0=20, n=200, alpha=0.01, bound="drs")


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["selector"].update(sigmas=[0.25]), "2 to 16 distinct"),
    (lambda s: s["selector"].update(sigmas=[0.25, 0.25]), "distinct"),
    (lambda s: s["selector"].update(sigmas=[0.25, -1.0]), "positive"),
    (lambda s: s["selector"].update(sigmas="0.25,0.5"), "list of noise levels"),
    (lambda s: s["selector"].update(sigma_e=0), "sigma_e"),
    (lambda s: s["selector"].update(experts="each"), "shared"),
    (lambda s: s["selector"].update(extra=1), "unknown key"),
    (lambda s: s.pop("selector"), "sigma"),
    (lambda s: s.update(kind="standard"), "refused otherwise"),
    (lambda s: s.update(sigma={"default": 0.25, "min": 0.2, "max": 0.5}), "span the selector's levels"),
])
def test_bad_selector_specs_are_refused_naming_the_field(change, message):
    obj = spec()
    change(obj)
    with pytest.raises(BundleError, match=message):
        ModelSpec.from_json(obj)


def test_the_networks_must_match_the_layout(tmp_path):
    with pytest.raises(BundleError, match=r"estimator, expert0, expert1, expert2"):
        save_bundle(tmp_path, spec("per_sigma"), nets("shared"))
    torch.manual_seed(0)
    wrong = (build_architecture("linear", SHAPE, 4), build_architecture("linear", SHAPE, 4))
    with pytest.raises(BundleError, match=r"estimator.pt2 maps a batch .* to \[2, 4\], not logits \[2, 3\] \(levels\)"):
        save_bundle(tmp_path, spec(), wrong)
    save_bundle(tmp_path, spec("per_sigma"), nets("per_sigma"))
    (tmp_path / "model.json").write_text(json.dumps(spec("shared")))  # expert0-2 present, expert missing
    with pytest.raises(BundleError, match="lacks expert.pt2"):
        load_bundle(tmp_path)
    (tmp_path / "expert.pt2").write_bytes((tmp_path / "expert0.pt2").read_bytes())
    with pytest.raises(BundleError, match="expert0.pt2, expert1.pt2, expert2.pt2, which a selector bundle"):
        load_bundle(tmp_path)
    save_bundle(tmp_path, spec(), nets())  # saving again removes the other layout's files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["estimator.pt2", "expert.pt2", "model.json"]


def test_certify_local_and_evaluate_take_a_selector_bundle(tmp_path, capsys):
    from smoothcert.cli import main

    save_bundle(tmp_path / "b", spec(), nets())
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    np.savez(tmp_path / "set.npz", x=x, y=np.array([0, 1, 2]))
    out = tmp_path / "out.tsv"
    assert main(["certify-local", "--bundle", str(tmp_path / "b"), str(tmp_path / "set.npz"), "--n0", "20",
                 "--n", "300", "--alpha", "0.01", "--seed", "1", "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(float(row.split("\t")[6]) in LEVELS + [0.5] for row in lines[1:])
    assert main(["certify-local", "--bundle", str(tmp_path / "b"), str(tmp_path / "set.npz"), "--n", "1000",
                 "--sigma", "0.25"]) == 2
    assert "sigma is refused for a sigma selector model" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(["evaluate", "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "set.npz"), "--n0", "20",
                 "--n", "300", "--alpha", "0.01", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["count"] == 3 and summary["parameters"]["sigma"] is None
    assert summary["parameters"]["method"] == "selector" and summary["parameters"]["model"]["kind"] == "selector"


def test_the_automatic_batch_size_fits_every_network_of_a_selector(tmp_path, monkeypatch):
    import smoothcert.certifier as certifier_module
    from smoothcert.batching import BatchSize

    save_bundle(tmp_path, spec("per_sigma"), nets("per_sigma"))
    certifier = Certifier(load_bundle(tmp_path), device="cpu")
    probed = iter([BatchSize(4000, 40_000), BatchSize(500, 9000), BatchSize(8000, 5000), BatchSize(2000, 30_000)])
    monkeypatch.setattr(certifier_module, "auto_batch_size", lambda *a, **k: next(probed))
    assert certifier.batch == BatchSize(rows=500, max_rows=5000)  # the smallest of each, over all four
