"""Seeds: a fresh one when the caller gives none, and independent streams derived from one.

NumPy only, so the API (which never imports torch) derives the very seeds the engine does.
"""

from __future__ import annotations

import numpy as np


def fresh_seed() -> int:
    """A random 63-bit seed, used when the caller gives none, so results stay replayable."""
    return int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)


def derive_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for item `path` of a run seeded with `seed` (independent streams)."""
    state = np.random.SeedSequence([int(seed), *map(int, path)]).generate_state(1, np.uint64)
    return int(state[0] >> 1)
