"""reliability/memory_log.py's provenance checks on hand-made v3 logs: a sound chain passes, and
each way a root can be misnamed, or an answer misreport its root's sampling, is caught."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from reliability.memory_log import MemoryLog
from smoothcert.results import Provenance, memory_namespace
from workers.shared_memory import decode_entry, encode_entry, make_entry

NAMESPACE = memory_namespace("sha256:test", "fp32", "cpu", 0.001)
OWN = Provenance(root=None, sigma=0.25, bound="cohen", n0=100, n=1000, alpha=0.001, level=0.001,
                 sampling="fixed", p_a_lower=0.9, noise_sigma=0.25, noise_tail=1e-20)
POINT = np.zeros(16, dtype=np.float32)


def entry(outcome: str, conflict: int, provenance: Provenance, job: str):
    """An entry as the log holds it (encoded and decoded: format v3)."""
    return decode_entry(encode_entry(make_entry(1, 0.3, outcome, 1, 0.3, 0.25, conflict, provenance, job, POINT)))


def chain(*last) -> MemoryLog:
    """Root 0 ("new"), entry 1 inside it, and `last` (entry 2's outcome, conflict, provenance)."""
    entries = [entry("new", -1, OWN, "j0"), entry("inside", 0, dataclasses.replace(OWN, root=0), "j1"),
               entry(*last, "j2")]
    return MemoryLog(NAMESPACE, entries, {"j0": 0, "j1": 1, "j2": 2})


def answer(**changes) -> dict:
    """A memory answer from entry 2's ball, reporting root 0's sampling."""
    memory = {"used": True, "outcome": "inside", "entry": None, "conflict": "2", "root": "0", "root_job": "j0"}
    result = {"memory": memory, "sigma": 0.25, "bound": "cohen", "n0": 100, "n": 1000, "alpha": 0.001,
              "p_a_lower": 0.9, "p_b_upper": None, "p_a_lower_halves": None, "noise_sigma": 0.25,
              "noise_tail": 1e-20}
    memory.update(changes.pop("memory", {}))
    return result | changes


def test_a_sound_chain_passes():
    log = chain("inside", 1, dataclasses.replace(OWN, root=0))
    assert log.root_problems() == []
    assert [log.root_of(i) for i in range(3)] == [0, 0, 0]
    assert log.answer_root_problem(answer()) is None


@pytest.mark.parametrize(("last", "wanted"), [
    (("inside", 1, dataclasses.replace(OWN, root=1)), "not the conflict's root 0"),
    (("inside", 1, dataclasses.replace(OWN, root=0, n=999)), "a sampling other than its root 0's"),
    (("inside", 1, dataclasses.replace(OWN, root=0, alpha=0.01)), "at alpha=0.01"),
    (("new", -1, dataclasses.replace(OWN, root=0)), "names root 0, not itself"),
])
def test_a_misnamed_root_is_caught(last, wanted):
    problems = chain(*last).root_problems()
    assert any(wanted in p for p in problems), problems


@pytest.mark.parametrize(("changes", "wanted"), [
    ({"memory": {"root": "1"}}, "names root 1"),
    ({"memory": {"root_job": "j1"}}, "names root 0 (job j1)"),
    ({"n": 500}, "reports sampling"),
    ({"sigma": 0.5}, "reports sampling"),
    ({"memory": {"conflict": "7"}}, "names no entry"),
])
def test_an_answer_misreporting_its_root_is_caught(changes, wanted):
    log = chain("inside", 1, dataclasses.replace(OWN, root=0))
    problem = log.answer_root_problem(answer(**changes))
    assert problem is not None and wanted in problem, problem
