"""The memory protocol through a real redis-server: the rule's outcomes, answers from the
memory, redelivery, and the conflict, stale, duplicate and full paths of the commit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.store import Store
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.memory import ABSTAIN, MemoryFull, invariant_violations
from smoothcert.results import Certificate
from tests.workers.helpers import SHAPE, constant
from workers.shared_memory import (
    Entry,
    SharedMemory,
    certify_with_memory,
    decode_entry,
    encode_entry,
)

DIM = math.prod(SHAPE)
NS = "sha256:test/fp32"


def point(*values: float) -> torch.Tensor:
    """A point on the first axes: distances between such points are easy to read."""
    x = torch.zeros(DIM)
    x[:len(values)] = torch.tensor(values)
    return x.reshape(SHAPE)


def cert(prediction: int | None, radius: float, sigma: float = 0.25) -> Certificate:
    return Certificate(prediction=prediction, radius=radius, sigma=sigma, bound="cohen", n0=10,
                       n=100, alpha=0.001, batch_size=100, seed=1, n_a=99, p_a_lower=0.9)


def log(store: Store, ns: str = NS) -> list[Entry]:
    return [decode_entry(b) for b in store.memory_entries(ns)]


def shared(store: Store, capacity: int = 100) -> SharedMemory:
    return SharedMemory(store, NS, DIM, capacity=capacity)


def test_entries_round_trip_through_bytes():
    e = Entry(ABSTAIN, 0.0, 0.5, "shrunk", 1, 0.25, 3, math.nan, "job-é", np.arange(DIM, dtype=np.float32))
    back = decode_entry(encode_entry(e))
    assert (back.prediction, back.radius, back.sigma, back.outcome, back.prediction_before,
            back.radius_before, back.conflict, back.job_id) == (ABSTAIN, 0.0, 0.5, "shrunk", 1, 0.25, 3, "job-é")
    assert math.isnan(back.p_a_lower) and np.array_equal(back.point, e.point)


def test_new_shrunk_and_inside_through_the_store(store):
    mem = shared(store)
    a = mem.commit("a", point(0.0), cert(1, 1.0))
    b = mem.commit("b", point(1.5), cert(0, 1.0))  # touches a: shrinks to 1.5 − 1.0
    c = mem.commit("c", point(0.3), cert(0, 0.2))  # lies in a: takes a's class
    assert (a.memory.outcome, a.prediction, a.radius, a.memory.entry) == ("new", 1, 1.0, 0)
    assert b.memory.outcome == "shrunk" and b.prediction == 0 and b.radius == pytest.approx(0.5)
    assert b.memory.radius_before == 1.0 and b.memory.conflict == 0
    assert c.memory.outcome == "inside" and c.prediction == 1 and c.radius == pytest.approx(0.7)
    assert c.memory.prediction_before == 0 and c.memory.entry == 2
    entries = log(store)
    assert [(e.job_id, e.prediction, e.outcome) for e in entries] == [
        ("a", 1, "new"), ("b", 0, "shrunk"), ("c", 1, "inside")]
    assert [e.radius for e in entries] == [a.radius, b.radius, c.radius]
    fresh = shared(store)  # another worker's copy sees the same certificates
    fresh.sync()
    assert fresh.certificate_of(1, cert(0, 1.0)) == b


class Racing(Store):
    """Runs `race()` once, just before the next commit: another worker commits between this
    worker's sync and its compare-and-set."""

    race = None
    commits = 0

    def memory_commit(self, *args, **kwargs):
        self.commits += 1
        race, self.race = self.race, None
        if race is not None:
            race()
        return super().memory_commit(*args, **kwargs)


@pytest.fixture()
def racing(redis_client) -> Racing:
    return Racing(redis_client)


