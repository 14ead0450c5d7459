"""The certificate memory shared by every worker through the store (DESIGN.md, "The memory
under concurrency"; the rule is ALGORITHMS.md §3.1).

Guarantees, resting on the store's compare-and-set commit:
- committed balls of different classes never intersect: an entry is appended only on top of
  the exact log (epoch, length) the rule was checked against; when the log grew meanwhile,
  the new entries are synced and the rule is re-applied to them alone, starting from the
  current decision (sound: the decision already clears every older entry);
- at most one entry per job id: a redelivered job gets its first entry back;
- the certificate returned is exactly the committed entry (class, radius, σ, outcome);
- a full memory raises MemoryFull: nothing is evicted.
Distances are computed here, on the worker's device; Redis only compares lengths.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from service.store import Store
from smoothcert.certifier import Certifier
from smoothcert.memory import ABSTAIN, Memory, MemoryFull, apply_rule
from smoothcert.results import OUTCOMES, Certificate, MemoryRecord

# version, class, radius, σ, outcome, class before, radius before, conflict, pA_low, len(job id)
_HEADER = struct.Struct("<BiddBidqdH")
_VERSION = 1
_POINT = np.dtype("<f4")
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
    point: np.ndarray  # float32, flattened


def encode_entry(e: Entry) -> bytes:
    job = e.job_id.encode()
    head = _HEADER.pack(_VERSION, e.prediction, e.radius, e.sigma, OUTCOMES.index(e.outcome),
                        e.prediction_before, e.radius_before, e.conflict, e.p_a_lower, len(job))
    return head + job + np.ascontiguousarray(e.point, dtype=_POINT).tobytes()


def decode_entry(raw: bytes) -> Entry:
    (version, pred, radius, sigma, outcome, before, radius_before, conflict, p_a_lower,
     job_len) = _HEADER.unpack_from(raw)
    if version != _VERSION:
        raise RuntimeError(f"memory entry has unknown format version {version}")
    job = raw[_HEADER.size:_HEADER.size + job_len].decode()
    point = np.frombuffer(raw, dtype=_POINT, offset=_HEADER.size + job_len)
    return Entry(pred, radius, sigma, OUTCOMES[outcome], before, radius_before, conflict,
                 p_a_lower, job, point)


def _opt(value: float) -> float | None:
    return None if math.isnan(value) else value


def _cls(value: int) -> int | None:
    return None if value == ABSTAIN else value


class SharedMemory:
    """This process's copy of one namespace's log, and the commit protocol over it."""

    def __init__(self, store: Store, namespace: str, dim: int, *, capacity: int,
                 device: torch.device | str = "cpu"):
        self.store, self.namespace, self.dim = store, namespace, dim
        self.capacity, self.device = capacity, torch.device(device)
        self._reset(None)

    def _reset(self, epoch: int | None) -> None:
        self.epoch = epoch
        self.local = Memory(self.namespace, self.dim, device=self.device)
        # Header columns the local Memory does not hold, to rebuild an entry's certificate.
        self._outcome = np.empty(0, np.int8)
        self._before = np.empty(0, np.int64)
        self._radius_before = np.empty(0, np.float64)
        self._conflict = np.empty(0, np.int64)
        self._p_a_lower = np.empty(0, np.float64)

    def __len__(self) -> int:
        return len(self.local)

    def sync(self) -> None:
        """Pull the entries committed since the last sync; rebuild on a new epoch (reset).

        The epoch is read before and after the entries: equal reads mean no reset in between
        (epochs only grow), so the entries belong to that epoch."""
        while True:
            epoch = self.store.memory_epoch(self.namespace)
            if epoch != self.epoch:
                self._reset(epoch)
            raw = self.store.memory_entries(self.namespace, len(self))
            if self.store.memory_epoch(self.namespace) == epoch:
                self._extend([decode_entry(b) for b in raw])
                return

    def _extend(self, entries: list[Entry]) -> None:
        # One concatenation per sync, not per entry: a first sync may pull the whole log.
        if not entries:
            return
        if any(e.point.size != self.dim for e in entries):
            raise RuntimeError(f"memory {self.namespace} holds an entry of the wrong size")
        self.local.extend(torch.from_numpy(np.stack([e.point for e in entries])),
                          [e.prediction for e in entries], [e.radius for e in entries],
                          [e.sigma for e in entries])
        cols = {"_outcome": [OUTCOMES.index(e.outcome) for e in entries],
                "_before": [e.prediction_before for e in entries],
                "_radius_before": [e.radius_before for e in entries],
                "_conflict": [e.conflict for e in entries],
                "_p_a_lower": [e.p_a_lower for e in entries]}
        for name, values in cols.items():
            old = getattr(self, name)
            setattr(self, name, np.concatenate([old, np.asarray(values, dtype=old.dtype)]))

    def certificate_of(self, index: int, base: Certificate) -> Certificate:
        """Entry `index` as a certificate; `base` supplies the request's parameters. Its
        sampling fields are kept only if they produced this entry (same class and radius
        before the rule), so nothing in the answer describes a different run."""
        before, radius_before = _cls(int(self._before[index])), _opt(float(self._radius_before[index]))
        if (base.prediction, base.radius) != (before, radius_before):
            base = base.replace(n_a=None, p_b_upper=None, runner_up=None, n_a_halves=None,
                                p_a_lower_halves=None, search=None)
        conflict = int(self._conflict[index])
        return base.replace(
            prediction=_cls(int(self.local.classes[index])), radius=float(self.local.radii[index]),
            sigma=float(self.local.sigmas[index]), p_a_lower=_opt(float(self._p_a_lower[index])),
            memory=MemoryRecord(OUTCOMES[self._outcome[index]], before, radius_before, index,
                                None if conflict < 0 else conflict),
        )

    def committed(self, job_id: str, base: Certificate) -> Certificate | None:
        """The certificate `job_id` already committed (a redelivered job), or None."""
        for _ in range(_RETRIES):  # the index is only meaningful in the epoch it was read in
            epoch = self.store.memory_epoch(self.namespace)
            index = self.store.memory_entry_of(self.namespace, job_id)
            if index is None:
                return None
            self.sync()
            if self.epoch == epoch and index < len(self):
                return self.certificate_of(index, base)
        raise RuntimeError(f"memory {self.namespace} kept changing epoch while reading job {job_id}")

    def commit(self, job_id: str, x: torch.Tensor, cert: Certificate) -> Certificate:
        """Apply the rule to a fresh certificate and commit it; returns the committed one."""
        before = ABSTAIN if cert.prediction is None else cert.prediction
        point = x.detach().reshape(-1).to("cpu", torch.float32).numpy()
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
                    return self.certificate_of(res.index, cert)
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
                new = apply_rule(self.local.points[length:], self.local.classes[length:],
                                 self.local.radii[length:], x, prediction, radius)
                if new.outcome != "new":
                    prediction, radius = new.prediction, new.radius
                    outcomes.add(new.outcome)
                    conflict = length + new.conflict


class JobMemory:
    """The memory as one job's Certifier sees it (the `Memory` methods it calls):
    `answer` returns the job's own entry if it committed one (redelivery), else the
    committed ball containing x; `certify` runs the shared commit protocol."""

    def __init__(self, shared: SharedMemory, job_id: str,
                 on_commit: Callable[[int], None] | None = None):
        self.shared, self.job_id, self.on_commit = shared, job_id, on_commit
        self.namespace = shared.namespace

    def answer(self, x: torch.Tensor, template: Certificate) -> Certificate | None:
        mine = self.shared.committed(self.job_id, template)
        if mine is not None:
            return mine
        self.shared.sync()
        return self.shared.local.answer(x, template)

    def certify(self, x: torch.Tensor, certificate: Certificate) -> Certificate:
        if self.on_commit is not None:  # told the samples spent, e.g. to show the "memory" stage
            self.on_commit(certificate.samples)
        return self.shared.commit(self.job_id, x, certificate)


def certify_with_memory(certifier: Certifier, shared: SharedMemory, x, job_id: str, *,
                        on_commit: Callable[[int], None] | None = None, **kwargs) -> Certificate:
    """Certify `x` for `job_id` through the shared memory: the job's own entry if it has
    one, else a memory answer if x lies in a committed ball (no sampling), else a fresh
    certificate passed through the rule and committed. `kwargs` go to Certifier.certify."""
    return certifier.certify(x, memory=JobMemory(shared, job_id, on_commit), **kwargs)
