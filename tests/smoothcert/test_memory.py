"""The memory rule (docs/algorithms.md §3.1): new, inside, shrunk, and the invariant; what a
memory answer reports (its root's sampling) and what a memory refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothcert.bounds import InvalidParameters
from smoothcert.memory import (
    ABSTAIN,
    PIVOTS,
    ROUNDING,
    Decision,
    Memory,
    MemoryFull,
    apply_rule,
    distances,
    invariant_violations,
    lookup,
    point_values,
    to_uint8,
)
from smoothcert.results import Certificate, Provenance

# A provenance for tables built by hand (the rule does not read it).
PROV = Provenance(root=None, sigma=0.1, bound="cohen", n0=10, n=100, alpha=0.001, level=0.001, sampling="fixed")


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
        memory.commit(x, d.prediction, d.radius, PROV)
        assert invariant_violations(memory.points, memory.classes, memory.radii) == 0


def test_invariant_check_is_exact_for_close_points_in_a_large_table():
    # Found by reliability/soak.py: a ball the rule shrank onto a nearby abstention (touching
    # up to ROUNDING) was counted as intersecting, because torch.cdist's default turns to
    # ‖a‖² + ‖b‖² − 2a·b above 25 rows and errs by ~1e-6 relative on close points.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        base = torch.rand(64, generator=g)
        near = base.clone()
        near[:3] += torch.tensor([2e-5, -2e-5, 2e-5])
        points = torch.cat([base[None], near[None], torch.rand(30, 64, generator=g) + 5])
        d = float(np.linalg.norm((points[0].double() - points[1].double()).numpy()))
        classes = torch.arange(32)
        classes[0] = ABSTAIN
        radii = torch.zeros(32, dtype=torch.float64)
        radii[1] = d * (1 - ROUNDING)  # what the rule commits when it shrinks onto entry 0
        assert invariant_violations(points, classes, radii) == 0
        radii[1] = d * (1 + ROUNDING)  # a hair too far: the check must see it
        assert invariant_violations(points, classes, radii) == 1


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


def test_an_answer_reports_the_root_whose_sampling_produced_the_ball():
    """An "inside" entry stores its root's sampling, never the fresh run's σ and bound beside
    another entry's class and radius; answers follow inside entries back to the root."""
    memory = Memory("digest/fp32/cpu/0.001", 2, alpha=0.001)
    root = memory.certify(torch.tensor([0.0, 0.0]), template(prediction=0, radius=2.0, sigma=0.5, p_a_lower=0.99))
    # A fresh run of another class whose point lies inside ball 0: answered with class 0.
    inside = memory.certify(torch.tensor([0.5, 0.0]),
                            template(prediction=1, radius=0.3, sigma=0.2, p_a_lower=0.7, n=5000))
    assert inside.memory.outcome == "inside" and inside.memory.root == 0 == root.memory.root
    assert (inside.prediction, inside.sigma, inside.p_a_lower, inside.n) == (0, 0.5, 0.99, 1000)
    assert (inside.memory.prediction_before, inside.memory.radius_before, inside.memory.sigma_before) == (1, 0.3, 0.2)
    assert memory.root_of(1) == 0 and memory.provenance(1).sigma == 0.5
    # A query inside entry 1 (itself inside entry 0) is answered with the root's sampling.
    answered = memory.answer(torch.tensor([0.55, 0.0]), template(prediction=None, radius=0.0, sigma=0.9))
    assert answered.memory.root == 0 and (answered.sigma, answered.p_a_lower) == (0.5, 0.99)
    assert answered.radius <= 2.0 - 0.55