def test_conflict_syncs_and_reapplies_the_rule_to_the_new_entries(racing, store):
    mine, other = shared(racing), shared(store)
    mine.commit("far", point(0.0, 5.0), cert(1, 0.1))  # an old entry, nowhere near
    # Committed as decided before the race, "mine" (radius 1.0 at distance 1.5) would
    # intersect "theirs" (radius 1.0): only re-applying the rule keeps the invariant.
    racing.race = lambda: other.commit("theirs", point(1.5), cert(0, 1.0))
    racing.commits = 0
    got = mine.commit("mine", point(0.0), cert(1, 1.0))
    assert racing.commits == 2  # conflict, then committed
    assert got.memory.outcome == "shrunk" and got.radius == pytest.approx(0.5)
    assert got.memory.conflict == 1 and got.memory.entry == 2
    entries = log(store)
    assert [e.job_id for e in entries] == ["far", "theirs", "mine"]
    pts = torch.from_numpy(np.stack([e.values for e in entries]))
    assert invariant_violations(pts, torch.tensor([e.prediction for e in entries]),
                                torch.tensor([e.radius for e in entries])) == 0


def test_outcomes_accumulate_over_conflict_passes(racing, store):
    mine, other = shared(racing), shared(store)
    mine.commit("z", point(2.0), cert(0, 0.5))  # mine shrinks against it: 2.0 − 0.5 = 1.5
    racing.race = lambda: other.commit("big", point(0.0, 0.5), cert(0, 1.0))  # then x lies inside
    got = mine.commit("mine", point(0.0), cert(1, 1.8))
    assert got.memory.outcome == "inside" and got.prediction == 0 and got.memory.prediction_before == 1
    assert got.radius == pytest.approx(0.5) and got.memory.conflict == 1


def test_stale_epoch_rebuilds_and_commits_to_the_new_log(racing, store):
    mine = shared(racing)
    mine.commit("old", point(0.4), cert(0, 1.0))
    racing.race = lambda: store.memory_reset(NS)
    got = mine.commit("mine", point(0.0), cert(1, 1.0))
    assert got.memory.outcome == "new" and got.memory.entry == 0  # the old ball is gone
    assert [e.job_id for e in log(store)] == ["mine"] and mine.epoch == 1


def test_a_job_commits_once(store):
    first, second = shared(store), shared(store)
    a = first.commit("job", point(0.0), cert(1, 1.0))
    b = second.commit("job", point(0.0), cert(1, 1.0))  # a second run of the same job
    assert b == a and len(log(store)) == 1
    c = second.commit("job", point(3.0), cert(0, 0.2))  # a run that came out differently
    assert (c.prediction, c.radius, c.memory) == (a.prediction, a.radius, a.memory)
    assert c.n_a is None  # its sampling fields did not produce the entry


def test_full_memory_is_an_error_not_an_eviction(store):
    mem = shared(store, capacity=1)
    mem.commit("a", point(0.0), cert(1, 0.1))
    with pytest.raises(MemoryFull, match="maximum of 1"):
        mem.commit("b", point(3.0), cert(0, 0.1))
    assert [e.job_id for e in log(store)] == ["a"]


@pytest.fixture()
def certifier(bundle) -> Certifier:
    return Certifier(load_bundle(bundle[2]), device="cpu")


def test_certify_with_memory_answers_redelivers_and_commits_once(store, certifier):
    mem = SharedMemory(store, certifier.namespace, DIM, capacity=100)
    kw = {"n0": 20, "n": 500, "alpha": 0.001, "batch_size": 500, "seed": 3}
    first = certify_with_memory(certifier, mem, constant(0.9), "job-1", **kw)
    assert first.memory.outcome == "new" and first.memory.entry == 0 and first.samples == 520
    again = certify_with_memory(certifier, shared_copy(store, certifier), constant(0.9), "job-1", **kw)
    assert again.samples == 0  # redelivered: the committed entry, no sampling
    assert (again.prediction, again.radius, again.sigma, again.p_a_lower, again.memory) == \
        (first.prediction, first.radius, first.sigma, first.p_a_lower, first.memory)
    near = constant(0.9)
    near[0, 0, 0] += 0.01  # inside the first ball
    answered = certify_with_memory(certifier, mem, near, "job-2", **kw)
    assert answered.samples == 0 and answered.memory.outcome == "inside" and answered.memory.entry is None
    assert answered.memory.conflict == 0 and 0 < answered.radius < first.radius
    assert store.memory_size(certifier.namespace)[0] == 1
    assert store.memory_entry_of(certifier.namespace, "job-2") is None


