"""The certificate memory shared by every worker through the store (docs/memory.md; the rule
is docs/algorithms.md §3.1, what an answer promises docs/guarantees.md §2).

Guarantees, resting on the store's compare-and-set commit:
- committed balls of different classes never intersect: an entry is appended only on top of
  the exact log (epoch, length) the rule was checked against; when the log grew meanwhile,
  the new entries are synced and the rule is re-applied to them alone, starting from the
  current decision (sound: the decision already clears every older entry);
- one memory per model digest, numeric mode, device type and α: only certificates at the
  memory's α, with at least `min_n` estimation votes, are committed;
- at most one entry per job id: a redelivered job gets its first entry back;
- at most `quota` entries per API key and model (the commit script counts them);
- the certificate returned is exactly the committed entry (class, radius, outcome), reported
  with its root's sampling: the entry whose own votes produced the ball ("inside" entries
  point through to it), so an auditor re-derives every answer from one sampling run;
- a full memory raises MemoryFull, a key past its quota MemoryQuota: nothing is evicted;
- one SharedMemory may serve several jobs running as threads of one process: an RLock is
  held across sync, the rule, the commit loop and a job's memory answer (sampling runs
  outside it), so the local copy and the log never disagree.
A testing hook (workers/failpoints.py, off by default) may pause right after a commit.
Distances are computed here, on the worker's device; Redis only compares lengths. A sync pulls
only entries the copy lacks, PAGE at a time. Entries keep the input's dtype: an input whose
every value is exactly float32(u)/255 (an 8-bit image) travels and is kept as uint8.
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
from smoothcert.memory import (
    ABSTAIN,
    PROVENANCE,
    Memory,
    MemoryFull,
    answered_from,
    committed_certificate,
    provenance_of,
    provenance_record,
    to_uint8,
)
from smoothcert.results import OUTCOMES, Certificate, MemoryRecord, Provenance, parse_namespace
from workers import failpoints

# version, class, radius, outcome, class before, radius before, σ before, conflict, len(job id),
# point dtype tag; then the provenance record (smoothcert.memory.PROVENANCE), the job id, the
# point. _DTYPES[tag] is the point's dtype. Version 3: entries of versions 1 and 2 carried no
# level and no provenance; their memories (other namespaces) are never read.
_HEADER = struct.Struct("<BidBiddqHB")
_VERSION = 3
_DTYPES = (np.dtype("<f4"), np.dtype("u1"))
PAGE = 4096  # entries per LRANGE of a sync
_RETRIES = 10


class MemoryQuota(RuntimeError):
    """The caller's API key has committed its quota of entries to this model's memories."""


@dataclass(frozen=True)
class Entry:
    """One committed certificate as stored in the log; ABSTAIN (-1) stands for "no class" and
    NaN / -1 for absent radius_before, sigma_before and conflict. `record` is the root's
    sampling as a PROVENANCE record (root -1: this entry is its own root); `make_entry`
    builds one from a Provenance."""

    prediction: int
    radius: float
    outcome: str
    prediction_before: int
    radius_before: float
    sigma_before: float
    conflict: int
    record: np.void  # smoothcert.memory.PROVENANCE
    job_id: str
    point: np.ndarray  # flattened: float32, or uint8 u standing for float32(u)/255

    @property
    def provenance(self) -> Provenance:
        """The root's sampling; root None when the entry is its own root."""
        return provenance_of(self.record, None)

    @property
    def values(self) -> np.ndarray:
        """The point as float32 values (uint8 u gives float32(u)/255, bit-exact)."""
        point = np.asarray(self.point)
        # numpy's float32 division is IEEE's, as torch's: the same bits as `point_values`.
        return point.astype(np.float32) / np.float32(255) if point.dtype == np.uint8 else point.astype(np.float32)


def make_entry(prediction: int, radius: float, outcome: str, prediction_before: int, radius_before: float,
               sigma_before: float, conflict: int, provenance: Provenance, job_id: str, point: np.ndarray) -> Entry:
    """An Entry whose root's sampling is `provenance` (root None: the entry itself)."""
    return Entry(prediction, radius, outcome, prediction_before, radius_before, sigma_before, conflict,
                 provenance_record(provenance)[0], job_id, point)


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
    """Format version 3; the point is stored as uint8 whenever that is exact (`compact`)."""
    job = e.job_id.encode()
    point = compact(e.point)
    head = _HEADER.pack(_VERSION, e.prediction, e.radius, OUTCOMES.index(e.outcome), e.prediction_before,
                        e.radius_before, e.sigma_before, e.conflict, len(job), _DTYPES.index(point.dtype))
    return head + np.asarray(e.record, dtype=PROVENANCE).tobytes() + job + point.tobytes()