def test_a_memory_holds_one_level_and_a_minimum_n():
    memory = Memory("digest/fp32/cpu/0.001", 2, alpha=0.001, min_n=1000)
    with pytest.raises(InvalidParameters, match="alpha=0.001, not 0.05"):
        memory.certify(torch.zeros(2), template(alpha=0.05))
    with pytest.raises(InvalidParameters, match="at least n=1000"):
        memory.certify(torch.zeros(2), template(n=999))
    assert len(memory) == 0
    # A bare table takes the level of its first certificate, then holds it.
    bare = Memory("m", 2)
    bare.certify(torch.zeros(2), template(alpha=0.01))
    with pytest.raises(InvalidParameters, match="lax certificate never answers for a strict one"):
        bare.certify(torch.ones(2) * 9, template(alpha=0.001))


def test_a_radius_that_is_not_finite_never_enters():
    memory = Memory("m", 2)
    for radius in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="finite number ≥ 0"):
            memory.commit(torch.zeros(2), 0, radius, PROV)
    assert len(memory) == 0
    with pytest.raises(ValueError, match="finite"):
        template(radius=float("inf"))


def test_full_memory_is_an_error_not_an_eviction():
    memory = Memory("m", 2, capacity=1)
    memory.commit(torch.zeros(2), 0, 1.0, PROV)
    with pytest.raises(MemoryFull, match="maximum of 1"):
        memory.commit(torch.ones(2) * 5, 1, 1.0, PROV)
    assert len(memory) == 1


def test_a_borderline_conflict_never_grows_the_radius():
    """Found by the property test: at the rounding slack's edge a 'conflict' can have
    m = d − R_j a hair above the candidate's R; shrinking must keep R, not raise it to m."""
    memory = Memory("m", 3)
    for x, c, r in [([0.0, 1.0, 1.0], 0, 0.0), ([0.0, 0.0, 0.0], 1, 2.0)]:
        d = memory.decide(torch.tensor(x), c, r)
        memory.commit(torch.tensor(x), d.prediction, d.radius, PROV)
    d = memory.decide(torch.tensor([0.0, 1.0, 1.0]), 0, 0.0)
    assert d.radius == 0.0


# --- the memory at scale: original dtype, pruning that returns exactly the scan's answer ---


def test_every_byte_round_trips_through_float32_exactly():
    u = torch.arange(256, dtype=torch.uint8)
    values = point_values(u)
    assert values.dtype == torch.float32
    # The very values an 8-bit image decodes to (smoothcert.imageio divides in float32, too).
    assert np.array_equal(values.numpy(), np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255))
    assert torch.equal(to_uint8(values), u) and torch.equal(to_uint8(values.double()), u)
    assert torch.equal(to_uint8(values.reshape(16, 16)), u.reshape(16, 16))
    nudged = torch.nextafter(values[1:], torch.tensor(2.0))
    assert all(to_uint8(v.reshape(1)) is None for v in nudged)  # one ulp off is not a pixel
    assert to_uint8(torch.tensor([0.5])) is None and to_uint8(torch.tensor([float("nan")])) is None
    assert to_uint8(torch.tensor([-1 / 255])) is None and to_uint8(torch.tensor([256 / 255])) is None
    assert to_uint8(values.double() + 1e-12) is None  # float64 inputs must equal the float32 value


def test_a_row_has_the_same_distance_in_every_block():
    g = torch.Generator().manual_seed(1)
    for dim in (3, 3072):
        pts = torch.randint(0, 256, (300, dim), dtype=torch.uint8, generator=g)
        x = torch.rand(dim, generator=g)
        full = distances(pts, x)
        assert torch.equal(full, distances(point_values(pts), x, block_rows=7))
        for rows in ([5], [0, 299], list(range(0, 300, 3))):
            idx = torch.tensor(rows)
            assert torch.equal(distances(pts[idx], x), full[idx])


