"""Reading a bundle's files safely from a directory or a zip, and its content digest.

Torch-free, so the API can vet an upload and compute its digest without loading torch.
Zips with unsafe paths, symlinks, encrypted or duplicate members, or more than the size and
count limits are refused whole; declared sizes are not trusted. A network file that is itself
a zip (torch.save's and torch.export's formats) is refused when it holds two members of one
name (`check_zip_members`): Python's zipfile reads the last of them, torch's reader may read
another, so what a check read would not be what torch loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickletools
import re
import stat
import zipfile
from collections.abc import Mapping
from typing import Any

from smoothcert.manifest import BundleError, ModelSpec

MAX_MEMBER_BYTES = 512 * 2**20
MAX_TOTAL_BYTES = 2**30
MAX_MEMBERS = 64
_CHUNK = 2**20
# What zipfile raises on a damaged or unsupported zip (UnicodeDecodeError: a name flagged
# UTF-8 that is not; NotImplementedError: an unknown version or compression method).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, OSError, EOFError,
               UnicodeDecodeError, NotImplementedError)
NETWORK_FILES = ("model.pt2", "weights.pt", "left.pt2", "right.pt2", "left.pt", "right.pt")
_SELECTOR_FILE = re.compile(r"(?:estimator|expert\d*)\.pt2?")


def read_bundle_files(
    source: str | os.PathLike | bytes, *, max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES, max_members: int = MAX_MEMBERS,
) -> dict[str, bytes]:
    """The top-level files of a bundle directory or zip (path or bytes), name → content.

    A zip whose files all sit under one folder is read from that folder. Zips with absolute
    or `..` paths, symlinks, duplicate member names (see `check_zip_members`) or encrypted
    members, or more than the size and count limits are refused whole. A directory is the
    caller's own: its symlinks are followed, its dot-files (.DS_Store, save_bundle's
    temporaries) skipped.
    """
    limits = (max_member_bytes, max_total_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_zip(io.BytesIO(bytes(source)), max_members, limits)
    path = os.fspath(source)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            return _read_zip(fh, max_members, limits)
    if not os.path.isdir(path):
        raise BundleError(f"no bundle at {path!r}: give a directory or a .zip")
    entries = [e for e in os.scandir(path) if e.is_file() and not e.name.startswith(".")]
    if len(entries) > max_members:
        raise BundleError(f"bundle directory holds more than {max_members} files")
    return _read_members({e.name: (e.stat().st_size, lambda p=e.path: open(p, "rb"))
                          for e in entries}, *limits)


def _read_members(members: dict[str, tuple[int, Any]], max_member_bytes: int,
                  max_total_bytes: int) -> dict[str, bytes]:
    """Read name → (declared size, opener), refusing anything over the limits."""
    for name, (size, _) in members.items():
        if size > max_member_bytes:
            raise BundleError(f"bundle member {name!r} is larger than {max_member_bytes} bytes")
    if sum(size for size, _ in members.values()) > max_total_bytes:
        raise BundleError(f"bundle files total more than {max_total_bytes} bytes")
    files, total = {}, 0
    for name, (_, opener) in sorted(members.items()):
        parts, size = [], 0
        with opener() as fh:  # declared sizes may lie: count the bytes as they come
            while chunk := fh.read(_CHUNK):
                size, total = size + len(chunk), total + len(chunk)
                if size > max_member_bytes or total > max_total_bytes:
                    raise BundleError(f"bundle member {name!r} is larger than declared and "
                                      "than the size limits")
                parts.append(chunk)
        files[name] = b"".join(parts)
    return files


def _read_zip(fh: Any, max_members: int, limits: tuple[int, int]) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise BundleError(f"bundle zip has {len(infos)} members, at most {max_members}")
            _refuse_duplicates(infos, "bundle zip")
            for info in infos:
                name, parts = info.filename, info.filename.replace("\\", "/").split("/")
                if name.startswith(("/", "\\")) or ":" in name or ".." in parts or "\0" in name:
                    raise BundleError(f"bundle zip member {name!r} has an unsafe path")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise BundleError(f"bundle zip member {name!r} is a symbolic link")
                if info.flag_bits & 0x1:
                    raise BundleError(f"bundle zip member {name!r} is encrypted")
            names = [i.filename for i in infos
                     if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
            prefix = ""  # `zip -r b.zip digits/` puts every file under digits/
            if "model.json" not in names and len({n.split("/")[0] for n in names}) == 1 \
                    and all("/" in n for n in names):
                prefix = names[0].split("/")[0] + "/"
            chosen = {n[len(prefix):]: zf.getinfo(n) for n in names
                      if n.startswith(prefix) and "/" not in n[len(prefix):]}
            openers = {n: (i.file_size, lambda i=i: zf.open(i)) for n, i in chosen.items()}
            return _read_members(openers, *limits)
    except _ZIP_ERRORS as e:
        raise BundleError(f"bundle is neither a directory nor a readable zip ({e})") from None


def check_zip_members(data: bytes, fname: str) -> None:
    """Refuse `data` if it is a zip holding two members of one name, either as Python's
    zipfile reads names or as torch's zip reader (miniz) compares them: the stored bytes,
    ASCII letter case ignored. zipfile opens the last such member and torch may open another,
    so a check could vet one pickle while torch loads the other. Data that zipfile cannot read
    as a zip passes here: the state-dict and .pt2 checks refuse it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except _ZIP_ERRORS:
        return
    _refuse_duplicates(infos, f"{fname} is a zip that")


