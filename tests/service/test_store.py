"""The shared store against a real redis-server: job lifecycle and the memory's Lua commit."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from service.store import QueueFull, Store
from tests.redis_server import RedisServer


@pytest.fixture()
def store(redis_client) -> Store:
    return Store(redis_client, prefix="t", job_ttl_seconds=60)


def new_job(store, **kw):
    args = dict(model="digits", digest="sha256:abc", request={"n": 100}, input_bytes=b"x") | kw
    return store.create_job("certification", **args)


def test_job_round_trip_and_ttl(store, redis_client):
    job, created = new_job(store, owner="k1")
    assert created and job.status == "queued"
    got = store.get_job(job.id)
    assert (got.id, got.kind, got.owner, got.request, got.status) == (
        job.id, "certification", "k1", {"n": 100}, "queued")
    assert store.get_input(job.id) == b"x"
    assert 0 < redis_client.ttl(f"t:job:{job.id}") <= 60 and 0 < redis_client.ttl(f"t:input:{job.id}") <= 60
    assert store.get_job("nope") is None and store.open_jobs() == 1


def test_idempotency_key_returns_the_first_job_per_owner(store):
    first, _ = new_job(store, owner="a", idempotency_key="k")
    again, created = new_job(store, owner="a", idempotency_key="k")
    other, other_created = new_job(store, owner="b", idempotency_key="k")
    assert not created and again.id == first.id
    assert other_created and other.id != first.id
    assert store.open_jobs() == 2


def test_a_job_ends_exactly_once(store):
    job, _ = new_job(store)
    assert store.start_job(job.id) == "running"
    store.set_progress(job.id, "estimation", 10, 100)
    assert store.get_job(job.id).progress.samples_done == 10
    assert store.finish_job(job.id, "succeeded", result={"radius": 0.5})
    assert not store.finish_job(job.id, "failed", error={"code": "x", "message": "late"})
    assert store.start_job(job.id) == "succeeded"  # a redelivered task sees the end
    store.set_progress(job.id, "estimation", 99, 100)  # ignored after the end
    final = store.get_job(job.id)
    assert final.status == "succeeded" and final.result == {"radius": 0.5} and final.error is None
    assert final.progress.samples_done == 10 and final.finished >= final.created
    assert store.open_jobs() == 0
    assert store.metrics()["counters"]["jobs_finished_total:certification:succeeded"] == 1


def test_cancel_queued_at_once_running_by_flag(store):
    queued, _ = new_job(store)
    assert store.request_cancel(queued.id) and store.get_job(queued.id).status == "cancelled"
    running, _ = new_job(store)
    store.start_job(running.id)
    assert store.request_cancel(running.id) and store.get_job(running.id).status == "running"
    assert store.cancel_requested(running.id)
    store.finish_job(running.id, "succeeded")
    assert not store.request_cancel(running.id)  # already ended


def test_finish_races_end_one_way(store):
    job, _ = new_job(store)
    store.start_job(job.id)
    wins = []
    threads = [threading.Thread(target=lambda s=s: wins.append(store.finish_job(job.id, s)))
               for s in ["succeeded", "failed", "cancelled"] * 10]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_the_end_and_its_counts_are_one_step(store):
    # The counters are added by the finishing script itself, once, only by the call that
    # ended the job: a worker dying right after the end cannot lose them.
    job, _ = new_job(store)
    store.start_job(job.id)
    counters = ["answered_total:certification"]
    assert store.finish_job(job.id, "succeeded", result={}, counters=counters)
    assert not store.finish_job(job.id, "succeeded", result={}, counters=counters)
    got = store.metrics()["counters"]
    assert got["answered_total:certification"] == 1
    assert got["jobs_finished_total:certification:succeeded"] == 1


def test_memory_commit_is_compare_and_set(store):
    ns = "sha256:abc/fp32"
    commit = lambda job, length, epoch=0, cap=10: store.memory_commit(  # noqa: E731
        ns, epoch=epoch, length=length, job_id=job, entry=job.encode(), capacity=cap)
    assert commit("j1", 0).status == "committed"
    again = commit("j1", 0)
    assert again.status == "duplicate" and again.index == 0
    assert commit("j2", 0).status == "conflict"  # j1 landed since this worker looked
    assert commit("j2", 1).status == "committed"
    assert commit("j1", 2).index == 0  # a redelivered job finds its first entry
    assert store.memory_entries(ns) == [b"j1", b"j2"] and store.memory_entries(ns, 1) == [b"j2"]
    assert commit("j3", 2, cap=2).status == "full"
    assert store.memory_size(ns)[0] == 2
    store.memory_reset(ns)
    assert store.memory_epoch(ns) == 1 and commit("j3", 0).status == "stale"
    assert commit("j3", 0, epoch=1).status == "committed"


def test_memory_entries_come_in_pages_and_in_bulk(store):
    ns = "sha256:bulk/fp32"
    done = store.memory_commit_many(ns, epoch=0, length=0, capacity=5,
                                    entries=[(f"j{i}", f"e{i}".encode()) for i in range(4)])
    assert [(r.status, r.index) for r in done] == [("committed", i) for i in range(4)]
    assert store.memory_entries(ns, 1, 3) == [b"e1", b"e2"] and store.memory_entries(ns, 3, 10) == [b"e3"]
    assert store.memory_entries(ns, 2, 2) == [] and store.memory_entries(ns, 4) == []
    again = store.memory_commit_many(ns, epoch=0, length=3, capacity=5,
                                     entries=[("j9", b"x"), ("j3", b"y"), ("j8", b"z"), ("j7", b"w")])
    # Expected lengths 3, 4, 5, 6 against a log of 4: only j3's own entry is found (a duplicate).
    assert [r.status for r in again] == ["conflict", "duplicate", "conflict", "conflict"]
    last = store.memory_commit_many(ns, epoch=0, length=4, capacity=5, entries=[("j5", b"e5"), ("j6", b"e6")])
    assert [r.status for r in last] == ["committed", "full"] and store.memory_size(ns)[0] == 5


def test_concurrent_commits_each_land_once(store):
    """Many threads race to commit on top of the version they saw: every job lands exactly
    once, in some order, and each index names that job's entry."""
    ns, landed = "race/fp32", {}

    def worker(name):
        while True:
            length = len(store.memory_entries(ns))
            result = store.memory_commit(ns, epoch=0, length=length, job_id=name, entry=name.encode(), capacity=1000)
            if result.status in ("committed", "duplicate"):
                landed[name] = result.index
                return

    threads = [threading.Thread(target=worker, args=(f"job{i}",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = store.memory_entries(ns)
    assert len(entries) == 20 and sorted(landed.values()) == list(range(20))
    assert all(entries[i] == name.encode() for name, i in landed.items())


def test_models_and_workers(store):
    store.put_model("digits", "sha256:1", {"name": "digits"}, b"zip")
    assert store.get_model("digits").digest == "sha256:1" and store.get_bundle("sha256:1") == b"zip"
    assert [m.name for m in store.list_models()] == ["digits"] and store.get_model("x") is None
    store.heartbeat("w1")
    assert store.live_workers(10) == ["w1"]


def test_open_jobs_forget_records_older_than_the_ttl(store, redis_client):
    job, _ = new_job(store)
    redis_client.zadd("t:jobs:open", {"lost": 1.0})  # a job Redis lost long ago
    assert store.open_jobs() == 1
    assert store.get_job(job.id).status == "queued"


def test_a_released_idempotency_key_makes_a_new_job(store):
    first, _ = new_job(store, owner="a", idempotency_key="k")
    store.release_idempotency_key("a", "k", first.id)
    again, created = new_job(store, owner="a", idempotency_key="k")
    assert created and again.id != first.id
    store.release_idempotency_key("a", "k", first.id)  # no longer points at `first`: kept
    assert new_job(store, owner="a", idempotency_key="k")[0].id == again.id


def test_create_job_refuses_past_the_open_jobs_limit_but_replays(store, redis_client):
    first, _ = new_job(store, owner="a", idempotency_key="k", max_open=2)
    new_job(store, max_open=2)
    with pytest.raises(QueueFull) as full:
        new_job(store, max_open=2)
    assert full.value.open_jobs == 2 and store.open_jobs() == 2
    again, created = new_job(store, owner="a", idempotency_key="k", max_open=2)  # a retry is answered
    assert not created and again.id == first.id
    redis_client.zadd("t:jobs:open", {"lost": 1.0})  # expired entries do not count against the limit
    assert store.finish_job(first.id, "succeeded", result={}) and new_job(store, max_open=2)[1]
    assert store.metrics()["counters"]["jobs_submitted_total:certification"] == 3


def test_an_idempotency_key_whose_job_expired_makes_a_new_job(store, redis_client):
    first, _ = new_job(store, owner="a", idempotency_key="k")
    redis_client.delete(f"t:job:{first.id}")  # the job's TTL ran out before the key's
    again, created = new_job(store, owner="a", idempotency_key="k")
    assert created and again.id != first.id
    assert new_job(store, owner="a", idempotency_key="k")[0].id == again.id


def test_mark_enqueued_only_marks_a_job_that_exists(store, redis_client):
    job, _ = new_job(store)
    assert not store.was_enqueued(job.id)
    store.mark_enqueued(job.id)
    assert store.was_enqueued(job.id) and store.get_job(job.id).status == "queued"
    store.mark_enqueued("0" * 32)  # expired or never there: nothing is written (no key without a TTL)
    assert not redis_client.exists(f"{store.p}:job:{'0' * 32}")


def test_outage_retry_waits_through_a_restart_and_gives_up_in_time(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        store = Store.from_url(server.url, retry_seconds=20)
        job, _ = new_job(store)
        server.stop()
        restart = threading.Timer(1.0, server.start)
        restart.start()
        started = time.monotonic()
        assert store.get_job(job.id).status == "queued"  # paused, then answered from the reloaded AOF
        assert time.monotonic() - started >= 0.9
        restart.join()
        assert store.finish_job(job.id, "succeeded", result={}) and not store.finish_job(job.id, "failed")
        server.stop()
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            Store.from_url(server.url, retry_seconds=1).get_job(job.id)
        assert 0.9 <= time.monotonic() - started < 5
    finally:
        server.stop()
