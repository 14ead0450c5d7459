"""The memory rule (ALGORITHMS.md §3.1): new, inside, shrunk, and the invariant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothcert.memory import ABSTAIN, Memory, MemoryFull, apply_rule, invariant_violations, lookup
from smoothcert.results import Certificate


def table(*entries):
    points = torch.tensor([e[0] for e in entries], dtype=torch.float32)
    classes = torch.tensor([e[1] for e in entries], dtype=torch.int64)
    radii = torch.tensor([e[2] for e in entries], dtype=torch.float64)
    return points, classes, radii


def test_new_when_nothing_conflicts():
    pts, cls, rad = table(([0.0, 0.0], 1, 1.0), ([3.0, 0.0], 1, 1.0))
    d = apply_rule(pts, cls, rad, torch.tensor([1.5, 0.0]), 1, 2.0)  # same class: overlap is fine
    assert (d.outcome, d.prediction, d.radius, d.conflict) == ("new", 1, 2.0, None)
    d = apply_rule(pts, cls, rad, torch.tensor([0.0, 3.0]), 0, 2.0)  # touching, not intersecting
    assert d.outcome == "new" or d.radius < 2.0


def test_shrunk_to_the_nearest_different_class_ball():
    pts, cls, rad = table(([0.0, 0.0], 0, 1.0), ([5.0, 0.0], 2, 0.5), ([0.0, -2.0], 3, 0.1))
    d = apply_rule(pts, cls, rad, torch.tensor([2.5, 0.0]), 1, 3.0)
    assert d.outcome == "shrunk" and d.prediction == 1 and d.conflict == 0
    assert d.radius == pytest.approx(1.5) and d.radius < 1.5  # rounded down, never up


def test_inside_a_committed_ball_takes_its_class():
    pts, cls, rad = table(([0.0, 0.0], 0, 2.0), ([5.0, 0.0], 2, 0.5))
    d = apply_rule(pts, cls, rad, torch.tensor([0.5, 0.0]), 1, 0.8)
    assert (d.outcome, d.prediction, d.conflict) == ("inside", 0, 0)
    assert d.radius == pytest.approx(1.5) and d.radius < 1.5


def test_abstentions_are_entries_of_their_own_class():
    pts, cls, rad = table(([0.0, 0.0], ABSTAIN, 0.0))
    d = apply_rule(pts, cls, rad, torch.tensor([1.0, 0.0]), 4, 3.0)
    assert d.outcome == "shrunk" and d.radius == pytest.approx(1.0)
    pts, cls, rad = table(([0.0, 0.0], 4, 3.0))
    d = apply_rule(pts, cls, rad, torch.tensor([1.0, 0.0]), ABSTAIN, 0.0)
    assert (d.outcome, d.prediction) == ("inside", 4)


def test_lookup_answers_inside_a_ball_only():
    pts, cls, rad = table(([0.0, 0.0], 0, 2.0), ([4.0, 0.0], 0, 1.0), ([9.0, 0.0], ABSTAIN, 0.0))
    assert lookup(pts, cls, rad, torch.tensor([0.5, 0.0]))[0] == 0
    assert lookup(pts, cls, rad, torch.tensor([3.5, 0.0]))[0] == 1  # deeper in ball 1 than ball 0
    assert lookup(pts, cls, rad, torch.tensor([2.0, 0.0])) is None  # on the sphere: open ball
    assert lookup(pts, cls, rad, torch.tensor([9.0, 0.0])) is None  # abstentions answer nothing


entries = st.lists(
    st.tuples(
        st.lists(st.floats(-3, 3, allow_nan=False), min_size=3, max_size=3),
        st.integers(ABSTAIN, 3),
        st.floats(0, 4, allow_nan=False),
    ),
    min_size=1, max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(entries, st.integers(0, 40))
def test_random_sequences_never_leave_intersecting_balls(sequence, split):
    """Apply the rule in order; also apply it in two passes (old entries, then entries
    committed meanwhile), as a worker does when its compare-and-set loses a race."""
    memory = Memory("m", 3)
    for i, (x, c, r) in enumerate(sequence):
        x = torch.tensor(x)
        r = 0.0 if c == ABSTAIN else r
        if i >= 2 and split % 2:
            cut = split % i
            head = apply_rule(memory.points[:cut], memory.classes[:cut], memory.radii[:cut], x, c, r)
            d = apply_rule(memory.points[cut:], memory.classes[cut:], memory.radii[cut:], x,
                           head.prediction, head.radius)
            inside = "inside" in (head.outcome, d.outcome)
        else:
            d = memory.decide(x, c, r)
            inside = d.outcome == "inside"
        # Only an "inside" answer may grow a radius (it takes the containing ball's class).
        assert d.radius <= r or inside
        memory.commit(x, d.prediction, d.radius, 0.1)
        assert invariant_violations(memory.points, memory.classes, memory.radii) == 0


def test_blocked_distances_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(10_001, 12, generator=g)
    x = torch.rand(12, generator=g)
    from smoothcert.memory import distances
    assert torch.allclose(distances(pts, x, block_rows=1000), (pts.double() - x.double()).norm(dim=1))


def template(**kw) -> Certificate:
    base = dict(prediction=1, radius=2.0, sigma=0.3, bound="cohen", n0=100, n=1000, alpha=0.001,
                batch_size=100, seed=0, n_a=990, p_a_lower=0.98)
    return Certificate(**(base | kw))


def test_memory_certify_returns_the_committed_entry():
    memory = Memory("digest/fp32", 2)
    first = memory.certify(torch.tensor([0.0, 0.0]), template(prediction=0, radius=1.0))
    second = memory.certify(torch.tensor([2.0, 0.0]), template(prediction=1, radius=3.0))
    assert first.memory.outcome == "new" and first.memory.entry == 0
    assert second.memory.outcome == "shrunk" and second.radius == pytest.approx(1.0)
    assert (second.memory.prediction_before, second.memory.radius_before) == (1, 3.0)
    assert float(memory.radii[1]) == second.radius and int(memory.classes[1]) == second.prediction
    answered = memory.answer(torch.tensor([0.1, 0.0]), template(prediction=None, radius=0.0))
    assert answered.prediction == 0 and answered.radius == pytest.approx(0.9) and answered.samples == 0
    assert answered.memory.outcome == "inside" and answered.memory.entry is None
    abstained = memory.certify(torch.tensor([5.0, 5.0]), template(prediction=None, radius=0.0))
    assert abstained.abstained and int(memory.classes[-1]) == ABSTAIN


def test_full_memory_is_an_error_not_an_eviction():
    memory = Memory("m", 2, capacity=1)
    memory.commit(torch.zeros(2), 0, 1.0, 0.1)
    with pytest.raises(MemoryFull, match="maximum of 1"):
        memory.commit(torch.ones(2) * 5, 1, 1.0, 0.1)
    assert len(memory) == 1


def test_a_borderline_conflict_never_grows_the_radius():
    """Found by the property test: at the rounding slack's edge a 'conflict' can have
    m = d − R_j a hair above the candidate's R; shrinking must keep R, not raise it to m."""
    memory = Memory("m", 3)
    for x, c, r in [([0.0, 1.0, 1.0], 0, 0.0), ([0.0, 0.0, 0.0], 1, 2.0)]:
        d = memory.decide(torch.tensor(x), c, r)
        memory.commit(torch.tensor(x), d.prediction, d.radius, 0.1)
    d = memory.decide(torch.tensor([0.0, 1.0, 1.0]), 0, 0.0)
    assert d.radius == 0.0
