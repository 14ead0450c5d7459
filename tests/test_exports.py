"""Every name the packages export lazily (PEP 562) exists: a typo in an export table would
only show when a user first touches the name."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["smoothcert", "clients"])
def test_every_exported_name_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
