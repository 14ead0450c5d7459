"""The certificate memory shared by every worker through the store (DESIGN.md, "The memory
under concurrency"; the rule is ALGORITHMS.md §3.1).

Guarantees, resting on the store's compare-and-set commit:
- committed balls of different classes never intersect: an entry is appended only on top of
  the exact log (epoch, length) the rule was checked against; when the log grew meanwhile,
  the new entries are synced and the rule is re-applied to them alone, starting from the
  current decision (sound: the decision already clears every older entry);
- at most one entry per job id: a redelivered job gets its first entry back;
- the certificate returned is exactly the committed entry (class, radius, σ, outcome);
- a full memory raises MemoryFull: nothing is evicted;
- one SharedMemory may serve several jobs running as threads of one process: an RLock is
  held across sync, the rule, the commit loop and a job's memory answer (sampling runs
  outside it), so the local copy and the log never disagree.
A testing hook (workers/failpoints.py, off by default) may pause right after a commit.
Distances are computed here, on the worker's device; Redis only compares lengths. A sync pulls
only entries the copy lacks, PAGE at a time. Entries keep the input's dtype: an input whose
every value is exactly float32(u)/255 (an 8-bit image) travels and is kept as uint8 (format
version 2; version 1, float32 only, is still read).
"""

from __future__ import annotations

import math
import struct
import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from service.store import Store
from smoothcert.certifier import Certifier
from smoothcert.memory import ABSTAIN, Memory, MemoryFull, to_uint8
from smoothcert.results import OUTCOMES, Certificate, MemoryRecord
from workers import failpoints

# version, class, radius, σ, outcome, class before, radius before, conflict, pA_low, len(job id);
# then the job id, then the point. Version 1: the point is float32. Version 2 adds a dtype tag
# (a byte after len(job id)): _DTYPES[tag] is the point's dtype.
_HEADER_V1 = struct.Struct("<BiddBidqdH")
_HEADER = struct.Struct("<BiddBidqdHB")
_VERSION = 2
_DTYPES = (np.dtype("<f4"), np.dtype("u1"))
PAGE = 4096  # entries per LRANGE of a sync
_RETRIES = 10


@dataclass(frozen=True)
class Entry:
    """One committed certificate as stored in the log; ABSTAIN (-1) stands for "no class"
    and NaN / -1 for absent radius_before, p_a_lower and conflict."""

    prediction: int
    radius: float
    sigma: float
    outcome: str
    prediction_before: int
    radius_before: float
    conflict: int
    p_a_lower: float
    job_id: str
    point: np.ndarray  # flattened: float32, or uint8 u standing for float32(u)/255

    @property
    def values(self) -> np.ndarray:
        """The point as float32 values (uint8 u gives float32(u)/255, bit-exact)."""
        point = np.asarray(self.point)
        # numpy's float32 division is IEEE's, as torch's: the same bits as `point_values`.
        return point.astype(np.float32) / np.float32(255) if point.dtype == np.uint8 else point.astype(np.float32)


def compact(point: np.ndarray) -> np.ndarray:
    """The point as uint8 if every value is exactly float32(u)/255, else as float32 (which
    must hold it exactly: a float64 point that float32 would round is refused)."""
    point = np.array(point)  # a writable copy, for torch
    if point.dtype == np.uint8:
        return point
    u = to_uint8(torch.from_numpy(point))
    if u is not None:
        return u.numpy()
    p32 = point.astype(_DTYPES[0])
    if not np.array_equal(p32, point):
        raise ValueError("a memory point must be float32 or uint8; this one would be rounded")
    return p32


def encode_entry(e: Entry) -> bytes:
    """Format version 2; the point is stored as uint8 whenever that is exact (`compact`)."""
    job = e.job_id.encode()
    point = compact(e.point)
    head = _HEADER.pack(_VERSION, e.prediction, e.radius, e.sigma, OUTCOMES.index(e.outcome),
                        e.prediction_before, e.radius_before, e.conflict, e.p_a_lower, len(job),
                        _DTYPES.index(point.dtype))
    return head + job + point.tobytes()


