"""The memory protocol through a real redis-server: the rule's outcomes, answers from the
memory, redelivery, the conflict, stale, duplicate, full and quota paths of the commit, and
what an entry records of its root."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.store import Store
from smoothcert.bounds import InvalidParameters
from smoothcert.bundle import load_bundle
from smoothcert.certifier import Certifier
from smoothcert.memory import ABSTAIN, MemoryFull, invariant_violations
from smoothcert.results import Certificate, Provenance
from tests.workers.helpers import SHAPE, constant
from workers.shared_memory import (
    Entry,
    MemoryQuota,
    SharedMemory,
    certify_with_memory,
    decode_entry,
    encode_entry,
    make_entry,
)

DIM = math.prod(SHAPE)
NS = "sha256:test/fp32/cpu/0.001"


def point(*values: float) -> torch.Tensor:
    """A point on the first axes: distances between such points are easy to read."""
    x = torch.zeros(DIM)
    x[:len(values)] = torch.tensor(values)
    return x.reshape(SHAPE)


def cert(prediction: int | None, radius: float, sigma: float = 0.25, **kw) -> Certificate:
    base = dict(prediction=prediction, radius=radius, sigma=sigma, bound="cohen", n0=10, n=100, alpha=0.001,
                batch_size=100, seed=1, n_a=99, p_a_lower=0.9)
    return Certificate(**(base | kw))


def log(store: Store, ns: str = NS) -> list[Entry]:
    return [decode_entry(b) for b in store.memory_entries(ns)]


def shared(store: Store, capacity: int = 100) -> SharedMemory:
    return SharedMemory(store, NS, DIM, capacity=capacity)


def test_entries_round_trip_through_bytes():
    root = Provenance(root=7, sigma=0.5, bound="drs", n0=10, n=2000, alpha=0.01, level=0.0025, sampling="sequential",
                      p_a_lower_halves=(0.9, 0.8), noise_sigma=0.4999, noise_tail=1e-6)
    e = make_entry(ABSTAIN, 0.0, "shrunk", 1, 0.25, 0.3, 3, root, "job-é", np.arange(DIM, dtype=np.float32))
    back = decode_entry(encode_entry(e))
    assert (back.prediction, back.radius, back.outcome, back.prediction_before, back.radius_before,
            back.sigma_before, back.conflict, back.job_id) == (ABSTAIN, 0.0, "shrunk", 1, 0.25, 0.3, 3, "job-é")
    assert back.provenance == root and np.array_equal(back.point, e.point)
    own = make_entry(1, 0.5, "new", 1, 0.5, 0.3, -1, Provenance.of(cert(1, 0.5)), "j", e.point)
    assert decode_entry(encode_entry(own)).provenance.root is None  # its own root, index known once read


def test_new_shrunk_and_inside_through_the_store(store):
    mem = shared(store)
    a = mem.commit("a", point(0.0), cert(1, 1.0, sigma=0.5, p_a_lower=0.95))
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
    again = fresh.certificate_of(1, cert(0, 1.0))
    assert (again.prediction, again.radius, again.sigma, again.p_a_lower, again.memory) == \
        (b.prediction, b.radius, b.sigma, b.p_a_lower, b.memory)
    # c is "inside": it names a as its root and reports a's sampling, never its own run's
    # σ and bound beside a's class and radius; what it sampled itself is "before".
    assert c.memory.root == 0 and c.memory.root_job == "a" and (c.sigma, c.p_a_lower) == (0.5, 0.95)
    assert (c.memory.sigma_before, c.memory.radius_before) == (0.25, 0.2)
    assert entries[2].provenance.root == 0 and entries[2].provenance.sigma == 0.5
    assert a.memory.root == 0 and b.memory.root == 1 and b.memory.root_job == "b"


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
    assert (b.prediction, b.radius, b.memory) == (a.prediction, a.radius, a.memory) and len(log(store)) == 1
    c = second.commit("job", point(3.0), cert(0, 0.2, sigma=0.9, p_a_lower=0.6))  # a run that came out differently
    assert (c.prediction, c.radius, c.memory) == (a.prediction, a.radius, a.memory)
    assert c.n_a is None and (c.sigma, c.p_a_lower) == (0.25, 0.9)  # the entry's sampling, not this run's


def test_a_memory_takes_only_its_level_and_at_least_min_n(store):
    mem = SharedMemory(store, NS, DIM, capacity=100, min_n=100)
    with pytest.raises(InvalidParameters, match="not 0.05"):
        mem.commit("lax", point(0.0), cert(1, 1.0, alpha=0.05))
    with pytest.raises(InvalidParameters, match="at least n=100"):
        mem.commit("cheap", point(0.0), cert(None, 0.0, n=11))
    assert log(store) == []


def test_each_key_commits_at_most_its_quota_to_a_model(store):
    """The quota counts per key over all of a model's memories, in the commit script itself;
    another key, and answers from the memory, are not affected."""
    mine = SharedMemory(store, NS, DIM, capacity=100, quota=2)
    strict = SharedMemory(store, NS.replace("/0.001", "/0.01"), DIM, capacity=100, quota=2)
    mine.commit("a1", point(0.0), cert(1, 0.5), owner="A")
    strict.commit("a2", point(9.0), cert(1, 0.5, alpha=0.01), owner="A")
    with pytest.raises(MemoryQuota, match="quota"):
        mine.commit("a3", point(5.0), cert(1, 0.5), owner="A")
    with pytest.raises(MemoryQuota):
        mine.check_quota("A")  # refused before any sampling, too
    mine.commit("b1", point(5.0), cert(0, 0.5), owner="B")
    assert store.memory_commits_of("sha256:test", "A") == 2 and store.memory_commits_of("sha256:test", "B") == 1
    assert [e.job_id for e in log(store)] == ["a1", "b1"]
    assert store.memory_namespaces("sha256:test") == sorted([NS, NS.replace("/0.001", "/0.01")])
    assert mine.answer(point(0.1), cert(None, 0.0)).prediction == 1  # answers need no quota
    store.memory_reset_model("sha256:test")
    assert store.memory_commits_of("sha256:test", "A") == 0


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
    mem = SharedMemory(store, certifier.memory_namespace(0.001), DIM, capacity=100)
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
    assert answered.memory.root_job == "job-1" and answered.sigma == first.sigma
    assert store.memory_size(certifier.memory_namespace(0.001))[0] == 1
    assert store.memory_entry_of(certifier.memory_namespace(0.001), "job-2") is None
    with pytest.raises(InvalidParameters, match="not this model's memory at alpha=0.01"):
        certify_with_memory(certifier, mem, constant(0.2), "job-3", **{**kw, "alpha": 0.01})


def test_sequential_certificates_commit_redeliver_and_answer_like_fixed_ones(store, certifier):
    # The rule sees only the certificate: a sequential one (stopped at an early look) commits
    # its radius, and the entry keeps the look's level, which every answer from it reports.
    mem = SharedMemory(store, certifier.memory_namespace(0.001), DIM, capacity=100)
    kw = {"n0": 20, "n": 8000, "alpha": 0.001, "batch_size": 500, "seed": 3,
          "sampling": "sequential", "target_radius": 0.1}
    first = certify_with_memory(certifier, mem, constant(0.55), "job-1", **kw)
    assert first.memory.outcome == "new" and first.radius >= 0.1 and first.target_radius == 0.1
    assert first.n < 8000 and 0 < first.look_alpha < 0.001  # an early look's own share of α
    again = certify_with_memory(certifier, shared_copy(store, certifier), constant(0.55), "job-1", **kw)
    assert again.samples == 0 and again.memory == first.memory
    assert (again.prediction, again.radius, again.p_a_lower) == (first.prediction, first.radius, first.p_a_lower)
    assert again.look_alpha == first.look_alpha and again.sampling == "sequential" and again.n == first.n
    # Two deliveries of one job raced: the entry's look is reported, never the later run's own.
    late = certifier.certify(constant(0.55), **{**kw, "seed": 4})
    assert late.radius != first.radius and late.look_alpha is not None
    raced = mem.commit("job-1", certifier.tensor(constant(0.55)), late)
    assert (raced.radius, raced.memory.entry, raced.look_alpha, raced.n) == (first.radius, 0, first.look_alpha,
                                                                             first.n)
    near = constant(0.55)
    near[0, 0, 0] += 0.01
    answered = certify_with_memory(certifier, mem, near, "job-2", **kw)
    assert answered.samples == 0 and answered.memory.outcome == "inside" and answered.look_alpha == first.look_alpha
    assert 0 < answered.radius < first.radius
    # A later fixed-n job sees the sequential entry as any other ball.
    fixed = certify_with_memory(certifier, mem, near, "job-3", **{**kw, "sampling": "fixed", "target_radius": None})
    assert fixed.memory.outcome == "inside" and fixed.radius == answered.radius
    assert store.memory_size(certifier.memory_namespace(0.001))[0] == 1


def shared_copy(store: Store, certifier: Certifier) -> SharedMemory:
    return SharedMemory(store, certifier.memory_namespace(0.001), DIM, capacity=100)


# --- entries in their original dtype, paged syncs -------------------------------------


def entry(job_id: str, point: np.ndarray, prediction: int = 0, radius: float = 0.1) -> Entry:
    return make_entry(prediction, radius, "new", prediction, radius, 0.25, -1, Provenance.of(cert(prediction, radius)),
                      job_id, point)


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


def test_entries_of_other_format_versions_are_refused():
    """Versions 1 and 2 carried no level and no provenance: their memories live under other
    namespaces and are never read; an entry of another version in a log is an error."""
    raw = bytearray(encode_entry(entry("a", np.zeros(DIM, dtype=np.float32))))
    for version in (1, 2, 9):
        raw[0] = version
        with pytest.raises(RuntimeError, match=f"unknown format version {version}"):
            decode_entry(bytes(raw))


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
