"""One certification or prediction request against a loaded model bundle.

The order of a certification is fixed: answer from the memory if the input lies in a
committed ball (no sampling); else σ search (if asked) on its own samples, then selection
and estimation on fresh samples, then the memory rule and commit. All noise comes from one
generator seeded by the request's seed, so the same request with the same seed on the same
device gives the same certificate. The returned certificate names the model digest and the
numeric mode; with a memory it is exactly the committed entry.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from smoothcert import adaptive, bounds, sequential
from smoothcert.batching import BatchScheduler, BatchSize, auto_batch_size
from smoothcert.bundle import Bundle
from smoothcert.drs import certify_drs, split_half
from smoothcert.memory import Memory
from smoothcert.modes import NumericMode, parse_mode
from smoothcert.numerics import in_mode
from smoothcert.results import Certificate, Prediction, memory_namespace
from smoothcert.sampling import CancelCheck
from smoothcert.selector import certify_selector, predict_selector
from smoothcert.sigma import SigmaSearch, search_sigma
from smoothcert.smoothing import StageProgress, certify, predict, seeded, stage


class MemoryLike(Protocol):
    """What certify needs of a memory: `Memory` itself, or a worker's view of the shared one.
    `min_n`: the fewest estimation votes a committed certificate may have."""

    namespace: str
    min_n: int

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None: ...

    def certify(self, x: torch.Tensor, certificate: Certificate) -> Certificate: ...


def default_device() -> torch.device:
    """CUDA when present, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Certifier:
    """Certifies inputs with one bundle on one device, in one numeric mode.

    The sampler runs the networks in `numeric_mode` (smoothcert.modes); the σ search runs
    the stored float32 network (it only proposes σ; the certificate is about the sampled
    function). `batch_size=None` in a request means the automatic batch size of this model
    on this device (smoothcert.batching), measured once, on first use.
    """

    def __init__(self, bundle: Bundle, *, device: torch.device | str | None = None,
                 numeric_mode: str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        mode = parse_mode(numeric_mode)
        mode.check_device(self.device.type)
        if bundle.spec.kind == "remote" and mode != NumericMode():
            raise bounds.InvalidParameters(
                f"numeric_mode {mode.name!r}: a remote model runs in its own server's arithmetic; use fp32")
        self.bundle = bundle.to(self.device)
        self.spec = bundle.spec
        self.numeric_mode = mode.name
        # What the sampler calls: (classifier,) or (left, right), in the numeric mode.
        self.samplers = tuple(in_mode(net, mode, self.device) for net in self.bundle.networks)
        self._batch: BatchSize | None = None

    def _sampler_input_shape(self) -> tuple[int, ...]:
        shape = tuple(self.spec.input_shape)
        if self.spec.kind == "drs":
            return tuple(split_half(torch.zeros(shape), 0).shape)
        return shape

    @property
    def remote(self):
        """The RemoteClassifier of a remote bundle, else None."""
        return self.bundle.remote

    @property
    def batch(self) -> BatchSize:
        """The automatic batch size (measured on first use, then kept); a remote model's is its
        bundle's `max_batch` (probing would load someone else's server)."""
        if self._batch is None:
            if self.remote is not None:
                rows = self.spec.remote.max_batch
                self._batch = BatchSize(rows=rows, max_rows=rows)
            elif self.spec.kind == "selector":  # the estimator and the experts may differ in size
                sizes = [auto_batch_size(s, self._sampler_input_shape(), self.device) for s in self.samplers]
                self._batch = BatchSize(rows=min(b.rows for b in sizes), max_rows=min(b.max_rows for b in sizes))
            else:
                self._batch = auto_batch_size(self.samplers[0], self._sampler_input_shape(), self.device)
        return self._batch

    def warm_up(self) -> None:
        """Pay once, now, what the first job would: the batch-size probe and, for compiled
        modes, compilation at the job batch size and at the selection size; for a remote
        model, the canary answers (one batch against one by one)."""
        if self.remote is not None:
            self.remote.establish()
            return
        rows = self.batch.rows
        for sampler in self.samplers:
            if hasattr(sampler, "warm_up"):
                sampler.warm_up(self._sampler_input_shape(), (rows, 100))

    def route_through(self, scheduler: BatchScheduler) -> None:
        """Run every sampling forward pass through `scheduler` (cross-job batching), merging
        up to the memory bound of this model on this device. A remote model keeps its own
        requests (each job's batches, as they are)."""
        if self.remote is not None:
            return
        limit = self.batch.max_rows
        self.samplers = tuple(scheduler.bind(s, limit) for s in self.samplers)

    def _batch_size(self, batch_size: int | None) -> int:
        return self.batch.rows if batch_size is None else batch_size

    def memory_namespace(self, alpha: float) -> str:
        """The memory of this model, numeric mode and device type at level α."""
        return memory_namespace(self.bundle.digest, self.numeric_mode, self.device.type, alpha)

    def new_memory(self, alpha: float = 0.001, *, capacity: int | None = None, min_n: int = 1) -> Memory:
        """An empty memory for this model, numeric mode and device type, holding certificates
        at level `alpha` of at least `min_n` estimation votes."""
        dim = int(np.prod(self.spec.input_shape))
        return Memory(self.memory_namespace(alpha), dim, alpha=alpha, min_n=min_n, capacity=capacity,
                      device=self.device)

    def tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The input as a float32 tensor of the model's input shape on the model's device."""
        t = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if tuple(t.shape) != tuple(self.spec.input_shape):
            raise bounds.InvalidParameters(
                f"input has shape {tuple(t.shape)} but the model takes {tuple(self.spec.input_shape)}"
            )
        return t

    def _sigma(self, sigma: float | None) -> float:
        s = self.spec.sigma
        sigma = s.default if sigma is None else sigma
        bounds.check_sigma(sigma, s.min, s.max)
        return float(sigma)

    def certify(
        self,
        x: np.ndarray | torch.Tensor,
        *,
        sigma: float | None = None,
        sigma_search: SigmaSearch | None = None,
        bound: str | None = None,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        sampling: str = "fixed",
        tolerance: float | None = None,
        target_radius: float | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        memory: MemoryLike | None = None,
        progress: StageProgress | None = None,
        cancel: CancelCheck | None = None,
    ) -> Certificate:
        """Certify `x` ([C, H, W] in [0,1]) at a fixed σ (default: the model's) or a searched σ.

        sampling="adaptive": `n` is the maximum and the estimation size is chosen per input
        from the selection sample (smoothcert.adaptive; `tolerance` in units of σ, default
        adaptive.DEFAULT_TOLERANCE); sampling="sequential": `n` is the maximum and sampling
        stops once the radius reaches `target_radius` or cannot (smoothcert.sequential). The
        σ search is the same under every sampling rule."""
        drs = self.spec.kind == "drs"
        bound = bound or ("drs" if drs else "cohen")
        if drs != (bound == "drs"):
            raise bounds.InvalidParameters(
                "DRS bundles certify with bound 'drs' only" if drs
                else "bound 'drs' needs a DRS bundle (kind: drs)"
            )
        if sigma is not None and sigma_search is not None:
            raise bounds.InvalidParameters("give either sigma or sigma_search, not both")
        if sigma_search is not None and drs:
            raise bounds.InvalidParameters("sigma_search is not available for DRS bundles")
        if self.spec.kind == "selector":
            _refuse_for_selector(sigma=sigma, sigma_search=sigma_search, memory=memory)
        if self.remote is not None and (sigma_search is not None or memory is not None):
            raise bounds.InvalidParameters(
                "a remote model has no content digest for a memory to be keyed by: certify it at a fixed sigma "
                "with the memory off (sigma_search needs the memory)")
        batch_size = self._batch_size(batch_size)
        bounds.check_certify(n0, n, alpha, batch_size, bound)
        tolerance = adaptive.check_sampling(sampling, tolerance)
        target_radius = sequential.check_target(sampling, target_radius)
        if self.spec.kind == "selector":
            return self._certify_selector(x, n0=n0, n=n, alpha=alpha, bound=bound, sampling=sampling,
                                          tolerance=tolerance, target_radius=target_radius,
                                          batch_size=batch_size, seed=seed, progress=progress, cancel=cancel)
        fixed_sigma = self._sigma(sigma) if sigma_search is None else None
        search = sigma_search.resolved() if sigma_search is not None else None
        n_floor = 0
        if memory is not None:
            if memory.namespace != self.memory_namespace(alpha):
                raise bounds.InvalidParameters(
                    f"memory {memory.namespace} is not this model's memory at alpha={alpha} "
                    f"({self.memory_namespace(alpha)}): a memory holds one function at one level")
            if n < memory.min_n:
                raise bounds.InvalidParameters(
                    f"n={n}: the memory commits certificates of at least n={memory.min_n} estimation votes")
            n_floor = memory.min_n
        started = time.perf_counter()
        t = self.tensor(x)
        source = "caller" if seed is not None else "drawn"
        seed, generator = seeded(seed, None, self.device)
        template = Certificate(
            prediction=None, radius=0.0, sigma=fixed_sigma or 0.0, bound=bound, n0=n0, n=n,
            alpha=alpha, batch_size=batch_size, seed=seed, model_digest=self.bundle.digest,
            numeric_mode=self.numeric_mode, sampling=sampling, n_max=n, tolerance=tolerance,
            target_radius=target_radius, seed_source=source,
        )
        if memory is not None:
            answered = memory.answer(t, template)
            if answered is not None:
                return answered.replace(seconds=time.perf_counter() - started)
        pin = self.remote.pin() if self.remote is not None else None  # the model the samples come from

        record = None
        if search is not None:
            s = self.spec.sigma
            record = search_sigma(
                self.bundle.classifier, t, search, num_classes=self.spec.num_classes,
                sigma_default=s.default, sigma_min=s.min, sigma_max=s.max, n=n, alpha=alpha,
                batch_size=batch_size, generator=generator, cancel=cancel,
                progress=stage(progress, "sigma_search"),
            )
        common = dict(
            num_classes=self.spec.num_classes, sigma=record.sigma if record else fixed_sigma,
            n0=n0, n=n, alpha=alpha, sampling=sampling, tolerance=tolerance, target_radius=target_radius,
            batch_size=batch_size, seed=seed, generator=generator, progress=progress, cancel=cancel,
            n_floor=n_floor,
        )
        if drs:
            cert = certify_drs(*self.samplers, t, **common)
        else:
            cert = certify(self.samplers[0], t, bound=bound, **common)
        if pin is not None:
            self.remote.verify(pin)  # after: it was that model all along
        cert = cert.replace(
            search=record, model_digest=self.bundle.digest, numeric_mode=self.numeric_mode, seed_source=source,
            samples=cert.samples + (record.samples_used if record else 0),
            remote=self.remote.record(pin) if pin is not None else None,
        )
        if memory is not None:
            cert = memory.certify(t, cert)
        return cert.replace(seconds=time.perf_counter() - started)

    def _certify_selector(self, x, *, seed: int | None, **request) -> Certificate:
        """The σ selector's CERTIFY (smoothcert.selector): each stage at α/2, no memory."""
        t = self.tensor(x)
        selector = self.spec.selector
        cert = certify_selector(self.samplers[0], self.samplers[1:], t, sigmas=selector.sigmas,
                                sigma_e=selector.sigma_e, num_classes=self.spec.num_classes, seed=seed, **request)
        return cert.replace(model_digest=self.bundle.digest, numeric_mode=self.numeric_mode)

    def predict(
        self,
        x: np.ndarray | torch.Tensor,
        *,
        sigma: float | None = None,
        n: int = 10_000,
        alpha: float = 0.001,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: StageProgress | None = None,
        cancel: CancelCheck | None = None,
    ) -> Prediction:
        """PREDICT at a fixed σ (default: the model's); a σ selector chooses σ itself (PREDICT
        of the estimator, then of the chosen level's classifier, each at α/2). Not for DRS."""
        if self.spec.kind == "drs":
            raise bounds.InvalidParameters("PREDICT is defined for standard bundles; certify a DRS bundle")
        t = self.tensor(x)
        if self.spec.kind == "selector":
            _refuse_for_selector(sigma=sigma)
            selector = self.spec.selector
            result = predict_selector(
                self.samplers[0], self.samplers[1:], t, sigmas=selector.sigmas, sigma_e=selector.sigma_e,
                num_classes=self.spec.num_classes, n=n, alpha=alpha, batch_size=self._batch_size(batch_size),
                seed=seed, progress=progress, cancel=cancel)
            return result.replace(model_digest=self.bundle.digest, numeric_mode=self.numeric_mode)
        pin = self.remote.pin() if self.remote is not None else None
        result = predict(
            self.samplers[0], t, num_classes=self.spec.num_classes,
            sigma=self._sigma(sigma), n=n, alpha=alpha, batch_size=self._batch_size(batch_size), seed=seed,
            progress=progress, cancel=cancel,
        )
        if pin is not None:
            self.remote.verify(pin)
        return result.replace(model_digest=self.bundle.digest, numeric_mode=self.numeric_mode,
                              remote=self.remote.record(pin) if pin is not None else None)


def _refuse_for_selector(**asked) -> None:
    """A σ selector chooses σ per input and needs no memory: σ, a σ search or a memory would
    each change what is certified, so each is refused, saying why."""
    why = {"sigma": "it chooses sigma for each input itself",
           "sigma_search": "it chooses sigma for each input itself (with a certified choice, not a search)",
           "memory": "its per-input sigma is sound without a memory (its answers never depend on earlier ones)"}
    for name, value in asked.items():
        if value is not None:
            raise bounds.InvalidParameters(f"{name} is refused for a sigma selector model: {why[name]}")