def decode_entry(raw: bytes) -> Entry:
    """An entry of format version 1 or 2; its point keeps the stored dtype (a read-only view)."""
    version = raw[0] if raw else None
    if version == 1:
        fields, head, dtype = _HEADER_V1.unpack_from(raw), _HEADER_V1.size, _DTYPES[0]
    elif version == 2:
        *fields, tag = _HEADER.unpack_from(raw)
        if tag >= len(_DTYPES):
            raise RuntimeError(f"memory entry has unknown point dtype tag {tag}")
        head, dtype = _HEADER.size, _DTYPES[tag]
    else:
        raise RuntimeError(f"memory entry has unknown format version {version}")
    _, pred, radius, sigma, outcome, before, radius_before, conflict, p_a_lower, job_len = fields
    job = raw[head:head + job_len].decode()
    point = np.frombuffer(raw, dtype=dtype, offset=head + job_len)
    return Entry(pred, radius, sigma, OUTCOMES[outcome], before, radius_before, conflict,
                 p_a_lower, job, point)


def _opt(value: float) -> float | None:
    return None if math.isnan(value) else value


def _cls(value: int) -> int | None:
    return None if value == ABSTAIN else value


class SharedMemory:
    """This process's copy of one namespace's log, and the commit protocol over it.

    Safe to share between threads: `lock` (reentrant) is held by every method that reads or
    changes the copy, and by JobMemory.answer across its steps."""

    def __init__(self, store: Store, namespace: str, dim: int, *, capacity: int,
                 device: torch.device | str = "cpu", page: int = PAGE):
        self.store, self.namespace, self.dim = store, namespace, dim
        self.capacity, self.device, self.page = capacity, torch.device(device), page
        self.lock = threading.RLock()
        self._reset(None)

    def _reset(self, epoch: int | None) -> None:
        self.epoch = epoch
        self.local = Memory(self.namespace, self.dim, capacity=self.capacity, device=self.device)  # grows up to it
        # Header columns the local Memory does not hold, to rebuild an entry's certificate
        # (arrays: appending is amortised O(1)).
        self._outcome, self._before, self._radius_before = array("b"), array("q"), array("d")
        self._conflict, self._p_a_lower = array("q"), array("d")

    def __len__(self) -> int:
        return len(self.local)

    def sync(self) -> None:
        """Pull the entries committed since the last sync, `page` at a time until caught up;
        rebuild on a new epoch (reset).

        The epoch is read before and after each page: equal reads mean no reset in between
        (epochs only grow), so the page belongs to that epoch, as do the pages before it that
        were read under the same epoch. A page read across a reset is dropped and the copy
        rebuilt from the new log."""
        with self.lock:
            while True:
                epoch = self.store.memory_epoch(self.namespace)
                if epoch != self.epoch:
                    self._reset(epoch)
                start = len(self)
                raw = self.store.memory_entries(self.namespace, start, start + self.page)
                if self.store.memory_epoch(self.namespace) != epoch:
                    continue
                self._extend([decode_entry(b) for b in raw])
                if len(raw) < self.page:
                    return

    def _extend(self, entries: list[Entry]) -> None:
        # One append to the local table per page, not per entry.
        if not entries:
            return
        if any(e.point.size != self.dim for e in entries):
            raise RuntimeError(f"memory {self.namespace} holds an entry of the wrong size")
        if all(e.point.dtype == np.uint8 for e in entries):
            points = np.stack([e.point for e in entries])
        else:  # a mixed page: the exact float32 values (the table turns float32)
            points = np.stack([e.values for e in entries])
        self.local.extend(torch.from_numpy(points), [e.prediction for e in entries],
                          [e.radius for e in entries], [e.sigma for e in entries])
        self._outcome.extend(OUTCOMES.index(e.outcome) for e in entries)
        self._before.extend(e.prediction_before for e in entries)
        self._radius_before.extend(e.radius_before for e in entries)
        self._conflict.extend(e.conflict for e in entries)
        self._p_a_lower.extend(e.p_a_lower for e in entries)

    def certificate_of(self, index: int, base: Certificate) -> Certificate:
        """Entry `index` as a certificate; `base` supplies the request's parameters. Its
        sampling fields are kept only if they produced this entry (same class and radius
        before the rule), so nothing in the answer describes a different run."""
        with self.lock:
            return self._certificate_of(index, base)

    def _certificate_of(self, index: int, base: Certificate) -> Certificate:
        before, radius_before = _cls(int(self._before[index])), _opt(float(self._radius_before[index]))
        if (base.prediction, base.radius) != (before, radius_before):
            base = base.replace(n_a=None, p_b_upper=None, runner_up=None, n_a_halves=None,
                                p_a_lower_halves=None, search=None, look_alpha=None)
        conflict = int(self._conflict[index])
        return base.replace(
            prediction=_cls(int(self.local.classes[index])), radius=float(self.local.radii[index]),
            sigma=float(self.local.sigmas[index]), p_a_lower=_opt(float(self._p_a_lower[index])),
            memory=MemoryRecord(OUTCOMES[self._outcome[index]], before, radius_before, index,
                                None if conflict < 0 else conflict),
        )

    def committed(self, job_id: str, base: Certificate) -> Certificate | None:
        """The certificate `job_id` already committed (a redelivered job), or None."""
        with self.lock:
            for _ in range(_RETRIES):  # the index is only meaningful in the epoch it was read in
                epoch = self.store.memory_epoch(self.namespace)
                index = self.store.memory_entry_of(self.namespace, job_id)
                if index is None:
                    return None
                self.sync()
                if self.epoch == epoch and index < len(self):
                    return self._certificate_of(index, base)
        raise RuntimeError(f"memory {self.namespace} kept changing epoch while reading job {job_id}")

    def commit(self, job_id: str, x: torch.Tensor, cert: Certificate) -> Certificate:
        """Apply the rule to a fresh certificate and commit it; returns the committed one."""
        before = ABSTAIN if cert.prediction is None else cert.prediction
        flat = x.detach().reshape(-1).cpu()
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.to(torch.float32)  # exact
        point = compact(flat.numpy())  # the certified point, exactly (uint8 when it is a pixel image)
        with self.lock:
            while True:  # one pass per epoch: a reset ("stale") starts over on the new log
                self.sync()
                d = self.local.decide(x, before, cert.radius)
                prediction, radius, outcomes, conflict = d.prediction, d.radius, {d.outcome}, d.conflict
                while True:
                    entry = Entry(prediction, radius, cert.sigma,
                                  "inside" if "inside" in outcomes else "shrunk" if "shrunk" in outcomes else "new",
                                  before, cert.radius, -1 if conflict is None else conflict,
                                  math.nan if cert.p_a_lower is None else cert.p_a_lower, job_id, point)
                    epoch, length = self.epoch, len(self)
                    res = self.store.memory_commit(self.namespace, epoch=epoch, length=length,
                                                   job_id=job_id, entry=encode_entry(entry),
                                                   capacity=self.capacity)
                    if res.status == "committed":
                        self._extend([entry])
                        return self._certificate_of(res.index, cert)
                    if res.status == "duplicate":
                        mine = self.committed(job_id, cert)
                        if mine is not None:
                            return mine
                        break  # the memory was reset since: this job has no entry any more
                    if res.status == "full":
                        raise MemoryFull(f"the certificate memory of this model holds its maximum of "
                                         f"{self.capacity} entries; nothing was committed")
                    self.store.count(f"memory_commit_retries_total:{res.status}")
                    if res.status == "stale":
                        break
                    self.sync()  # "conflict": the log grew since `length`
                    if self.epoch != epoch:
                        break
                    new = self.local.decide(x, prediction, radius, start=length)  # the new entries only
                    if new.outcome != "new":
                        prediction, radius = new.prediction, new.radius
                        outcomes.add(new.outcome)
                        conflict = new.conflict


