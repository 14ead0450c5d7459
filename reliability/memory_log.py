"""A memory log as the scenarios check it: read from Redis and decoded (entry format v3,
workers/shared_memory.py), with the store's job → index hash, the invariant of
docs/algorithms.md §3.1, the one-entry-per-job rule and each entry's root (docs/memory.md:
the entry whose own sampling produced the ball)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from service.store import Store
from smoothcert.memory import invariant_violations
from smoothcert.results import Provenance, parse_namespace
from workers.shared_memory import Entry, decode_entry

ROOT_OUTCOMES = ("new", "shrunk")  # an entry whose radius came from its own job's votes


@dataclass
class MemoryLog:
    namespace: str  # digest/numeric mode/device type/α (smoothcert.results.memory_namespace)
    entries: list[Entry]  # in log order
    index: dict[str, int]  # the store's job id → entry index

    @property
    def job_ids(self) -> list[str]:
        return [e.job_id for e in self.entries]

    @property
    def alpha(self) -> float:
        return parse_namespace(self.namespace)[3]

    @cached_property
    def points(self) -> np.ndarray:
        """[N, D] float64: the exact values of the committed points."""
        if not self.entries:
            return np.zeros((0, 0))
        return np.stack([e.values for e in self.entries]).astype(np.float64)

    def violations(self) -> int:
        """Pairs of committed balls of different classes that intersect (0 when sound)."""
        if not self.entries:
            return 0
        return invariant_violations(torch.from_numpy(self.points),
                                    torch.tensor([e.prediction for e in self.entries]),
                                    torch.tensor([e.radius for e in self.entries], dtype=torch.float64))

    def index_problems(self) -> list[str]:
        """What breaks "one entry per job": a job id twice in the log, or an index that
        disagrees with the log (an empty list when the log is sound)."""
        twice = [f"job {j} has {c} entries" for j, c in Counter(self.job_ids).items() if c > 1]
        expected = {j: i for i, j in enumerate(self.job_ids)}
        if self.index != expected:
            twice.append(f"the job→index hash ({len(self.index)} pairs) disagrees with the log "
                         f"({len(self.entries)} entries)")
        return twice

    def root_of(self, i: int) -> int:
        """The root of entry i as its record names it: i itself for an entry of its own sampling."""
        root = self.entries[i].provenance.root
        return i if root is None else root

    def root_problems(self) -> list[str]:
        """What breaks the provenance chain (an empty list when it holds): every entry's record
        is at the memory's α; a "new" or "shrunk" entry is its own root; an "inside" entry names
        the root of the entry that decided it (an earlier one), and carries that root's
        sampling exactly; a root is always a "new" or "shrunk" entry."""
        problems = []
        for i, e in enumerate(self.entries):
            p, root = e.provenance, self.root_of(i)
            if p.alpha != self.alpha:
                problems.append(f"entry {i} is at alpha={p.alpha}, its memory at {self.alpha}")
            if e.outcome in ROOT_OUTCOMES:
                if root != i:
                    problems.append(f"entry {i} ({e.outcome}) names root {root}, not itself")
                continue
            if not 0 <= e.conflict < i:
                problems.append(f"entry {i} (inside) names conflict {e.conflict}")
                continue
            if not 0 <= root < i or root != self.root_of(e.conflict):
                problems.append(f"entry {i} (inside, conflict {e.conflict}) names root {root}, not the "
                                f"conflict's root {self.root_of(e.conflict)}")
                continue
            if self.entries[root].outcome not in ROOT_OUTCOMES:
                problems.append(f"entry {i}'s root {root} is itself an {self.entries[root].outcome} entry")
            elif dataclasses.replace(p, root=None) != self.entries[root].provenance:
                problems.append(f"entry {i} carries a sampling other than its root {root}'s")
        return problems

    def answer_root_problem(self, result: dict[str, Any]) -> str | None:
        """None when a memory result (its `memory` record used) names the right root: the
        root of the entry it committed, or (an answer from a ball) of the entry whose ball
        answered; that root is a "new" or "shrunk" entry, `root_job` is the root's job, and
        the result reports the root's sampling (σ, bound, n0, n, α, its bounds, noise σ)."""
        m = result.get("memory") or {}
        own = m.get("entry") if m.get("entry") is not None else m.get("conflict")
        if own is None or not 0 <= int(own) < len(self.entries):
            return f"names no entry of the log (entry {m.get('entry')}, conflict {m.get('conflict')})"
        root = self.root_of(int(own))
        if m.get("root") != str(root) or m.get("root_job") != self.entries[root].job_id:
            return (f"names root {m.get('root')} (job {m.get('root_job')}), the log root {root} "
                    f"(job {self.entries[root].job_id})")
        if self.entries[root].outcome not in ROOT_OUTCOMES:
            return f"its root {root} is an {self.entries[root].outcome} entry"
        wanted = sampling_of(self.entries[root].provenance)
        reported = {k: result.get(k) for k in wanted}
        if reported != wanted:
            return f"reports sampling {reported}, its root's is {wanted}"
        return None


def sampling_of(p: Provenance) -> dict[str, Any]:
    """The result fields that describe a root's sampling, as a job's result shows them."""
    def opt(value: float | None) -> float | None:
        return None if value is None or math.isnan(value) else value

    return {"sigma": p.sigma, "bound": p.bound, "n0": p.n0, "n": p.n, "alpha": p.alpha,
            "p_a_lower": opt(p.p_a_lower), "p_b_upper": opt(p.p_b_upper),
            "p_a_lower_halves": list(p.p_a_lower_halves) if p.p_a_lower_halves else None,
            "noise_sigma": opt(p.noise_sigma), "noise_tail": p.noise_tail}


def read_log(store: Store, namespace: str) -> MemoryLog:
    entries = [decode_entry(raw) for raw in store.memory_entries(namespace)]
    return MemoryLog(namespace, entries, store.memory_job_index(namespace))


def logged_namespaces(store: Store) -> list[str]:
    """Every memory namespace with a log in Redis, found from the keys themselves (service/
    store.py::_mem: `{prefix}:mem:{digest}:{mode/device/α}:log`)."""
    pattern = re.compile(rf"^{re.escape(store.p)}:mem:\{{([^}}]*)\}}:(.+):log$")
    found = []
    for key in store.r.scan_iter(match=f"{store.p}:mem:*:log", count=1000):
        m = pattern.match(key.decode())
        if m:
            found.append(f"{m.group(1)}/{m.group(2)}")
    return sorted(found)
