"""smoothcert: certified predictions by Gaussian randomized smoothing.

The engine: pure PyTorch and SciPy, importing nothing from the service, the workers or the
clients. Attributes load lazily so that torch-free modules (`bounds`, `imageio`) can be
imported without paying for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Certificate": "smoothcert.results",
    "Prediction": "smoothcert.results",
    "certify": "smoothcert.smoothing",
    "predict": "smoothcert.smoothing",
    "certify_drs": "smoothcert.drs",
    "search_sigma": "smoothcert.sigma",
    "Memory": "smoothcert.memory",
    "load_bundle": "smoothcert.bundle",
    "save_bundle": "smoothcert.bundle",
    "Certifier": "smoothcert.certifier",
    "InvalidParameters": "smoothcert.bounds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'smoothcert' has no attribute {name!r}")
