"""docs/tutorial.md runs as written against the real stack (with fewer samples), and
`save_bundle` takes what a user naturally hands it, or says clearly why not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from smoothcert.bundle import BundleError, ModelSpec, load_bundle, save_bundle
from tests import test_e2e as e2e
from tests.test_readme import replaced

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"

stack = e2e.stack  # the real stack (redis-server, a Celery worker, uvicorn)


def test_the_tutorial_runs(stack, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), re.DOTALL)
    assert len(blocks) == 8
    monkeypatch.chdir(tmp_path)  # the tutorial writes its bundle and images where it runs
    monkeypatch.setenv("SMOOTHCERT_URL", stack)
    monkeypatch.setenv("SMOOTHCERT_API_KEY", e2e.USER)
    monkeypatch.setenv("SMOOTHCERT_ADMIN_KEY", e2e.ADMIN)
    code = replaced("\n".join(blocks), ("n0=100, n=1_000,", "n0=10, n=100,"), ("n=10_000)", "n0=10, n=100)"))
    scope: dict = {"__name__": "tutorial"}
    exec(compile(code, str(TUTORIAL), "exec"), scope)  # noqa: S102 - our own docs
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == scope["digest"] and printed[0].startswith("sha256:")
    assert printed[2] == "my-resnet True"  # registered under the digest save_bundle gave
    result = scope["result"]
    assert result.model.name == "my-resnet" and result.model.digest == scope["digest"]
    assert result.abstained or (result.label in scope["spec"]["labels"] and result.radius > 0)
    assert "input.image_b64: the image is greyscale 32×32 (H×W, 1 channel); model 'my-resnet' takes 3×32×32" \
        in printed[-1]
    assert json.loads((tmp_path / "my-resnet" / "model.json").read_text())["name"] == "my-resnet"


# save_bundle's arguments


SPEC = {"name": "tiny", "input_shape": [1, 4, 4], "num_classes": 3, "sigma": {"default": 0.25}}


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()


def test_save_bundle_takes_a_model_json_dict_or_a_spec(tmp_path):
    net = tiny()
    from_dict = save_bundle(tmp_path / "dict", SPEC, net)  # before: AttributeError on a dict
    from_spec = save_bundle(tmp_path / "spec", ModelSpec.from_json(SPEC), net)
    as_list = save_bundle(tmp_path / "list", SPEC, [net])
    assert from_dict == from_spec == as_list
    bundle = load_bundle(tmp_path / "dict")
    assert bundle.digest == from_dict and bundle.spec.input_shape == (1, 4, 4)
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(bundle.classifier(x), net(x))


@pytest.mark.parametrize(("spec", "networks", "message"), [
    (SPEC | {"input_shape": [4, 4]}, None, r"model.json: 'input_shape' must be \[C, H, W\]"),
    (SPEC | {"num_clases": 3}, None, r"unknown key\(s\) \['num_clases'\]"),
    ("model.json", None, "spec must be a ModelSpec or the model.json object as a dict, got str"),
    (SPEC, "state_dict", r"a standard bundle needs one nn.Module, got OrderedDict \(a state dict\? pass the module"),
    (SPEC, "pair", r"a standard bundle needs one nn.Module, got \(Sequential, Sequential\)"),
    (SPEC, "nothing", "a standard bundle needs one nn.Module, got NoneType"),
    (SPEC | {"kind": "drs", "input_shape": [1, 4, 4]}, None, r"a drs bundle needs nn.Modules for \(left, right\)"),
    (SPEC | {"kind": "remote", "remote": {"endpoint": "https://x.example", "model": "m"}}, None,
     "a remote bundle has no network"),
])
def test_save_bundle_refuses_clearly_and_writes_nothing(tmp_path, spec, networks, message):
    net = tiny()
    given = {None: net, "state_dict": net.state_dict(), "pair": (net, net), "nothing": None}[networks]
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path / "out", spec, given)
    assert not (tmp_path / "out").exists()


def test_save_bundle_explains_a_network_torch_export_cannot_trace(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :3] if x.sum() > 0 else -x.flatten(1)[:, :3]  # a branch on the data

    with pytest.raises(BundleError, match="torch.export cannot export the network"):
        save_bundle(tmp_path / "out", SPEC, DataDependent())
    assert not (tmp_path / "out").exists()
