"""`check_state_dict`: the torch-free upload check of state dicts. Everything torch.save writes
for a state dict passes; anything whose pickle imports more is refused, without unpickling.
A zip (a network file, or the bundle itself) that names a member twice is refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
import zipfile

import pytest
import torch
from torch import nn

from smoothcert.archive import check_state_dict, inspect_bundle, read_bundle_files
from smoothcert.bundle import load_bundle
from smoothcert.manifest import BundleError


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def saved(obj, **kwargs) -> bytes:
    out = io.BytesIO()
    torch.save(obj, out, **kwargs)
    return out.getvalue()


NET = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))


@pytest.mark.parametrize("data", [
    saved(NET.state_dict()),
    saved(NET.state_dict(), _use_new_zipfile_serialization=False),  # torch.save's legacy format
    saved({"w": torch.zeros(2, dtype=torch.bfloat16), "i": torch.arange(3), "b": torch.ones(1, dtype=torch.bool),
           "p": nn.Parameter(torch.ones(1)), "h": torch.zeros(2, dtype=torch.float16)}),
    saved({"state_dict": NET.state_dict(), "epoch": 3}),  # not a state dict, but harmless: the loader says why
], ids=["state dict", "legacy format", "dtypes and a parameter", "checkpoint"])
def test_what_torch_save_writes_for_tensors_passes(data):
    check_state_dict(data, "weights.pt")
    torch.load(io.BytesIO(data), weights_only=True)  # and torch agrees


@pytest.mark.parametrize("data, words", [
    (saved(NET), "torch.nn.modules.container.Sequential"),
    (saved(Payload()), "posix.system"),
    (pickle.dumps(Payload(), protocol=2), "posix.system"),
    (pickle.dumps(Payload(), protocol=5), "STACK_GLOBAL"),
    (pickle.dumps(Payload(), protocol=0), "posix.system"),
    (b"not really weights", "not a torch.save file"),
    (b"", "not a torch.save file"),
], ids=["pickled module", "payload in torch.save", "protocol 2", "protocol 5", "protocol 0", "junk", "empty"])
def test_anything_that_imports_more_is_refused(data, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError, match="must be a state dict") as refused:
        check_state_dict(data, "weights.pt")
    assert words in str(refused.value)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------ a zip that names a member twice


def rezipped(members: list[tuple[str, bytes]]) -> bytes:
    """A zip of (name, content) in this order, names repeated as given."""
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # the point of these tests
        with zipfile.ZipFile(out, "w") as zf:
            for name, content in members:
                zf.writestr(name, content)
    return out.getvalue()


def members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(n, zf.read(n)) for n in zf.namelist()]


STATE = saved({"w": torch.ones(2)})
PICKLE = next(n for n, _ in members(STATE) if n.endswith("/data.pkl"))  # "archive/data.pkl"
OTHER_PICKLE = dict(members(saved({"v": torch.ones(2)})))[PICKLE]  # another dict over the same storage


def with_second_pickle(pickle_bytes: bytes, at: int | None = None, name: str = PICKLE) -> bytes:
    """STATE with another member `name` inserted at position `at` (default: appended)."""
    entries = members(STATE)
    entries.insert(len(entries) if at is None else at, (name, pickle_bytes))
    return rezipped(entries)


def test_a_clean_state_dict_passes_and_its_rezipped_copy_too():
    check_state_dict(STATE, "weights.pt")
    check_state_dict(rezipped(members(STATE)), "weights.pt")  # rezipping alone changes nothing
    assert torch.load(io.BytesIO(rezipped(members(STATE))), weights_only=True)["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("second", [OTHER_PICKLE, pickle.dumps(Payload(), protocol=2)], ids=["benign", "payload"])
def test_a_pickle_member_named_twice_is_refused_naming_it(second):
    for at in (0, 1, None):
        with pytest.raises(BundleError, match=f"weights.pt is a zip that holds the member '{PICKLE}' twice"):
            check_state_dict(with_second_pickle(second, at), "weights.pt")


def test_zipfile_and_torch_can_read_different_members_of_one_name():
    # zipfile reads the last member of a name; torch's reader (a binary search over the sorted
    # names) reads another in some layouts: there the check would vet a pickle torch never loads.
    read = {}
    for at in range(len(members(STATE)) + 1):
        data = with_second_pickle(OTHER_PICKLE, at)
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            checked = "v" if zf.read(PICKLE) == OTHER_PICKLE else "w"
        read[at] = (checked, next(iter(torch.load(io.BytesIO(data), weights_only=True))))
    assert any(checked != loaded for checked, loaded in read.values()), read


def test_names_equal_up_to_letter_case_are_refused_as_torch_reads_them_as_one():
    upper = PICKLE[:-3] + "PKL"
    renamed = rezipped([(upper if n == PICKLE else n, c) for n, c in members(STATE)])
    assert list(torch.load(io.BytesIO(renamed), weights_only=True)) == ["w"]  # torch finds data.pkl ignoring case
    with pytest.raises(BundleError, match=f"members '{PICKLE}' and '{upper}'"):
        check_state_dict(with_second_pickle(pickle.dumps(Payload(), protocol=2), name=upper), "weights.pt")
    # Alone, a pickle named in capitals is still read and checked.
    hostile = dict(members(saved(Payload())))[PICKLE]
    payload = rezipped([(upper, hostile)] + [m for m in members(STATE) if m[0] != PICKLE])
    with pytest.raises(BundleError, match="posix.system"):
        check_state_dict(payload, "weights.pt")


SPEC = {"name": "d", "kind": "standard", "input_shape": [1, 2, 2], "num_classes": 2,
        "sigma": {"default": 0.25, "min": 0.05, "max": 1.0}}


@pytest.mark.parametrize("fname, spec", [("weights.pt", SPEC | {"architecture": "linear"}), ("model.pt2", SPEC)])
def test_the_loader_and_the_upload_check_refuse_a_network_file_naming_a_member_twice(fname, spec):
    files = {"model.json": json.dumps(spec).encode(), fname: with_second_pickle(OTHER_PICKLE)}
    with pytest.raises(BundleError, match=f"{fname} is a zip that holds the member '{PICKLE}' twice"):
        inspect_bundle(files)  # vet_bundle and load_bundle both start here
    bundle = rezipped(list(files.items()))
    with pytest.raises(BundleError, match="holds the member"):
        load_bundle(bundle)
    inspect_bundle(files | {fname: STATE})  # the same bundle with a clean file passes


@pytest.mark.parametrize("names", [["model.json", "model.json"], ["README.md", "readme.md"]], ids=["same", "case"])
def test_a_bundle_zip_naming_a_member_twice_is_refused(names):
    data = rezipped([("weights.pt", STATE)] + [(n, json.dumps(SPEC).encode()) for n in names])
    with pytest.raises(BundleError, match=f"bundle zip holds the members? '{names[0]}'"):
        read_bundle_files(data)


def test_a_name_flagged_utf8_that_is_not_is_refused_not_a_crash():
    data = rezipped([("model.json", b"{}"), ("é.pkl", b"x")]).replace("é".encode(), b"\xff\xfe")
    with pytest.raises(UnicodeDecodeError):
        zipfile.ZipFile(io.BytesIO(data))
    with pytest.raises(BundleError, match="neither a directory nor a readable zip"):
        read_bundle_files(data)
    with pytest.raises(BundleError, match="not a torch.save file"):
        check_state_dict(data, "weights.pt")
