"""Whether a Redis server may hold the certificate memory: an acknowledged commit must survive a
crash of Redis or of its machine.

On Redis 7 that takes append-only persistence fsynced before every reply (`appendfsync always`;
the default `everysec` loses up to the last second of acknowledged writes), no eviction, and
writing to the master (a replica's copy is asynchronous: what it has not received is lost on a
failover). `durability_problems` checks a server once; `DurabilityGuard` caches that verdict for
a few seconds so that a worker can ask before every memory commit and still notice a
`CONFIG SET` made at run time. Imports only redis and the standard library.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis

# setting -> the value the memory needs, and what goes wrong otherwise
REQUIRED: dict[str, tuple[str, str]] = {
    "appendonly": ("yes", "acknowledged commits live only in memory and a restart loses them all"),
    "appendfsync": ("always", "a crash loses the commits of up to the last second"),
    "maxmemory-policy": ("noeviction", "a full Redis silently evicts memory entries"),
}
FLAGS = "--appendonly yes --appendfsync always --maxmemory-policy noeviction"
OPT_OUT = "SMOOTHCERT_MEMORY_DURABILITY_CHECK"


class MemoryUnavailable(RuntimeError):
    """The worker will not commit to the certificate memory on this Redis; `problems` says why."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            "the certificate memory refuses to commit to this Redis: " + "; ".join(self.problems)
            + f". Fix: run redis-server with {FLAGS} (or CONFIG SET these three and keep them in redis.conf),"
            " and point SMOOTHCERT_REDIS_URL at the master. If this Redis is durable by other means but hides"
            f" CONFIG (managed services), set {OPT_OUT}=false."
        )


def durability_problems(client: redis.Redis, *, check: bool = True) -> list[str]:
    """What is wrong with `client`'s server for holding the memory: one human-readable string per
    problem, none when it is fit. One round trip: a CONFIG GET per setting and INFO replication.

    CONFIG refused (renamed or denied by ACL, as managed Redis does) is a problem: the settings
    could not be verified. `check=False` (the opt-out, for a Redis durable by other means) sends
    nothing and returns []. Connection errors propagate: they are an outage, not a verdict."""
    if not check:
        return []
    with client.pipeline(transaction=False) as pipe:
        for name in REQUIRED:
            pipe.config_get(name)  # one name each: CONFIG GET of several names needs Redis 7
        pipe.info("replication")
        *configs, info = pipe.execute(raise_on_error=False)
    problems = []
    refused = next((c for c in configs if isinstance(c, redis.ResponseError)), None)
    if refused is not None:
        problems.append(f"the settings could not be verified: CONFIG GET was refused ({refused})")
    else:
        for (name, (wanted, risk)), config in zip(REQUIRED.items(), configs, strict=True):
            value = config.get(name)
            if value != wanted:
                problems.append(f"{name} is {value!r}, must be {wanted!r} ({risk})")
    if isinstance(info, redis.ResponseError):
        problems.append(f"the role could not be verified: INFO replication was refused ({info})")
    elif info.get("role") != "master":
        problems.append(f"the role is {info.get('role')!r}, must be 'master' (a replica refuses writes, or keeps "
                        "them only until its next resync)")
    return problems


class DurabilityGuard:
    """`durability_problems` of one server, cached for `ttl` seconds (thread-safe), so that a
    worker can call `require()` before each memory commit: at most one check per `ttl`, and a
    setting changed at run time is noticed within `ttl`. Failed checks (connection errors) are
    not cached."""

    def __init__(self, client: redis.Redis, *, ttl: float = 30.0, check: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.ttl, self.check, self.clock = client, ttl, check, clock
        self._lock = threading.Lock()
        self._verdict: list[str] = []
        self._expires = float("-inf")

    def problems(self) -> list[str]:
        """The cached verdict, refreshed once it is `ttl` seconds old."""
        with self._lock:
            if self.clock() >= self._expires:
                self._verdict = durability_problems(self.client, check=self.check)
                self._expires = self.clock() + self.ttl
            return list(self._verdict)

    def require(self) -> None:
        """Return if the server may hold the memory; raise `MemoryUnavailable` otherwise."""
        problems = self.problems()
        if problems:
            raise MemoryUnavailable(problems)