def _refuse_duplicates(infos: list[zipfile.ZipInfo], what: str) -> None:
    # Two views of each name: zipfile's (decoded, cut at a NUL; `open(name)` finds the last
    # member so named) and miniz's (the stored bytes: zipfile decodes them as UTF-8 when the
    # flag says so, else as cp437, a bijection on bytes; compared with ASCII letters folded).
    by_text: dict[str, zipfile.ZipInfo] = {}
    by_bytes: dict[bytes, zipfile.ZipInfo] = {}
    for info in infos:
        stored = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437").lower()
        first = by_text.get(info.filename) or by_bytes.get(stored)
        if first is not None:
            if first.filename == info.filename:
                raise BundleError(f"{what} holds the member {info.filename!r} twice; a zip must "
                                  "name each member once")
            raise BundleError(f"{what} holds the members {first.filename!r} and {info.filename!r}, "
                              "names that torch's zip reader takes for one (it ignores letter case); "
                              "a zip must name each member once")
        by_text[info.filename] = by_bytes[stored] = info


def bundle_digest(files: Mapping[str, bytes]) -> str:
    """"sha256:<hex>" over (name, NUL, 8-byte big-endian length, content), sorted by name."""
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def zip_bundle(directory: str | os.PathLike) -> bytes:
    """A deterministic zip of a bundle directory: sorted, fixed timestamps and modes, stored
    uncompressed (weights barely deflate and deflating hundreds of MB takes seconds)."""
    if not os.path.isdir(directory):
        raise BundleError(f"{os.fspath(directory)!r} is not a directory")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted(read_bundle_files(directory).items()):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system, info.external_attr = 3, (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    return out.getvalue()


# ------------------------------------------------------------ which files are the model


def is_torchscript(data: bytes) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except _ZIP_ERRORS:
        return False


def torchscript_error(fname: str) -> BundleError:
    return BundleError(f"{fname} is TorchScript, which bundles do not accept: export the network "
                       "with torch.export.export(net.eval(), ...) and torch.export.save it as "
                       "model.pt2, or use smoothcert.bundle.save_bundle(..., fmt='pt2')")


def network_names(roles: list[str], fmt: str) -> list[str]:
    """The file names of networks in `roles` (ModelSpec.roles) saved as `fmt` ("pt2" or
    "state_dict"): `<role>.pt2`, or `<role>.pt` (a standard model's state dict: weights.pt)."""
    if fmt == "pt2":
        return [f"{r}.pt2" for r in roles]
    return ["weights.pt" if r == "model" else f"{r}.pt" for r in roles]


def is_network_file(name: str) -> bool:
    """Whether `name` is a network file of some bundle kind (a stray one makes a bundle ambiguous)."""
    return name in NETWORK_FILES or bool(_SELECTOR_FILE.fullmatch(name))


def network_files(spec: ModelSpec, files: Mapping[str, bytes]) -> list[str]:
    if spec.kind == "remote":  # the network is served elsewhere: model.json is the whole bundle
        if stray := sorted(n for n in files if is_network_file(n)):
            raise BundleError(f"a remote bundle holds no network file, found {stray}")
        return []
    pt2, sd = network_names(spec.roles, "pt2"), network_names(spec.roles, "state_dict")
    wanted, other = (sd, pt2) if spec.architecture is not None else (pt2, sd)
    has_wanted, has_other = all(n in files for n in wanted), [n for n in other if n in files]
    if has_wanted and not has_other:
        if stray := sorted(n for n in files if is_network_file(n) and n not in wanted):
            raise BundleError(f"bundle holds {', '.join(stray)}, which a {spec.kind} bundle with these "
                              f"networks ({', '.join(wanted)}) does not use: remove them")
        return wanted
    if has_wanted:
        raise BundleError(f"bundle holds both {wanted} and {has_other}: keep one network form")
    if legacy := [n for n in sorted(files) if is_torchscript(files[n])]:
        raise torchscript_error(legacy[0])
    if has_other:
        raise BundleError(
            f"model.json {'names' if spec.architecture else 'has no'} 'architecture', so the "
            f"bundle needs {', '.join(wanted)}, not {', '.join(has_other)}: "
            + ("drop 'architecture' to use them" if spec.architecture else "add 'architecture'"))
    raise BundleError(f"bundle lacks {', '.join(n for n in wanted if n not in files)}: a "
                      f"{spec.kind} bundle holds {', '.join(pt2)} (torch.export programs) or "
                      f"'architecture' in model.json plus {', '.join(sd)} (state dicts)")


# ------------------------------------------------------------ state dicts, without torch

# What torch.load(weights_only=True) may import (torch/_weights_only_unpickler.py): tensor
# rebuilders, storages, dtypes, layouts, devices, OrderedDict and a few builtins. The worker's
# weights_only load stays the authority; this lets the torch-free API refuse a hostile or
# pickled-module upload at once instead of registering it.
_STATE_DICT_GLOBAL = re.compile(
    r"collections\.(?:OrderedDict|Counter)|builtins\.(?:bytearray|set|complex)|_codecs\.encode"
    r"|torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_from_type_v2"
    r"|torch\.nn\.parameter\.Parameter|torch\.serialization\._get_layout|torch\.(?:Size|device)"
    r"|torch\.(?:cuda\.)?\w*(?:Storage|Tensor)|torch\.storage\.\w*Storage|torch\.per_\w+"
    r"|torch\.(?:float|int|uint|bool|bfloat|complex|half|double|long|short|cfloat|cdouble|chalf"
    r"|qint|quint|bits)\w*")
# Opcodes that import by other means than GLOBAL; torch's weights-only unpickler refuses them too.
_IMPORTING_OPCODES = frozenset({"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"})
_LEGACY_PICKLES = 5  # torch.save's pre-zip format: magic, protocol, sys info, object, storage keys
_MAX_PICKLE_BYTES = 64 * 2**20  # a state dict's pickle holds names and shapes, not tensor data


def _read_capped(zf: zipfile.ZipFile, name: str, limit: int, refuse) -> bytes:
    """A member's bytes, refused past `limit` as they decompress (declared sizes may lie)."""
    parts, size = [], 0
    with zf.open(name) as fh:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise refuse(f"its {name} unpacks to more than {limit} bytes")
            parts.append(chunk)
    return b"".join(parts)


def check_state_dict(data: bytes, fname: str) -> None:
    """Refuse a state-dict file whose pickle imports anything a state dict does not need
    (an `os.system` payload, a whole pickled nn.Module), reading its opcodes, never running
    them, and a zip that names a member twice (`check_zip_members`), whose pickle torch might
    read from another member than this check. Every `.pkl` member is read, whatever the letter
    case (torch finds `data.pkl` ignoring it). Torch-free, for the API's upload check;
    `load_bundle` still loads with weights_only."""
    def refuse(what: str) -> BundleError:
        return BundleError(f"{fname} must be a state dict of tensors, but {what}; save it with "
                           "torch.save(model.state_dict(), ...)")

    check_zip_members(data, fname)
    if is_torchscript(data):
        raise torchscript_error(fname)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if n.lower().endswith(".pkl")]
            if not names:
                raise refuse("it is a zip without torch.save's data.pkl")
            pickles = [_read_capped(zf, n, _MAX_PICKLE_BYTES, refuse) for n in names]
        streams = [(io.BytesIO(p), 1) for p in pickles]
    except _ZIP_ERRORS:
        streams = [(io.BytesIO(data), _LEGACY_PICKLES)]  # torch.save's legacy format, or a bare pickle
    for stream, count in streams:
        for k in range(count):
            if k and stream.tell() >= len(stream.getbuffer()):
                break
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    name = str(arg).replace(" ", ".")
                    if opcode.name in _IMPORTING_OPCODES:
                        raise refuse(f"its pickle uses {opcode.name}")
                    if opcode.name == "GLOBAL" and not _STATE_DICT_GLOBAL.fullmatch(name):
                        raise refuse(f"it pickles other objects such as {name}")
            except BundleError:
                raise
            except Exception as e:  # not a pickle: pickletools names the bad byte
                if k:
                    break  # the legacy format's raw tensor bytes follow its pickles
                raise refuse(f"it is not a torch.save file ({type(e).__name__}: {e})") from None


def inspect_bundle(files: Mapping[str, bytes]) -> tuple[ModelSpec, list[str], str]:
    """(spec, network file names, digest) of a bundle's files, without loading anything.

    The digest covers model.json and the network files the loader uses, nothing else (a
    README beside them does not change which model this is). The registry and the loader
    both name a bundle by it. A network file that is a zip naming a member twice is refused
    (`check_zip_members`), so neither the upload check nor the loader reads one.
    """
    if "model.json" not in files:
        raise BundleError(f"bundle has no model.json at its top level (found {sorted(files)})")
    try:
        raw = json.loads(files["model.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"model.json is not valid UTF-8 JSON ({e})") from None
    spec = ModelSpec.from_json(raw)
    names = network_files(spec, files)
    for name in names:
        check_zip_members(files[name], name)
    return spec, names, bundle_digest({n: files[n] for n in ["model.json", *names]})
