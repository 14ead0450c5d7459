"""The per-process model runtime (the shape of kserve's `Model`: `load()`, `ready`, then
`certify()` / `predict()`).

Guarantees: a bundle is loaded lazily, inside the worker process that uses it (never in a
parent before fork: CUDA contexts and Redis connections do not survive a fork), at most once
per process while it stays cached, and from the registry by content digest, so a cached
model is always the bytes a job names. A bundle that cannot be loaded raises BundleError
and is not cached. Each model keeps its local copy of the shared memory next to it; a
runtime serves one job at a time (prefork or solo pool), so neither is locked.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from service.config import Settings
from service.store import Store
from smoothcert.bundle import BundleError, load_bundle
from smoothcert.certifier import Certifier, default_device
from smoothcert.results import Certificate, Prediction
from workers.shared_memory import SharedMemory, certify_with_memory

log = logging.getLogger(__name__)

MAX_MODELS = 4  # bundles cached per process; the least recently used is dropped first


class LoadedModel:
    """One bundle on this process's device, with its shared-memory copy."""

    def __init__(self, digest: str, store: Store, settings: Settings):
        self.digest, self.store, self.settings = digest, store, settings
        self.certifier: Certifier | None = None
        self.memory: SharedMemory | None = None

    @property
    def ready(self) -> bool:
        return self.certifier is not None

    def load(self) -> None:
        """Fetch the bundle by digest and load it; BundleError says why it cannot be used."""
        data = self.store.get_bundle(self.digest)
        if data is None:
            raise BundleError(f"the model bundle {self.digest} is not in the registry")
        device = torch.device(self.settings.device) if self.settings.device else default_device()
        certifier = Certifier(load_bundle(data, device=device), device=device)
        if certifier.bundle.digest != self.digest:
            # The registry and the certificate must name the same digest (DESIGN.md).
            log.warning("bundle stored as %s has content digest %s", self.digest, certifier.bundle.digest)
        self.memory = SharedMemory(
            self.store, certifier.namespace, math.prod(certifier.spec.input_shape),
            capacity=self.settings.memory_capacity, device=certifier.device,
        )
        self.certifier = certifier

    def certify(self, x: np.ndarray, job_id: str, *, memory: bool,
                on_commit: Callable[[int], None] | None = None, **kwargs) -> Certificate:
        """Certifier.certify, through the shared memory when `memory` is set."""
        if memory:
            return certify_with_memory(self.certifier, self.memory, x, job_id, on_commit=on_commit, **kwargs)
        return self.certifier.certify(x, **kwargs)

    def predict(self, x: np.ndarray, **kwargs) -> Prediction:
        return self.certifier.predict(x, **kwargs)


class ModelRuntime:
    """Loaded models of this process, by digest (an LRU of MAX_MODELS)."""

    def __init__(self, store: Store, settings: Settings, max_models: int = MAX_MODELS):
        self.store, self.settings, self.max_models = store, settings, max_models
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, digest: str) -> LoadedModel:
        """The model with this digest, loaded now if it is not cached."""
        model = self._models.get(digest)
        if model is None:
            model = LoadedModel(digest, self.store, self.settings)
            model.load()
            self._models[digest] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        self._models.move_to_end(digest)
        return model
