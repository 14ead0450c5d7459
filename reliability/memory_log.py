"""A memory log as the scenarios check it: read from Redis and decoded, with the store's
job → index hash, the invariant of ALGORITHMS.md §3.1 and the one-entry-per-job rule."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from service.store import Store
from smoothcert.memory import invariant_violations
from workers.shared_memory import Entry, decode_entry


@dataclass
class MemoryLog:
    namespace: str
    entries: list[Entry]  # in log order
    index: dict[str, int]  # the store's job id → entry index

    @property
    def job_ids(self) -> list[str]:
        return [e.job_id for e in self.entries]

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


def read_log(store: Store, namespace: str) -> MemoryLog:
    entries = [decode_entry(raw) for raw in store.memory_entries(namespace)]
    return MemoryLog(namespace, entries, store.memory_job_index(namespace))