def test_sequential_certificates_commit_redeliver_and_answer_like_fixed_ones(store, certifier):
    # The rule sees only the certificate: a sequential one (stopped at an early look) commits
    # its radius; what the memory does not keep (the look's level) is not claimed afterwards.
    mem = SharedMemory(store, certifier.namespace, DIM, capacity=100)
    kw = {"n0": 20, "n": 8000, "alpha": 0.001, "batch_size": 500, "seed": 3,
          "sampling": "sequential", "target_radius": 0.1}
    first = certify_with_memory(certifier, mem, constant(0.55), "job-1", **kw)
    assert first.memory.outcome == "new" and first.radius >= 0.1 and first.target_radius == 0.1
    assert first.n < 8000 and 0 < first.look_alpha < 0.001  # an early look's own share of α
    again = certify_with_memory(certifier, shared_copy(store, certifier), constant(0.55), "job-1", **kw)
    assert again.samples == 0 and again.memory == first.memory
    assert (again.prediction, again.radius, again.p_a_lower) == (first.prediction, first.radius, first.p_a_lower)
    assert again.look_alpha is None and again.sampling == "sequential"
    # Two deliveries of one job raced: the later run's own look is not claimed for the entry.
    late = certifier.certify(constant(0.55), **{**kw, "seed": 4})
    assert late.radius != first.radius and late.look_alpha is not None
    raced = mem.commit("job-1", certifier.tensor(constant(0.55)), late)
    assert (raced.radius, raced.memory.entry) == (first.radius, 0) and raced.look_alpha is None
    near = constant(0.55)
    near[0, 0, 0] += 0.01
    answered = certify_with_memory(certifier, mem, near, "job-2", **kw)
    assert answered.samples == 0 and answered.memory.outcome == "inside" and answered.look_alpha is None
    assert 0 < answered.radius < first.radius
    # A later fixed-n job sees the sequential entry as any other ball.
    fixed = certify_with_memory(certifier, mem, near, "job-3", **{**kw, "sampling": "fixed", "target_radius": None})
    assert fixed.memory.outcome == "inside" and fixed.radius == answered.radius
    assert store.memory_size(certifier.namespace)[0] == 1


def shared_copy(store: Store, certifier: Certifier) -> SharedMemory:
    return SharedMemory(store, certifier.namespace, DIM, capacity=100)


# --- entries in their original dtype, paged syncs -------------------------------------


def entry(job_id: str, point: np.ndarray, prediction: int = 0, radius: float = 0.1) -> Entry:
    return Entry(prediction, radius, 0.25, "new", prediction, radius, -1, 0.9, job_id, point)


def test_pixel_images_travel_as_uint8_and_others_as_float32():
    pixels = np.arange(DIM, dtype=np.uint8) * 15
    image = pixels.astype(np.float32) / np.float32(255)  # what a decoded 8-bit image holds
    small, back = encode_entry(entry("a", image)), decode_entry(encode_entry(entry("a", image)))
    assert back.point.dtype == np.uint8 and np.array_equal(back.point, pixels)
    assert np.array_equal(back.values, image) and back.values.dtype == np.float32
    other = image.copy()
    other[3] = np.nextafter(other[3], np.float32(1))  # one ulp off a pixel value
    large, back = encode_entry(entry("a", other)), decode_entry(encode_entry(entry("a", other)))
    assert back.point.dtype == np.float32 and np.array_equal(back.point, other)
    assert len(large) - len(small) == 3 * DIM
    with pytest.raises(ValueError, match="rounded"):
        encode_entry(entry("a", np.full(DIM, 0.1, dtype=np.float64)))