def test_a_uint8_table_turns_float32_at_the_first_point_that_is_not_a_pixel():
    memory = Memory("m", 4)
    pixel = torch.tensor([0.0, 1.0, 3 / 255, 254 / 255], dtype=torch.float32)
    memory.commit(pixel, 0, 0.5, PROV)
    memory.extend(torch.tensor([[7, 8, 9, 255]], dtype=torch.uint8), [1], [0.25], [PROV])
    assert memory.points.dtype == torch.uint8 and torch.equal(point_values(memory.points[0]), pixel)
    memory.commit(torch.tensor([0.5, 0.5, 0.5, 0.5]), 1, 0.1, PROV)
    assert memory.points.dtype == torch.float32 and len(memory) == 3
    assert torch.equal(memory.points[0], pixel) and torch.equal(memory.points[1], torch.tensor([7, 8, 9, 255]) / 255)
    with pytest.raises(ValueError, match="rounded"):  # a float64 centre would move
        memory.commit(torch.tensor([0.1, 0.0, 0.0, 0.0], dtype=torch.float64), 0, 0.1, PROV)
    with pytest.raises(ValueError, match="NaN or infinite"):
        memory.commit(torch.tensor([float("nan"), 0, 0, 0]), 0, 0.1, PROV)
    assert len(memory) == 3


def test_appending_grows_the_table_without_copying_it_each_time():
    memory = Memory("m", 2)
    for i in range(200):
        memory.commit(torch.tensor([i / 255, 0.0]), i % 3, 0.001, PROV)
    assert len(memory) == 200 and memory._points.shape[0] < 400
    assert torch.equal(memory.norms, distances(memory.points, torch.zeros(2)))
    for k in range(PIVOTS):
        assert torch.equal(memory._pivot_d[:200, k], distances(memory.points, point_values(memory.points[k])))


def agrees(memory: Memory, x: torch.Tensor, prediction: int, radius: float, start: int = 0) -> bool:
    """The pruned table answers exactly as the brute-force scan on the same entries."""
    pts, cls, rad = memory.points, memory.classes, memory.radii
    found = lookup(pts, cls, rad, x)
    rule = apply_rule(pts[start:], cls[start:], rad[start:], x, prediction, radius)
    if rule.conflict is not None:
        rule = Decision(rule.prediction, rule.radius, rule.outcome, start + rule.conflict)
    return memory.lookup(x) == found and memory.decide(x, prediction, radius, start) == rule


pixel = st.integers(0, 255).map(lambda u: float(np.float32(u) / np.float32(255)))
free = st.floats(-2, 2, width=32)


@st.composite
def scenes(draw):
    """A table and a query made to sit on the edges: duplicates, queries on entries and on
    pivots, radii equal to the distance up to an ulp or to the ROUNDING slack, radii so large
    that margins tie."""
    dim = draw(st.sampled_from([1, 2, 5]))
    points: list[list[float]] = []
    for _ in range(draw(st.integers(0, 30))):
        kind = draw(st.sampled_from(["pixel", "free", "copy", "near"] if points else ["pixel", "free"]))
        if kind in ("copy", "near"):
            p = list(draw(st.sampled_from(points)))
            if kind == "near":
                i = draw(st.integers(0, dim - 1))
                p[i] = float(np.nextafter(np.float32(p[i]), np.float32(draw(st.sampled_from([-3, 3])))))
        else:
            p = draw(st.lists(pixel if kind == "pixel" else free, min_size=dim, max_size=dim))
        points.append(p)
    if points and draw(st.booleans()):
        x = list(draw(st.sampled_from(points)))  # on an entry (maybe a pivot)
    else:
        x = draw(st.lists(st.one_of(pixel, free), min_size=dim, max_size=dim))
    x = torch.tensor(x, dtype=torch.float32)
    pts = torch.tensor(points, dtype=torch.float32).reshape(len(points), dim)
    d = distances(pts, x) if points else torch.zeros(0, dtype=torch.float64)

    def edge(value: float) -> float:
        step = draw(st.sampled_from([0, 0, -1, 1, -2, 2, "up", "down"]))
        if step == "up":
            return value * (1 + ROUNDING)
        if step == "down":
            return value / (1 + ROUNDING)
        for _ in range(abs(step)):
            value = float(np.nextafter(value, np.inf if step > 0 else -np.inf))
        return max(0.0, value)

    classes, radii = [], []
    for i in range(len(points)):
        c = draw(st.integers(ABSTAIN, 2))
        mode = draw(st.sampled_from(["free", "edge", "zero", "huge"] + (["same"] if radii else [])))
        if c == ABSTAIN or mode == "zero":
            r = 0.0
        elif mode == "huge":  # margins d − R round alike: ties the bounds cannot split
            r = 1e8 + draw(st.integers(0, 1))
        elif mode == "same":  # ties between duplicates
            r = draw(st.sampled_from(radii))
        else:
            r = draw(st.floats(0, 3)) if mode == "free" else edge(float(d[i]))
        classes.append(c)
        radii.append(r)
    prediction = draw(st.integers(ABSTAIN, 2))
    radius = draw(st.floats(0, 3))
    if points and prediction != ABSTAIN and draw(st.booleans()):  # just touching entry j
        j = draw(st.integers(0, len(points) - 1))
        radius = edge(max(0.0, float(d[j]) / (1 + ROUNDING) - radii[j]))
    elif prediction == ABSTAIN:
        radius = 0.0
    return dim, pts, classes, radii, x, prediction, radius


