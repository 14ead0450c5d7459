"""A base classifier served elsewhere, over the Open Inference Protocol v2 (docs/bundles.md,
"Remote models"; what its certificates assume: docs/guarantees.md §7).

The sampler draws the noise here, seeded as for a local network; each noisy batch is mapped
to what the remote model takes (the bundle's `range`, then its `normalize`, then a cast to
the remote datatype: all part of the certified function f, after the noise), sent as binary
tensors, and the answer (logits, or a class index per row) is counted as a local network's
would be. Guarantees of `RemoteClassifier`:

- **One function, pinned.** Fixed canary inputs are sent as one batch and one by one when the
  model is first used, and must get the same classes and logits equal up to 1e-3 of their
  scale (what kernels picked by batch size change; the local loader allows the same): a model
  whose answer for an input depends on the rest of its batch is refused. The same canary
  batch is sent again before and after every job, and every `canary_every` batches during
  one, and must give the very same answer, bit for bit (`canary_match: "classes"`: the same
  classes): a model reloaded
  under the same version, or a canary split under one name, fails the job (RemoteChanged).
  (A model that changed between two jobs is pinned anew at the next job's start, before any
  of its samples: a new canary digest.) The certificate names the endpoint, model, version
  and the canaries' digest.
- **No sample is dropped or redrawn.** A failed request is sent again with the same bytes,
  at most `retries` times with backoff; then the job fails (RemoteUnavailable).
- **Only well-formed answers count.** The output tensor must have the declared name, a
  numeric datatype and the shape [B, K] (logits) or [B] / [B, 1] (class indices in [0, K));
  NaN or infinite logits are an error (RemoteError), never a vote.
- **No server-side request forgery.** The endpoint must match the operator's allow-list; its
  host is resolved once and every connection goes to that address (a later DNS answer cannot
  move it); link-local and cloud metadata addresses are refused whatever the list says;
  redirects are never followed. TLS (with an optional CA file) and a bearer token per
  endpoint origin are supported; a token is only ever sent to its own origin.

Standard library only for the network (http.client, ssl, socket): the engine imports no HTTP
package (ARCHITECTURE.md).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import torch
from torch import nn

from smoothcert.endpoints import Endpoint, RemoteOptions, RemoteUnavailable, resolve
from smoothcert.manifest import BundleError, ModelSpec, RemoteSpec
from smoothcert.results import RemoteRecord

CANARY_SEED = 20261205  # the canary images: fixed for every bundle, so their digest means the same thing
_DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "UINT8": "|u1", "INT8": "|i1", "INT16": "<i2",
           "INT32": "<i4", "INT64": "<i8", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RemoteError(BundleError):
    """The remote model answered something smoothcert cannot count (or refused the request)."""


class RemoteChanged(RuntimeError):
    """The remote model's answers to the canary inputs changed: it is no longer the function
    the job started certifying."""


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection that sends `Host: <host>` but connects to the pinned address."""

    def __init__(self, endpoint: Endpoint, timeout: float):
        super().__init__(endpoint.host, endpoint.port, timeout=timeout)
        self.pinned = endpoint.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.pinned, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS, the certificate checked against the endpoint's host name."""

    def __init__(self, endpoint: Endpoint, timeout: float, context: ssl.SSLContext):
        super().__init__(endpoint, timeout)
        self.context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


