"""Background load for the scenarios that stop jobs (timeouts, cancellation): threads that
each keep one short certification of the demo model running until told to stop."""

from __future__ import annotations

import threading

import numpy as np

from benchmarks.stack import USER
from clients import Client


def image(rng: np.random.Generator, shape: tuple[int, ...] = (1, 8, 8)) -> np.ndarray:
    """A random input in [0, 1] of the demo model's shape."""
    return rng.random(shape).astype(np.float32)


class Load(threading.Thread):
    """Submits one short job (n = 2000, memory off) at a time and waits for it, until `stop`
    is set; `ids` are its jobs, `error` what ended it early (for the scenario to report)."""

    def __init__(self, url: str, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.rng, self.stop = url, np.random.default_rng(seed), stop
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.url, api_key=USER, timeout=60) as client:
                while not self.stop.is_set():
                    job = client.certify(image(self.rng), model="digits", n=2000, memory=False)
                    self.ids.append(job.id)
                    job.wait(120, poll=1)
        except BaseException as e:  # reported by the scenario
            self.error = e
