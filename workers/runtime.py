"""The per-process model runtime (the shape of kserve's `Model`: `load()`, `ready`, then
`certify()` / `predict()`).

Guarantees: a bundle is loaded lazily, inside the worker process that uses it (never in a
parent before fork: CUDA contexts and Redis connections do not survive a fork), at most once
per process and numeric mode while it stays cached, and from the registry by content
digest, so a cached model is always the bytes a job names. A bundle that cannot be loaded
raises BundleError and is not cached. Loading measures the automatic batch size and, for
compiled modes, compiles: that cost is paid once per worker, not per job.

Jobs may run as threads of one process (`celery worker --pool threads`): the cache is
locked, each model's shared-memory copy locks itself, and with `cross_batching` every
forward pass goes through one BatchScheduler thread that merges concurrent jobs' batches.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from service.config import Settings
from service.durability import DurabilityGuard
from service.store import Store
from smoothcert.batching import BatchScheduler
from smoothcert.bounds import InvalidParameters
from smoothcert.bundle import BundleError, load_bundle
from smoothcert.certifier import Certifier, default_device
from smoothcert.endpoints import RemoteOptions
from smoothcert.modes import canonical_mode
from smoothcert.results import Certificate, Prediction
from workers.shared_memory import SharedMemory, certify_with_memory

log = logging.getLogger(__name__)

MAX_MODELS = 4  # (bundle, numeric mode) pairs cached per process; least recently used dropped first


class LoadedModel:
    """One bundle in one numeric mode on this process's device, with its shared-memory copies
    (one per α of `memory_alphas`, made on first use)."""

    def __init__(self, digest: str, store: Store, settings: Settings, *, numeric_mode: str = "fp32",
                 scheduler: BatchScheduler | None = None, durability: DurabilityGuard | None = None):
        self.digest, self.store, self.settings = digest, store, settings
        self.numeric_mode, self.scheduler, self.durability = numeric_mode, scheduler, durability
        self.certifier: Certifier | None = None
        self.memories: dict[float, SharedMemory] = {}
        self._memories_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self.certifier is not None

    def load(self) -> None:
        """Fetch the bundle by digest and load it; BundleError says why it cannot be used,
        InvalidParameters that this device cannot run the numeric mode."""
        data = self.store.get_bundle(self.digest)
        if data is None:
            raise BundleError(f"the model bundle {self.digest} is not in the registry")
        device = torch.device(self.settings.device) if self.settings.device else default_device()
        remote = RemoteOptions(allow=tuple(self.settings.remote_endpoints), tokens=self.settings.remote_tokens,
                               ca_file=self.settings.remote_ca_file)
        certifier = Certifier(load_bundle(data, device=device, remote=remote), device=device,
                              numeric_mode=self.numeric_mode)
        if certifier.bundle.digest != self.digest:
            # The registry and the certificate must name the same digest (docs/bundles.md).
            log.warning("bundle stored as %s has content digest %s", self.digest, certifier.bundle.digest)
        certifier.warm_up()
        if self.scheduler is not None:
            certifier.route_through(self.scheduler)
        log.info("model %s (%s) on %s: batch size %d, merged passes up to %d rows", self.digest,
                 certifier.numeric_mode, device, certifier.batch.rows, certifier.batch.max_rows)
        self.certifier = certifier

    def memory(self, alpha: float) -> SharedMemory:
        """This model's shared memory at level α (one of the settings' `memory_alphas`)."""
        if alpha not in self.settings.memory_alphas:
            raise InvalidParameters(
                f"alpha: with the memory on, alpha must be one of "
                f"{', '.join(map(repr, self.settings.memory_alphas))} (SMOOTHCERT_MEMORY_ALPHAS), got {alpha!r}")
        with self._memories_lock:
            if alpha not in self.memories:
                s, certifier = self.settings, self.certifier
                self.memories[alpha] = SharedMemory(
                    self.store, certifier.memory_namespace(alpha), math.prod(certifier.spec.input_shape),
                    capacity=s.memory_capacity, min_n=s.memory_min_n, quota=s.memory_quota_per_key,
                    device=certifier.device,
                )
            return self.memories[alpha]

    def certify(self, x: np.ndarray, job_id: str, *, memory: bool, owner: str | None = None,
                on_commit: Callable[[int], None] | None = None, **kwargs) -> Certificate:
        """Certifier.certify, through the shared memory when `memory` is set: only on a Redis
        that keeps acknowledged commits (service.durability), else MemoryUnavailable."""
        if memory:
            if self.durability is not None:
                self.durability.require()
            shared = self.memory(kwargs.get("alpha", 0.001))
            return certify_with_memory(self.certifier, shared, x, job_id, on_commit=on_commit, owner=owner,
                                       **kwargs)
        return self.certifier.certify(x, **kwargs)

    def predict(self, x: np.ndarray, **kwargs) -> Prediction:
        return self.certifier.predict(x, **kwargs)


class ModelRuntime:
    """Loaded models of this process, by (digest, numeric mode): an LRU of MAX_MODELS."""

    def __init__(self, store: Store, settings: Settings, max_models: int = MAX_MODELS):
        self.store, self.settings, self.max_models = store, settings, max_models
        self._models: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        device = torch.device(settings.device) if settings.device else default_device()
        merge = settings.cross_batching if settings.cross_batching is not None else device.type == "cuda"
        self.scheduler = BatchScheduler() if merge else None
        self.durability = DurabilityGuard(store.r, check=settings.memory_durability_check)

    def cached(self, digest: str, numeric_mode: str | None = None) -> bool:
        """Whether `get` would answer from the cache now, without loading (a hint: another
        thread may load or drop it in between)."""
        with self._lock:
            return (digest, canonical_mode(numeric_mode)) in self._models

    def get(self, digest: str, numeric_mode: str | None = None) -> LoadedModel:
        """The model with this digest in this mode, loaded now if it is not cached."""
        key = (digest, canonical_mode(numeric_mode))
        with self._lock:  # one load at a time; other jobs' threads wait for it
            model = self._models.get(key)
            if model is not None and not self.store.has_bundle(digest):
                # Deleted from the registry since it was loaded: forget it, so that its jobs
                # fail (load: "not in the registry") as they would on a worker that never had it.
                for cached in [k for k in self._models if k[0] == digest]:
                    del self._models[cached]
                model = None
            if model is None:
                model = LoadedModel(digest, self.store, self.settings, numeric_mode=key[1],
                                    scheduler=self.scheduler, durability=self.durability)
                model.load()
                self._models[key] = model
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return model
