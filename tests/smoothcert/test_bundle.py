"""Bundles: round trips, digests, and every refusal (unsafe pickles, zips, pt2 archives, specs)."""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import warnings
import zipfile

import pytest
import torch
from torch import nn

from smoothcert.architectures import Normalize, build_architecture
from smoothcert.bundle import (
    Bundle,
    BundleError,
    ModelSpec,
    SigmaRange,
    bundle_digest,
    load_bundle,
    read_bundle_files,
    save_bundle,
    zip_bundle,
)

SHAPE = (1, 8, 8)


def digits_spec(**changes) -> ModelSpec:
    fields = dict(name="digits", input_shape=SHAPE, num_classes=10,
                  sigma=SigmaRange(0.25, 0.05, 1.0), architecture="digits_cnn")
    fields.update(changes)
    return ModelSpec(**fields)


def digits_net(seed: int = 0, shape=SHAPE, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_architecture("digits_cnn", shape, 10, **kwargs).eval()


def spec_json(**changes) -> dict:
    obj = {"name": "digits", "kind": "standard", "input_shape": [1, 8, 8], "num_classes": 10,
           "sigma": {"default": 0.25, "min": 0.05, "max": 1.0}, "architecture": "digits_cnn"}
    obj.update(changes)
    return obj


def write_bundle(directory, model_json: dict, **files: bytes) -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "model.json"), "w") as fh:
        json.dump(model_json, fh)
    for name, data in files.items():
        with open(os.path.join(directory, name.replace("_dot_", ".")), "wb") as fh:
            fh.write(data)
    return str(directory)


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def make_zip(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny networks gain nothing from threads, and OpenMP spinning against a busy machine
    # (benchmarks, parallel suites) makes this module several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pt2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt2")
    digest = save_bundle(out, digits_spec(), digits_net(), fmt="pt2")
    return str(out), digest


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["pt2", "state_dict"])
def test_standard_round_trip(fmt, pt2_dir, tmp_path):
    net = digits_net()
    if fmt == "pt2":
        out, digest = pt2_dir
    else:
        out, digest = str(tmp_path), save_bundle(tmp_path, digits_spec(), net, fmt=fmt)
    bundle = load_bundle(out)
    assert bundle.digest == digest and digest.startswith("sha256:")
    assert bundle.spec.labels == tuple(str(i) for i in range(10))
    assert (bundle.spec.architecture is None) == (fmt == "pt2")  # pt2 carries its own graph
    clf = bundle.classifier
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    torch.manual_seed(1)
    for batch in (1, 33, 1000):  # the pt2 batch dimension is dynamic
        x = torch.rand(batch, *SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(clf(x), net(x), atol=1e-5, rtol=0)
    clf.train().eval()  # callers may switch modes, even on exported programs
    assert bundle.networks == (clf,)


def test_zip_and_directory_have_the_same_digest(pt2_dir, tmp_path):
    out, digest = pt2_dir
    data = zip_bundle(out)
    assert zip_bundle(out) == data  # deterministic
    assert load_bundle(data).digest == digest
    (tmp_path / "b.zip").write_bytes(data)
    assert load_bundle(tmp_path / "b.zip").digest == digest
    # members under one top-level folder (what `zip -r b.zip digits/` makes), plus macOS junk
    files = read_bundle_files(out)
    nested = make_zip({**{f"digits/{n}": d for n, d in files.items()}, "__MACOSX/._x": b"junk"})
    assert read_bundle_files(nested) == files
    assert load_bundle(nested).digest == digest == bundle_digest(
        {n: files[n] for n in ("model.json", "model.pt2")})


def test_digest_follows_content(tmp_path):
    first = save_bundle(tmp_path / "a", digits_spec(), digits_net(0), fmt="state_dict")
    assert save_bundle(tmp_path / "b", digits_spec(), digits_net(0), fmt="state_dict") == first
    assert save_bundle(tmp_path / "c", digits_spec(), digits_net(1), fmt="state_dict") != first
    assert save_bundle(tmp_path / "d", digits_spec(name="other"), digits_net(0),
                       fmt="state_dict") != first
    (tmp_path / "a" / "README.txt").write_text("not used by the loader")
    assert load_bundle(tmp_path / "a").digest == first


@pytest.mark.parametrize("fmt", ["pt2", "state_dict"])
def test_drs_round_trip(fmt, tmp_path):
    half = (1, 8, 4)
    left, right = digits_net(2, half), digits_net(3, half)
    spec = digits_spec(kind="drs")
    assert spec.half_shape == spec.network_shape == half
    digest = save_bundle(tmp_path, spec, (left, right), fmt=fmt)
    bundle = load_bundle(tmp_path)
    assert bundle.digest == digest and bundle.classifier is None
    ext = "pt2" if fmt == "pt2" else "pt"
    assert sorted(read_bundle_files(tmp_path)) == [f"left.{ext}", "model.json", f"right.{ext}"]
    x = torch.rand(5, *half)
    with torch.no_grad():
        torch.testing.assert_close(bundle.left(x), left(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(bundle.right(x), right(x), atol=1e-5, rtol=0)
    assert bundle.networks == (bundle.left, bundle.right)


def test_normalize_is_applied_inside(tmp_path):
    net = digits_net()
    spec = digits_spec(normalize=((0.5,), (0.25,)))
    save_bundle(tmp_path, spec, net, fmt="state_dict")
    clf = load_bundle(tmp_path).classifier
    x = torch.rand(7, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), net(Normalize([0.5], [0.25])(x)), atol=1e-5, rtol=0)
        torch.testing.assert_close(clf(x), net((x - 0.5) / 0.25), atol=1e-5, rtol=0)


def test_torchvision_architecture_by_name(tmp_path):
    torch.manual_seed(0)
    net = build_architecture("torchvision:resnet18", (3, 32, 32), 10).eval()
    spec = ModelSpec(name="tv", input_shape=(3, 32, 32), num_classes=10,
                     sigma=SigmaRange(0.5, 0.5, 0.5),
                     architecture="torchvision:resnet18",
                     normalize=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    save_bundle(tmp_path, spec, net, fmt="state_dict")
    clf = load_bundle(tmp_path).classifier
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = net(Normalize(*spec.normalize)(x))
        torch.testing.assert_close(clf(x), expected, atol=1e-4, rtol=1e-4)


def test_bundle_to_returns_a_moved_copy(pt2_dir):
    bundle = load_bundle(pt2_dir[0])
    moved = bundle.to("cpu")
    assert isinstance(moved, Bundle) and moved.classifier is not bundle.classifier
    assert moved.digest == bundle.digest and not moved.classifier.training
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(moved.classifier(x), bundle.classifier(x))


# ---------------------------------------------------------------- unsafe weights


class Payload:
    """Unpickling this runs a shell command: what a hostile upload would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_whole_module_pickle_is_refused(tmp_path):
    write_bundle(tmp_path, spec_json(), weights_dot_pt=saved_bytes(digits_net()))
    with pytest.raises(BundleError, match="state dict"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickle_payload_is_refused_and_never_runs(how, tmp_path):
    marker = tmp_path / "pwned.txt"
    payload = Payload(str(marker))
    data = saved_bytes(payload) if how == "torch.save" else pickle.dumps(payload, protocol=2)
    write_bundle(tmp_path / "b", spec_json(), weights_dot_pt=data)
    with pytest.raises(BundleError, match="state dict"):
        load_bundle(tmp_path / "b")
    assert not marker.exists()


def test_checkpoint_dict_is_refused_with_a_hint(tmp_path):
    write_bundle(tmp_path, spec_json(), weights_dot_pt=saved_bytes(
        {"state_dict": digits_net().state_dict(), "epoch": 3}))
    with pytest.raises(BundleError, match="'state_dict' entry"):
        load_bundle(tmp_path)


def test_mismatched_state_dict_is_refused(tmp_path):
    small = digits_net(width=16).state_dict()  # the bundle's architecture has width 32
    write_bundle(tmp_path, spec_json(), weights_dot_pt=saved_bytes(small))
    with pytest.raises(BundleError, match="does not fit architecture 'digits_cnn'"):
        load_bundle(tmp_path)


def test_wrong_number_of_classes_is_refused(tmp_path):
    write_bundle(tmp_path, spec_json(architecture="linear", num_classes=3),
                 weights_dot_pt=saved_bytes(nn.Linear(64, 3).state_dict()))
    with pytest.raises(BundleError, match="does not fit"):
        load_bundle(tmp_path)
    torch.manual_seed(0)
    linear_pt2 = tmp_path / "lin"
    save_bundle(linear_pt2, ModelSpec(name="lin", input_shape=SHAPE, num_classes=4,
                                      sigma=SigmaRange(0.25, 0.25, 0.25)),
                build_architecture("linear", SHAPE, 4), fmt="pt2")
    spec = json.loads((linear_pt2 / "model.json").read_text()) | {"num_classes": 5}
    spec.pop("labels")
    (linear_pt2 / "model.json").write_text(json.dumps(spec))
    with pytest.raises(BundleError, match=r"not logits \[2, 5\]"):
        load_bundle(linear_pt2)


def test_torchscript_is_refused_with_a_pointer_to_torch_export(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated: exactly why it is refused
        buf = io.BytesIO()
        torch.jit.save(torch.jit.trace(digits_net(), torch.zeros(1, *SHAPE)), buf)
    js = spec_json()
    del js["architecture"]
    write_bundle(tmp_path / "a", js, model_dot_ts=buf.getvalue())
    write_bundle(tmp_path / "b", spec_json(), weights_dot_pt=buf.getvalue())
    for directory in ("a", "b"):
        with pytest.raises(BundleError, match="TorchScript.*torch.export"):
            load_bundle(tmp_path / directory)


# ---------------------------------------------------------------- unsafe pt2 archives


def rewrite_pt2(data: bytes, replace: dict) -> bytes:
    """The same archive with the members ending in each key replaced (bytes, or a function)."""
    out, hits = io.BytesIO(), 0
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    body, hits = (new(body) if callable(new) else new), hits + 1
            zout.writestr(info.filename, body)
    assert hits == len(replace)
    return out.getvalue()


def test_pt2_with_pickled_sample_inputs_is_refused_and_never_runs(pt2_dir, tmp_path):
    # torch.export.load would retry these with weights_only=False and run the payload
    marker = tmp_path / "pwned.txt"
    pt2 = (read_bundle_files(pt2_dir[0]))["model.pt2"]
    bad = rewrite_pt2(pt2, {"sample_inputs/model.pt": saved_bytes(Payload(str(marker)))})
    files = read_bundle_files(pt2_dir[0]) | {"model.pt2": bad}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(BundleError, match="sample inputs"):
        load_bundle(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (lambda g: g.replace(b'"guards_code": []', b'"guards_code": ["__import__(\'os\')"]'),
     "guard code"),
    (lambda g: g.replace(b"Symbol('s77', positive=True, integer=True)",
                         b"__import__('os').getcwd()", 1), "shape expression"),
    (lambda g: g.replace(b"torch.ops.aten.linear.default", b"torch.hub.load", 1), "torch.hub.load"),
])
def test_pt2_with_code_in_its_graph_is_refused(edit, message, tmp_path):
    torch.manual_seed(0)
    save_bundle(tmp_path, ModelSpec(name="lin", input_shape=SHAPE, num_classes=3,
                                    sigma=SigmaRange(0.25, 0.25, 0.25)),
                build_architecture("linear", SHAPE, 3), fmt="pt2")
    pt2 = (tmp_path / "model.pt2").read_bytes()
    graph = zipfile.ZipFile(io.BytesIO(pt2)).read("archive/models/model.json")
    assert edit(graph) != graph
    bad = rewrite_pt2(pt2, {"models/model.json": edit})
    (tmp_path / "model.pt2").write_bytes(bad)
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path)


def test_pt2_exported_in_train_mode_is_refused(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3))
    net.train()
    program = torch.export.export(net, (torch.zeros(2, *SHAPE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "model.pt2")
    write_bundle(tmp_path, {"name": "bn", "input_shape": [1, 8, 8], "num_classes": 3,
                            "sigma": {"default": 0.5}})
    with pytest.raises(BundleError, match="train mode"):
        load_bundle(tmp_path)


def test_pt2_with_fixed_batch_is_refused(tmp_path):
    net = build_architecture("linear", SHAPE, 3).eval()
    program = torch.export.export(net, (torch.zeros(2, *SHAPE),))  # no dynamic_shapes
    torch.export.save(program, tmp_path / "model.pt2")
    write_bundle(tmp_path, {"name": "fixed", "input_shape": [1, 8, 8], "num_classes": 3,
                            "sigma": {"default": 0.5}})
    with pytest.raises(BundleError, match="dynamic batch"):
        load_bundle(tmp_path)


# ---------------------------------------------------------------- unsafe zips


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil", "C:/evil"])
def test_zip_path_traversal_is_refused(name):
    with pytest.raises(BundleError, match="unsafe path"):
        read_bundle_files(make_zip({"model.json": b"{}", name: b"x"}))


def test_zip_symlink_member_is_refused():
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(make_zip({"model.json": b"{}", "weights.pt": b"/etc/passwd"},
                             links=("weights.pt",)))


def test_size_and_count_limits(tmp_path):
    data = make_zip({"model.json": b"{}", "weights.pt": b"x" * 1000})
    with pytest.raises(BundleError, match="larger than 100 bytes"):
        read_bundle_files(data, max_member_bytes=100)
    with pytest.raises(BundleError, match="total"):
        read_bundle_files(data, max_total_bytes=1001)
    with pytest.raises(BundleError, match="at most 1"):
        read_bundle_files(data, max_members=1)
    write_bundle(tmp_path, {}, weights_dot_pt=b"x" * 1000)
    with pytest.raises(BundleError, match="larger than 100 bytes"):
        read_bundle_files(tmp_path, max_member_bytes=100)
    assert read_bundle_files(data)["weights.pt"] == b"x" * 1000


def test_lying_zip_header_is_refused():
    # Declare 10 bytes in the central directory for a 1000-byte stored member.
    data = bytearray(make_zip({"model.json": b"{}", "weights.pt": b"x" * 1000}))
    central = data.rfind(b"PK\x01\x02")  # the last member's central directory entry
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    with pytest.raises(BundleError):
        read_bundle_files(bytes(data), max_member_bytes=100)


def test_not_a_bundle():
    with pytest.raises(BundleError, match="zip"):
        load_bundle(b"not a zip")
    with pytest.raises(BundleError, match="no bundle"):
        load_bundle("/nonexistent/bundle")
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(make_zip({"weights.pt": b""}))


# ---------------------------------------------------------------- model.json


@pytest.mark.parametrize("changes, field", [
    ({"colour": "red"}, "colour"),
    ({"labels": ["a", "b"]}, "labels"),
    ({"labels": ["0"] * 10}, "labels"),
    ({"sigma": {"default": 0.5, "min": 0.9, "max": 0.1}}, "sigma"),
    ({"sigma": {"min": 0.1}}, "default"),
    ({"sigma": {"default": float("nan")}}, "sigma.default"),
    ({"input_shape": None}, "input_shape"),
    ({"input_shape": [1, 8]}, "input_shape"),
    ({"input_shape": [1, 8, True]}, "input_shape"),
    ({"kind": "drs", "input_shape": [1, 8, 7]}, "input_shape"),
    ({"num_classes": 1}, "num_classes"),
    ({"kind": "ensemble"}, "kind"),
    ({"name": "../x"}, "name"),
    ({"normalize": {"mean": [0.5, 0.5], "std": [0.5, 0.5]}}, "normalize"),
    ({"normalize": {"mean": [0.5], "std": [0.0]}}, "normalize"),
    ({"normalize": {"mean": [0.5]}}, "normalize"),
    ({"architecture": None, "architecture_args": {"width": 8}}, "architecture_args"),
])
def test_model_json_errors_name_the_field(changes, field):
    obj = spec_json(**changes)
    if changes.get("input_shape", 0) is None:
        del obj["input_shape"]
    with pytest.raises(BundleError, match=field):
        ModelSpec.from_json(obj)


def test_model_json_error_through_load_bundle():
    with pytest.raises(BundleError, match="colour"):
        load_bundle(make_zip({"model.json": json.dumps(spec_json(colour="red")).encode()}))
    with pytest.raises(BundleError, match="JSON"):
        load_bundle(make_zip({"model.json": b"{not json"}))


def test_spec_round_trip_and_defaults():
    spec = ModelSpec.from_json(spec_json(sigma={"default": 0.3},
                                         labels=[f"c{i}" for i in range(10)],
                                         normalize={"mean": [0.1], "std": [0.2]},
                                         architecture_args={"width": 8}))
    assert spec.sigma == SigmaRange(0.3, 0.3, 0.3)
    assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.network_shape == SHAPE and spec.half_shape == (1, 8, 4)
    bare = ModelSpec.from_json({"name": "m", "input_shape": [3, 5, 5], "num_classes": 2,
                                "sigma": {"default": 1}})
    assert bare.kind == "standard" and bare.labels == ("0", "1") and bare.normalize is None
    with pytest.raises(BundleError, match="odd"):
        _ = bare.half_shape


def test_save_refusals(tmp_path):
    with pytest.raises(BundleError, match="architecture"):
        save_bundle(tmp_path, digits_spec(architecture=None), digits_net(), fmt="state_dict")
    with pytest.raises(BundleError, match=r"nn.Modules for \(left, right\)"):
        save_bundle(tmp_path, digits_spec(kind="drs"), digits_net(), fmt="pt2")
    with pytest.raises(BundleError, match="does not fit"):
        save_bundle(tmp_path, digits_spec(), digits_net(width=16), fmt="state_dict")