def test_format_version_1_entries_are_still_read():
    import struct

    head = struct.pack("<BiddBidqdH", 1, 2, 0.5, 0.25, 2, 3, 0.75, 4, 0.9, 3)
    values = np.linspace(0, 1, DIM, dtype=np.float32)
    e = decode_entry(head + b"old" + values.tobytes())
    assert (e.prediction, e.radius, e.sigma, e.outcome, e.prediction_before, e.radius_before, e.conflict,
            e.p_a_lower, e.job_id) == (2, 0.5, 0.25, "shrunk", 3, 0.75, 4, 0.9, "old")
    assert e.point.dtype == np.float32 and np.array_equal(e.values, values)
    with pytest.raises(RuntimeError, match="unknown format version 9"):
        decode_entry(b"\x09" + head[1:])


def test_a_log_of_both_dtypes_syncs_exactly(store):
    rng = np.random.default_rng(0)
    mem = shared(store)
    pixels = [rng.integers(0, 256, DIM).astype(np.float32) / np.float32(255) for _ in range(3)]
    mem.commit("p0", torch.from_numpy(pixels[0]), cert(0, 0.01))
    mem.commit("p1", torch.from_numpy(pixels[1]), cert(1, 0.01))
    assert mem.local.points.dtype == torch.uint8
    free = rng.random(DIM).astype(np.float32)
    mem.commit("f", torch.from_numpy(free), cert(0, 0.01))
    mem.commit("p2", torch.from_numpy(pixels[2]), cert(1, 0.01))
    assert mem.local.points.dtype == torch.float32
    fresh = shared(store)
    fresh.sync()
    stored = [e.point.dtype for e in log(store)]
    assert stored == [np.uint8, np.uint8, np.float32, np.uint8]
    expected = torch.from_numpy(np.stack([pixels[0], pixels[1], free, pixels[2]]))
    assert torch.equal(fresh.local.points, expected) and torch.equal(mem.local.points, expected)


class Paging(Store):
    """Records every page a sync asks for; runs `between()` once after the first page."""

    pages: list
    between = None

    def memory_entries(self, namespace, start=0, stop=None):
        self.pages.append((start, stop))
        got = super().memory_entries(namespace, start, stop)
        between, self.between = self.between, None
        if between is not None:
            between()
        return got


@pytest.fixture()
def paging(redis_client) -> Paging:
    p = Paging(redis_client)
    p.pages = []
    return p


def test_sync_pulls_only_new_entries_a_page_at_a_time(paging, store):
    writer = shared(store)
    for i in range(10):
        writer.commit(f"j{i}", point(3.0 * i), cert(i % 2, 0.5))
    mem = SharedMemory(paging, NS, DIM, capacity=100, page=4)
    mem.sync()
    assert paging.pages == [(0, 4), (4, 8), (8, 12)] and len(mem) == 10
    writer.commit("j10", point(40.0), cert(0, 0.5))
    paging.pages.clear()
    mem.sync()
    assert paging.pages == [(10, 14)] and len(mem) == 11
    assert torch.equal(mem.local.points, writer.local.points)
    assert torch.equal(mem.local.radii, writer.local.radii)


def test_a_reset_between_pages_rebuilds_from_the_new_log(paging, store):
    writer = shared(store)
    for i in range(6):
        writer.commit(f"old{i}", point(3.0 * i), cert(0, 0.5))

    def reset_and_refill():
        store.memory_reset(NS)
        fresh = shared(store)
        for i in range(5):
            fresh.commit(f"new{i}", point(0.0, 3.0 * i), cert(1, 0.25))

    paging.between = reset_and_refill
    mem = SharedMemory(paging, NS, DIM, capacity=100, page=4)
    mem.sync()
    assert mem.epoch == 1 and len(mem) == 5
    assert [mem.certificate_of(i, cert(1, 0.25)).prediction for i in range(5)] == [1] * 5
    assert torch.equal(mem.local.points, torch.stack([point(0.0, 3.0 * i).reshape(-1) for i in range(5)]))


def test_a_point_float32_would_round_is_refused(store):
    mem = shared(store)
    with pytest.raises(ValueError, match="rounded"):
        mem.commit("x", point(0.1).double() + 1e-12, cert(0, 0.1))
    assert log(store) == []