def decode_entry(raw: bytes) -> Entry:
    """An entry of format version 3; its point and record are read-only views of `raw`."""
    version = raw[0] if raw else None
    if version != _VERSION:
        raise RuntimeError(f"memory entry has unknown format version {version}")
    _, pred, radius, outcome, before, radius_before, sigma_before, conflict, job_len, tag = _HEADER.unpack_from(raw)
    if tag >= len(_DTYPES):
        raise RuntimeError(f"memory entry has unknown point dtype tag {tag}")
    record = np.frombuffer(raw, dtype=PROVENANCE, count=1, offset=_HEADER.size)[0]
    start = _HEADER.size + PROVENANCE.itemsize
    job = raw[start:start + job_len].decode()
    point = np.frombuffer(raw, dtype=_DTYPES[tag], offset=start + job_len)
    return Entry(pred, radius, OUTCOMES[outcome], before, radius_before, sigma_before, conflict, record, job, point)


def _opt(value: float) -> float | None:
    return None if math.isnan(value) else value


def _cls(value: int) -> int | None:
    return None if value == ABSTAIN else value


class SharedMemory:
    """This process's copy of one namespace's log, and the commit protocol over it.

    The namespace is one model digest, numeric mode, device type and α (results.memory_namespace):
    only certificates at that α, with at least `min_n` estimation votes, are committed, and an
    API key (`owner`) commits at most `quota` entries to the memories of one model (0: no limit).

    Safe to share between threads: `lock` (reentrant) is held by every method that reads or
    changes the copy, and by JobMemory.answer across its steps."""

    def __init__(self, store: Store, namespace: str, dim: int, *, capacity: int, min_n: int = 1, quota: int = 0,
                 device: torch.device | str = "cpu", page: int = PAGE):
        self.store, self.namespace, self.dim = store, namespace, dim
        self.digest, _, _, self.alpha = parse_namespace(namespace)
        self.capacity, self.min_n, self.quota = capacity, min_n, quota
        self.device, self.page = torch.device(device), page
        self.lock = threading.RLock()
        self._reset(None)

    def _reset(self, epoch: int | None) -> None:
        self.epoch = epoch
        self.local = Memory(self.namespace, self.dim, alpha=self.alpha, min_n=self.min_n, capacity=self.capacity,
                            device=self.device)  # grows up to it
        # Columns the local Memory does not hold, to rebuild an entry's certificate (arrays:
        # appending is amortised O(1)).
        self._outcome, self._before, self._radius_before = array("b"), array("q"), array("d")
        self._sigma_before, self._conflict = array("d"), array("q")
        self._jobs: list[str] = []

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
                          [e.radius for e in entries], np.array([e.record for e in entries], dtype=PROVENANCE))
        self._outcome.extend(OUTCOMES.index(e.outcome) for e in entries)
        self._before.extend(e.prediction_before for e in entries)
        self._radius_before.extend(e.radius_before for e in entries)
        self._sigma_before.extend(e.sigma_before for e in entries)
        self._conflict.extend(e.conflict for e in entries)
        self._jobs.extend(e.job_id for e in entries)

    def provenance(self, index: int) -> Provenance:
        """Entry `index`'s root sampling, with the root's job id."""
        with self.lock:
            root = self.local.root_of(index)
            return self.local.provenance(index, job=self._jobs[root])

    def certificate_of(self, index: int, base: Certificate) -> Certificate:
        """Entry `index` as a certificate: its class and radius, its root's sampling, what the
        committing job sampled; `base` supplies the request's other parameters."""
        with self.lock:
            return self._certificate_of(index, base)

    def _certificate_of(self, index: int, base: Certificate) -> Certificate:
        prediction = int(self.local.classes[index])
        conflict = int(self._conflict[index])
        root = self.provenance(index)
        record = MemoryRecord(OUTCOMES[self._outcome[index]], _cls(int(self._before[index])),
                              _opt(float(self._radius_before[index])), index, None if conflict < 0 else conflict,
                              root=root.root, root_job=root.job, sigma_before=_opt(float(self._sigma_before[index])),
                              namespace=self.namespace)
        return base.replace(prediction=_cls(prediction), radius=float(self.local.radii[index]), samples=0,
                            **root.fields(), memory=record)

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None:
        """The deepest committed ball containing x, as an answer (no sampling), or None."""
        with self.lock:
            hit = self.local.lookup(x)
            if hit is None:
                return None
            j, radius = hit
            return answered_from(template, int(self.local.classes[j]), radius, self.provenance(j), j, self.namespace)

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

    def check_quota(self, owner: str | None) -> None:
        """Raise MemoryQuota when `owner` has committed its quota to this model's memories (a
        check before sampling; the commit itself enforces it atomically)."""
        if self.quota and self.store.memory_commits_of(self.digest, owner) >= self.quota:
            raise MemoryQuota(_quota_message(self.quota))

    def commit(self, job_id: str, x: torch.Tensor, cert: Certificate, owner: str | None = None) -> Certificate:
        """Apply the rule to a fresh certificate and commit it; returns the committed one."""
        self.local.check_certificate(cert)
        before = ABSTAIN if cert.prediction is None else cert.prediction
        flat = x.detach().reshape(-1).cpu()
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.to(torch.float32)  # exact
        point = compact(flat.numpy())  # the certified point, exactly (uint8 when it is a pixel image)
        own = Provenance.of(cert)
        with self.lock:
            while True:  # one pass per epoch: a reset ("stale") starts over on the new log
                self.sync()
                d = self.local.decide(x, before, cert.radius)
                prediction, radius, outcomes, conflict = d.prediction, d.radius, {d.outcome}, d.conflict
                # The root: the containing ball's root once the rule says "inside", else this run.
                root = self.provenance(conflict) if d.outcome == "inside" else own
                while True:
                    outcome = "inside" if "inside" in outcomes else "shrunk" if "shrunk" in outcomes else "new"
                    entry = make_entry(prediction, radius, outcome, before, cert.radius, cert.sigma,
                                       -1 if conflict is None else conflict, root, job_id, point)
                    epoch, length = self.epoch, len(self)
                    res = self.store.memory_commit(self.namespace, epoch=epoch, length=length,
                                                   job_id=job_id, entry=encode_entry(entry),
                                                   capacity=self.capacity, owner=owner, quota=self.quota)
                    if res.status == "committed":
                        self._extend([entry])
                        return committed_certificate(cert, prediction, radius, outcome, res.index, conflict,
                                         self.provenance(res.index), self.namespace)
                    if res.status == "duplicate":
                        mine = self.committed(job_id, cert)
                        if mine is not None:
                            return mine
                        break  # the memory was reset since: this job has no entry any more
                    if res.status == "full":
                        raise MemoryFull(f"the certificate memory of this model holds its maximum of "
                                         f"{self.capacity} entries; nothing was committed")
                    if res.status == "quota":
                        raise MemoryQuota(_quota_message(self.quota))
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
                        if new.outcome == "inside":
                            root = self.provenance(conflict)