class OIPClient:
    """Binary-tensor inference requests to one pinned endpoint; one connection per thread
    (jobs running as threads of one worker share a model)."""

    def __init__(self, endpoint: Endpoint, spec: RemoteSpec, options: RemoteOptions):
        self.endpoint, self.spec = endpoint, spec
        self.token = options.tokens.get(endpoint.origin)
        self.context = ssl.create_default_context(cafile=options.ca_file) if endpoint.scheme == "https" else None
        version = f"/versions/{quote(spec.version, safe='')}" if spec.version is not None else ""
        self.path = f"{endpoint.prefix}/v2/models/{quote(spec.model, safe='')}{version}/infer"
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            timeout = self.spec.timeout_seconds
            conn = (_PinnedHTTPSConnection(self.endpoint, timeout, self.context) if self.context is not None
                    else _PinnedHTTPConnection(self.endpoint, timeout))
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The remote output tensor for `batch` (already in the remote's datatype), checked."""
        body = encode_request(self.spec, batch)
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(body[1])}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last = "no attempt"
        for attempt in range(self.spec.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.1 * 2 ** attempt))
            try:
                conn = self._connection()
                conn.request("POST", self.path, body=body[0], headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
                self._drop_connection()
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status in _RETRY_STATUS:
                last = f"HTTP {response.status}"
                continue
            if 300 <= response.status < 400:
                raise RemoteError(f"remote model answered a redirect (HTTP {response.status}); "
                                  "redirects are never followed")
            if response.status != 200:
                raise RemoteError(f"remote model refused the request: HTTP {response.status}: "
                                  f"{_error_text(data)}")
            return decode_response(self.spec, data, response.getheader("Inference-Header-Content-Length"),
                                   rows=batch.shape[0])
        raise RemoteUnavailable(f"the remote model at {self.endpoint.origin} did not answer after "
                                f"{self.spec.retries + 1} attempts ({last}); no sample was dropped")


def _error_text(data: bytes) -> str:
    try:
        body = json.loads(data)
        return str(body.get("error", body))[:500]
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace")


def encode_request(spec: RemoteSpec, batch: np.ndarray) -> tuple[bytes, int]:
    """(body, JSON header length): one input as binary data, the one output asked for binary."""
    raw = np.ascontiguousarray(batch.astype(_DTYPES[spec.datatype], copy=False)).tobytes()
    header = json.dumps({
        "inputs": [{"name": spec.input, "shape": list(batch.shape), "datatype": spec.datatype,
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": spec.output, "parameters": {"binary_data": True}}],
    }).encode()
    return header + raw, len(header)


def decode_response(spec: RemoteSpec, data: bytes, header_length: str | None, *, rows: int) -> np.ndarray:
    """The declared output of an inference response (JSON, or JSON then binary tensors),
    checked: numeric, the right shape for `rows` inputs, finite logits, class indices in range."""
    try:
        length = int(header_length) if header_length is not None else len(data)
        header = json.loads(data[:length])
        outputs = header["outputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RemoteError(f"remote answer is not an inference response ({exc})") from None
    offset, found = length, None
    for out in outputs:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out.get("name") == spec.output:
            found = (out, offset, size)
        if size is not None:
            offset += int(size)
    if found is None:
        raise RemoteError(f"remote answer has no output {spec.output!r} "
                          f"(it has {[o.get('name') for o in outputs]})")
    out, start, size = found
    datatype = out.get("datatype")
    if datatype not in _DTYPES or datatype in ("BOOL", "BYTES"):
        raise RemoteError(f"remote output {spec.output!r} has datatype {datatype!r}, not a number")
    shape = [int(s) for s in out.get("shape", [])]
    if size is not None:
        array = np.frombuffer(data[start:start + int(size)], dtype=_DTYPES[datatype])
    else:
        array = np.asarray(out.get("data", []), dtype=_DTYPES[datatype]).reshape(-1)
    if not shape or array.size != int(np.prod(shape)):
        raise RemoteError(f"remote output {spec.output!r}: {array.size} values for shape {shape}")
    array = array.reshape(shape)
    if spec.output_kind == "logits":
        if array.ndim != 2 or array.shape[0] != rows:
            raise RemoteError(f"remote logits must have shape [{rows}, K], got {shape}")
        if not np.isfinite(array.astype(np.float64)).all():
            raise RemoteError("remote logits hold NaN or infinite values: never counted as votes")
    else:
        if array.shape not in ((rows,), (rows, 1)):
            raise RemoteError(f"remote class indices must have shape [{rows}] or [{rows}, 1], got {shape}")
        values = array.astype(np.float64).reshape(-1)
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise RemoteError("remote class indices must be whole numbers")
    return array


def canary_images(spec: ModelSpec, count: int) -> np.ndarray:
    """`count` fixed inputs in [0, 1] of the model's shape: mid-grey, then seeded uniform noise."""
    rng = np.random.default_rng(CANARY_SEED)
    images = rng.random((count, *spec.input_shape), dtype=np.float32)
    images[0] = 0.5
    return images


@dataclass(frozen=True)
class Pin:
    """A job's hold on a remote model: the canary answers it started from, and their digest."""

    reference: np.ndarray = field(repr=False)
    digest: str


class RemoteClassifier(nn.Module):
    """The remote model as a network the sampler calls: noisy batch in, logits out (a class
    answer becomes one-hot logits). See the module docstring for what it guarantees."""

    def __init__(self, spec: ModelSpec, options: RemoteOptions):
        super().__init__()
        if spec.remote is None:
            raise BundleError("a remote classifier needs model.json's 'remote'")
        self.spec, self.remote = spec, spec.remote
        self.endpoint = resolve(self.remote.endpoint, options)
        self.client = OIPClient(self.endpoint, self.remote, options)
        low, high = self.remote.range
        mean, std = spec.normalize if spec.normalize is not None else ((0.0,) * spec.input_shape[0],
                                                                        (1.0,) * spec.input_shape[0])
        shape = (1, spec.input_shape[0], 1, 1)
        self._scale, self._low = high - low, low
        self._mean = np.asarray(mean, dtype=np.float64).reshape(shape)
        self._std = np.asarray(std, dtype=np.float64).reshape(shape)
        self._canaries = canary_images(spec, self.remote.canaries)
        self._reference: np.ndarray | None = None
        self._lock = threading.Lock()
        self.canary_digest: str | None = None
        self.canary_checks = 0
        self._calls = 0

    # --- the function ------------------------------------------------------------------

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """What the remote model takes for these [0, 1]-space (noisy) inputs: range, normalise,
        cast (UINT8: rounded to the nearest integer and clipped to [0, 255])."""
        values = (self._low + self._scale * batch.astype(np.float64) - self._mean) / self._std
        if self.remote.datatype == "UINT8":
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return values.astype(_DTYPES[self.remote.datatype])

    def answer(self, batch: np.ndarray) -> np.ndarray:
        """The remote output for [0, 1]-space inputs, `max_batch` rows per request."""
        parts = [self.client.infer(self.encode(batch[a:a + self.remote.max_batch]))
                 for a in range(0, batch.shape[0], self.remote.max_batch)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if self.remote.output_kind == "logits" and out.shape[1] != self.spec.num_classes:
            raise RemoteError(f"remote logits have {out.shape[1]} classes; the bundle declares "
                              f"num_classes {self.spec.num_classes}")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._reference is None:
            self.establish()
        every = self.remote.canary_every
        with self._lock:
            self._calls += 1
            due = every > 0 and self._calls % every == 0
        if due:
            self.verify()
        out = self.answer(x.detach().to("cpu", torch.float32).numpy())
        if self.remote.output_kind == "logits":
            return torch.from_numpy(out.astype(np.float32)).to(x.device)
        classes = torch.from_numpy(out.reshape(-1).astype(np.int64))
        if bool(((classes < 0) | (classes >= self.spec.num_classes)).any()):
            raise RemoteError(f"remote class indices must lie in [0, {self.spec.num_classes})")
        return nn.functional.one_hot(classes, self.spec.num_classes).to(x.device, torch.float32)

    # --- canaries ------------------------------------------------------------------------

    def _same(self, a: np.ndarray, b: np.ndarray) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if self.remote.canary_match == "classes" and self.remote.output_kind == "logits":
            return bool(np.array_equal(a.argmax(axis=1), b.argmax(axis=1)))
        return a.tobytes() == b.tobytes()

    def _batch_invariant(self, together: np.ndarray, alone: np.ndarray) -> bool:
        # One input's answer alone and among other inputs: the same classes, and logits equal up
        # to what kernels chosen by batch size change (1e-3 of their scale, the local loader's
        # check: smoothcert.bundle._check_network); a whole different answer is batch dependence.
        if together.shape != alone.shape:
            return False
        if self.remote.output_kind == "class":
            return bool(np.array_equal(together, alone))
        a, b = together.astype(np.float64), alone.astype(np.float64)
        tolerance = 1e-3 * (1.0 + float(np.abs(a).max()))
        return bool(np.array_equal(a.argmax(axis=1), b.argmax(axis=1)) and np.abs(a - b).max() <= tolerance)

    def establish(self) -> str:
        """Send the canaries as one batch and one by one; they must agree (one function of each
        input alone). Keeps the batch answer as the reference; returns the canary digest."""
        with self._lock:
            if self._reference is not None:
                return self.canary_digest
            together = self.answer(self._canaries)
            alone = np.concatenate([self.answer(self._canaries[i:i + 1]) for i in range(len(self._canaries))])
            if not self._batch_invariant(together, alone):
                raise RemoteError("the remote model answers the canary inputs differently in a batch and one "
                                  "by one: its answer depends on the rest of the batch (batch statistics, "
                                  "train-mode BatchNorm, batch-dependent kernels), so it is not one function "
                                  "of each noisy input and cannot be certified")
            self._reference = together
            digest = hashlib.sha256()
            digest.update(np.ascontiguousarray(self.encode(self._canaries)).tobytes())
            digest.update(np.ascontiguousarray(together).tobytes())
            self.canary_digest = f"sha256:{digest.hexdigest()}"
            self.canary_checks = 1
            return self.canary_digest

    def pin(self) -> Pin:
        """The start of a job, before any of its samples: send the canaries; the answer pins
        the model for this job. If it differs from the current reference the model changed
        between jobs and is pinned anew (`establish`: its answer alone and in a batch checked
        again, a new digest, which this job's certificate names)."""
        if self._reference is None:
            self.establish()
        again = self.answer(self._canaries)
        if not self._same(again, self._reference):
            with self._lock:
                self._reference = None
            self.establish()
        with self._lock:
            return Pin(self._reference, self.canary_digest)

    def verify(self, pin: Pin | None = None) -> None:
        """Send the canary batch again; RemoteChanged unless the answer is `pin`'s (a job's,
        at its end) or the current reference (during jobs)."""
        reference = pin.reference if pin is not None else self._reference
        if reference is None:
            self.establish()
            return
        again = self.answer(self._canaries)
        with self._lock:
            self.canary_checks += 1
        if not self._same(again, reference):
            raise RemoteChanged(f"the remote model {self.remote.model!r} at {self.endpoint.origin} answered the "
                                "canary inputs differently than before: it changed (reloaded, replaced or split) "
                                "and is no longer the function this job certifies")

    def record(self, pin: Pin) -> RemoteRecord:
        """What a certificate names about the remote model it was pinned to."""
        return RemoteRecord(endpoint=self.remote.endpoint, model=self.remote.model, version=self.remote.version,
                            canary_digest=pin.digest)

    def train(self, mode: bool = True) -> RemoteClassifier:
        # The remote function is fixed: eval/train only set the flag.
        self.training = mode
        return self
