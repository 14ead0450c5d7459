"""service.durability against real redis-servers, each started on a free port by
tests.redis_server (service.up.redis_command plus the options a test overrides)."""

from __future__ import annotations

import time

import pytest
import redis

from service.durability import FLAGS, DurabilityGuard, MemoryUnavailable, durability_problems
from tests.redis_server import RedisServer


@pytest.fixture()
def start(tmp_path):
    """start(*extra, config_file=None) -> a client of a fresh server; all stopped at the end."""
    servers: list[RedisServer] = []
    clients: list[redis.Redis] = []

    def _start(*extra: str, config_file=None, decode: bool = False) -> redis.Redis:
        folder = tmp_path / f"redis{len(servers)}"
        folder.mkdir()
        server = RedisServer(folder, *extra, config_file=config_file)
        servers.append(server)
        server.start()
        clients.append(redis.Redis.from_url(server.url, decode_responses=decode))
        return clients[-1]

    yield _start
    for client in clients:
        client.close()
    for server in servers:
        server.stop()


@pytest.mark.parametrize("decode", [False, True])
def test_a_server_started_by_redis_command_is_fit(start, decode):
    assert durability_problems(start(decode=decode)) == []


@pytest.mark.parametrize("option, value", [
    ("appendonly", "no"),
    ("appendfsync", "everysec"),
    ("maxmemory-policy", "allkeys-lru"),
])
def test_each_wrong_setting_is_reported_alone(start, option, value):
    problems = durability_problems(start(f"--{option}", value))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{option} is '{value}'"), problems


def test_a_replica_is_reported(start):
    master = start()
    port = master.connection_pool.connection_kwargs["port"]
    problems = durability_problems(start("--replicaof", "127.0.0.1", str(port)))
    assert len(problems) == 1 and "role is 'slave'" in problems[0], problems


def test_config_refused_means_not_verified(start, tmp_path):
    # A config file, as managed Redis does it (and older servers refuse rename-command as an option).
    conf = tmp_path / "renamed.conf"
    conf.write_text('rename-command CONFIG ""\n')
    client = start(config_file=conf)
    with pytest.raises(redis.ResponseError):
        client.config_get("appendfsync")
    problems = durability_problems(client)
    assert len(problems) == 1 and problems[0].startswith("the settings could not be verified"), problems


def test_the_opt_out_checks_nothing(start, tmp_path):
    conf = tmp_path / "renamed.conf"
    conf.write_text('rename-command CONFIG ""\n')
    client = start("--appendfsync", "everysec", config_file=conf)
    assert durability_problems(client) != []
    assert durability_problems(client, check=False) == []
    DurabilityGuard(client, check=False).require()


def test_the_guard_caches_its_verdict_for_ttl_seconds(start):
    client = start()
    now = [0.0]
    guard = DurabilityGuard(client, ttl=30, clock=lambda: now[0])
    guard.require()
    client.config_set("appendfsync", "everysec")
    now[0] = 29.9
    assert guard.problems() == []  # cached: no round trip before each commit
    now[0] = 30.0
    assert [p.split(" ")[0] for p in guard.problems()] == ["appendfsync"]


def test_a_config_set_at_run_time_is_noticed_once_the_cache_expires(start):
    client = start()
    guard = DurabilityGuard(client, ttl=0.05)
    guard.require()
    client.config_set("appendfsync", "everysec")
    time.sleep(0.1)
    with pytest.raises(MemoryUnavailable) as caught:
        guard.require()
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith("appendfsync is 'everysec'")
    client.config_set("appendfsync", "always")  # fixed at run time: accepted again after the ttl
    time.sleep(0.1)
    guard.require()


def test_the_refusal_names_the_problem_and_the_fix():
    message = str(MemoryUnavailable(["appendfsync is 'everysec', must be 'always'"]))
    assert "appendfsync is 'everysec'" in message
    assert FLAGS == "--appendonly yes --appendfsync always --maxmemory-policy noeviction" and FLAGS in message
    assert "SMOOTHCERT_MEMORY_DURABILITY_CHECK=false" in message