class JobMemory:
    """The memory as one job's Certifier sees it (the `Memory` methods it calls):
    `answer` returns the job's own entry if it committed one (redelivery), else the
    committed ball containing x; `certify` runs the shared commit protocol."""

    def __init__(self, shared: SharedMemory, job_id: str,
                 on_commit: Callable[[int], None] | None = None):
        self.shared, self.job_id, self.on_commit = shared, job_id, on_commit
        self.namespace = shared.namespace

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None:
        with self.shared.lock:
            mine = self.shared.committed(self.job_id, template)
            if mine is not None:
                return mine
            self.shared.sync()
            return self.shared.local.answer(x, template)

    def certify(self, x: torch.Tensor, certificate: Certificate) -> Certificate:
        if self.on_commit is not None:  # told the samples spent, e.g. to show the "memory" stage
            self.on_commit(certificate.samples)
        committed = self.shared.commit(self.job_id, x, certificate)
        failpoints.after_commit()  # a testing hook, inert by default; the lock is not held here
        return committed


def certify_with_memory(certifier: Certifier, shared: SharedMemory, x, job_id: str, *,
                        on_commit: Callable[[int], None] | None = None, **kwargs) -> Certificate:
    """Certify `x` for `job_id` through the shared memory: the job's own entry if it has
    one, else a memory answer if x lies in a committed ball (no sampling), else a fresh
    certificate passed through the rule and committed. `kwargs` go to Certifier.certify."""
    return certifier.certify(x, memory=JobMemory(shared, job_id, on_commit), **kwargs)