def _quota_message(quota: int) -> str:
    return (f"this API key has committed {quota} certificates to this model's memories, its quota "
            f"(SMOOTHCERT_MEMORY_QUOTA_PER_KEY); certify with memory false, or ask an admin")


class JobMemory:
    """The memory as one job's Certifier sees it (the `Memory` methods it calls):
    `answer` returns the job's own entry if it committed one (redelivery), else the
    committed ball containing x (and, when neither, refuses a caller at its quota before any
    sampling); `certify` runs the shared commit protocol."""

    def __init__(self, shared: SharedMemory, job_id: str, on_commit: Callable[[int], None] | None = None,
                 owner: str | None = None):
        self.shared, self.job_id, self.on_commit, self.owner = shared, job_id, on_commit, owner
        self.namespace, self.min_n = shared.namespace, shared.min_n

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None:
        with self.shared.lock:
            mine = self.shared.committed(self.job_id, template)
            if mine is not None:
                return mine
            self.shared.sync()
            found = self.shared.answer(x, template)
        if found is None:
            self.shared.check_quota(self.owner)
        return found

    def certify(self, x: torch.Tensor, certificate: Certificate) -> Certificate:
        if self.on_commit is not None:  # told the samples spent, e.g. to show the "memory" stage
            self.on_commit(certificate.samples)
        committed_cert = self.shared.commit(self.job_id, x, certificate, owner=self.owner)
        failpoints.after_commit()  # a testing hook, inert by default; the lock is not held here
        return committed_cert


def certify_with_memory(certifier: Certifier, shared: SharedMemory, x, job_id: str, *,
                        on_commit: Callable[[int], None] | None = None, owner: str | None = None,
                        **kwargs) -> Certificate:
    """Certify `x` for `job_id` through the shared memory: the job's own entry if it has
    one, else a memory answer if x lies in a committed ball (no sampling), else a fresh
    certificate passed through the rule and committed. `kwargs` go to Certifier.certify."""
    return certifier.certify(x, memory=JobMemory(shared, job_id, on_commit, owner), **kwargs)