@settings(max_examples=400, deadline=None)
@given(scenes(), st.integers(1, 9), st.integers(1, 5), st.integers(1, 3), st.integers(0, 3), st.integers(0, 30))
def test_pruned_answers_are_exactly_the_brute_force_answers(scene, scan_rows, block_rows, first_rows, batches, start):
    """Small scans and blocks: chunk edges, and the best-first search stopping early."""
    dim, pts, classes, radii, x, prediction, radius = scene
    memory = Memory("m", dim)
    memory.scan_rows, memory.block_rows, memory.first_rows = scan_rows, block_rows, first_rows
    cuts = sorted({0, len(pts), *(len(pts) * k // (batches + 1) for k in range(1, batches + 1))})
    for a, b in zip(cuts, cuts[1:], strict=False):  # in batches: pivots and norms kept incrementally
        memory.extend(pts[a:b], classes[a:b], radii[a:b], [PROV] * (b - a))
    assert agrees(memory, x, prediction, radius, min(start, len(pts)))
    assert agrees(memory, x, prediction, radius)


def test_the_exactness_check_rejects_pruning_without_its_safety_margin():
    """Skipping entries whose bound lies within 1% below their threshold (an approximate
    search) changes answers that the comparison with the scan catches."""
    g = torch.Generator().manual_seed(0)
    disagreements = 0
    for _ in range(50):
        pts = torch.rand(40, 2, generator=g)
        x = torch.rand(2, generator=g)
        d = distances(pts, x)
        classes = torch.randint(0, 3, (40,), generator=g)
        radii = d * (0.995 + 0.01 * torch.rand(40, generator=g, dtype=torch.float64))  # on the edge
        memory = Memory("m", 2, dtype=torch.float32)
        memory.extend(pts, classes, radii, [PROV] * 40)
        assert agrees(memory, x, 0, 0.01)
        memory.slack_rate = -0.01
        disagreements += not agrees(memory, x, 0, 0.01)
    assert disagreements > 0


def test_far_entries_are_pruned():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(20, 64, generator=g) * 4
    pts = (centres.repeat_interleave(50, 0) + 0.01 * torch.randn(1000, 64, generator=g)).float()
    memory = Memory("m", 64)
    memory.extend(pts, torch.arange(1000) % 5, torch.full((1000,), 0.05), [PROV] * 1000)
    x = pts[123] + 0.001
    assert agrees(memory, x, 1, 0.05)
    assert memory.exact_rows < 100  # of 1000: the other clusters are ruled out by the bounds
