"""Vetting a torch.export archive (`.pt2`) before torch is allowed to load it.

`torch.export.load` is not safe on untrusted files: it unpickles `use_pickle` payloads,
custom objects and legacy files with full pickle, retries sample inputs with
weights_only=False, loads AOTInductor shared libraries, `exec`s guard code and `sympify`s
(i.e. `eval`s) shape expressions. `check_pt2` admits only what `torch.export.save` writes for
a plain network: tensor payloads, aten and symbolic-shape operators, and srepr-style shape
expressions. It is written against torch 2.15's loader; re-check it on every torch upgrade.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import torch

from smoothcert.manifest import BundleError

_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version",
              ".data/serialization_id", "models/model.json"}
_PT2_DIRS = ("data/weights/", "data/constants/", "data/sample_inputs/", "extra/")
_SAFE_TARGET = re.compile(
    r"torch\.ops\.aten\.\w+\.\w+|torch\.sym_\w+|math\.(?:ceil|floor|trunc|sqrt)|_operator\."
    r"(?:add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|not_|getitem)")
_UNSAFE_ATEN = ("torch.ops.aten.from_file.",)  # reads a host file into a tensor
_SAFE_SPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}
_EXPR_TOKEN = re.compile(
    r"\s+|'[\w.+\-]*'|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[A-Za-z]\w*|[(),=+\-*/%<>!]")
_EXPR_NAMES = frozenset([
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Min", "Max", "Abs", "Mod",
    "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise",
    "ExprCondPair", "true", "false", "True", "False", "oo", "zoo", "nan", "Infinity",
    "NegativeInfinity", "IntInfinity", "NegativeIntInfinity", "positive", "negative", "integer",
    "real", "nonnegative", "nonpositive", "finite", "nonzero", "precision", "FloorDiv",
    "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "IntTrueDiv", "FloatTrueDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "FloatPow",
    "PowByNatural", "Identity",
])


def _walk(obj: Any):
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def check_pt2(data: bytes, fname: str) -> None:
    """Refuse archives that would make torch.export.load run code, not just read tensors.

    torch.export.load unpickles `use_pickle` payloads, custom/opaque objects and legacy
    files with full pickle, retries sample inputs with weights_only=False, loads AOTInductor
    shared libraries, `exec`s guard code and `sympify`s (i.e. `eval`s) shape expressions.
    Only plain tensor payloads, aten/symbolic operators and srepr-style expressions pass.
    """
    from torch.export.pt2_archive import PT2ArchiveReader

    def refuse(why: str) -> BundleError:
        return BundleError(f"{fname} is refused: {why}. Export a plain network with "
                           "torch.export.export and torch.export.save (or save_bundle)")

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            legacy = "version" in zf.namelist()  # torch's pre-2.7 loader unpickles everything
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except (zipfile.BadZipFile, RuntimeError, AssertionError, OSError) as e:
        raise BundleError(f"{fname} is not a torch.export archive ({e}); save the program "
                          "with torch.export.save") from None
    if legacy:
        raise refuse("it uses the legacy pre-2.7 export format")
    for name in names:
        if name not in _PT2_FIXED and not name.startswith(_PT2_DIRS):
            raise refuse(f"it holds {name!r} (AOTInductor code, extra programs and other "
                         "members are not accepted)")
        if name.startswith(("data/weights/", "data/constants/")) and name.endswith(".pt"):
            raise refuse(f"{name!r} is a pickled legacy payload")
    try:
        for cfg, is_constant in (("data/weights/model_weights_config.json", False),
                                 ("data/constants/model_constants_config.json", True)):
            for fqn, meta in json.loads(reader.read_string(cfg))["config"].items():
                if meta.get("use_pickle") or (
                        is_constant and not str(meta.get("path_name")).startswith("tensor_")):
                    raise refuse(f"{fqn!r} is a pickled object, not a plain tensor")
        if sample := reader.read_bytes("data/sample_inputs/model.pt"):
            try:  # torch retries with weights_only=False when this fails: never let it
                torch.load(io.BytesIO(sample), weights_only=True, map_location="cpu")
            except Exception:
                raise refuse("its sample inputs are not plain tensors") from None
        program = json.loads(reader.read_string("models/model.json"))
        if program.get("guards_code"):
            raise refuse("it carries input guard code (export with only a dynamic batch dimension)")
        for node in _walk(program):
            target = node.get("target")
            if isinstance(target, str) and (not _SAFE_TARGET.fullmatch(target)
                                            or target.startswith(_UNSAFE_ATEN)):
                raise refuse(f"it calls {target!r}; only aten and symbolic-shape operators pass")
            if "as_custom_obj" in node or node.get("custom_obj_values"):
                raise refuse("it holds custom (torchbind) objects")
            if "expr_str" in node:
                _check_expr(str(node["expr_str"]), refuse)
            for spec in (node[k] for k in ("in_spec", "out_spec") if isinstance(node.get(k), str)):
                for sub in _walk(json.loads(spec)):
                    if (sub.get("type") not in _SAFE_SPEC_TYPES
                            or "__enum__" in str(sub.get("context"))):
                        raise refuse(f"its input/output structure uses type {sub.get('type')!r}")
    except BundleError:
        raise
    except Exception as e:  # missing member, bad JSON, wrong types: not torch.export.save's
        raise refuse(f"its layout is not torch.export.save's ({type(e).__name__}: {e})") from None


def _check_expr(expr: str, refuse) -> None:
    # sympify evaluates the string as Python: allow only srepr tokens of shape arithmetic.
    pos = 0
    while pos < len(expr):
        match = _EXPR_TOKEN.match(expr, pos)
        token = match.group() if match else expr[pos:pos + 20]
        if not match or (token[0].isalpha() and token not in _EXPR_NAMES):
            raise refuse(f"its shape expression {expr[:80]!r} has {token!r}")
        pos = match.end()
