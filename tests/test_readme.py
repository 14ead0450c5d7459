"""The README's Python example runs as written (against a small bundle of our own)."""

from __future__ import annotations

import pathlib
import re

import torch

from smoothcert.architectures import build_architecture
from smoothcert.bundle import ModelSpec, save_bundle

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first Python code block after `heading` in the README."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.DOTALL).group(1)


def test_python_example_runs(tmp_path):
    block = python_block("## The engine in Python")
    spec = ModelSpec.from_json({"name": "digits", "input_shape": [1, 8, 8], "num_classes": 10,
                                "sigma": {"default": 0.25, "min": 0.05, "max": 1.0},
                                "normalize": {"mean": [0.5], "std": [0.5]}, "architecture": "digits_cnn"})
    torch.manual_seed(0)
    save_bundle(tmp_path / "b", spec, build_architecture("digits_cnn", (1, 8, 8), 10).eval(), fmt="state_dict")
    code = block.replace("path/to/bundle", str(tmp_path / "b")).replace("n=100_000", "n=2_000")
    code = code.replace("SigmaSearch(\"ddrs\")", "SigmaSearch(\"ddrs\", steps=3)")
    code = code.replace("memory=memory, alpha=0.001)", "memory=memory, alpha=0.001, n=2_000)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["cert"].memory.outcome in ("new", "inside", "shrunk")
