"""What the sampler's Gaussian noise really is, and how a certificate accounts for it
(docs/guarantees.md §4).

A certificate is a statement about the classifier smoothed with exact N(0, σ²I) noise. The
sampler draws `torch.randn` in the input's dtype and scales it by σ, which differs from that
in two ways that this module turns into numbers a bound can use:

- **σ as the noise had it.** `randn(...) * σ` multiplies by σ rounded to the noise dtype. If
  that rounding went down, the noise was narrower than σ and σ·Φ⁻¹(p) would over-claim, so
  the radius uses `sigma_used(σ, dtype) = min(σ, fl(σ))`.
- **The missing tail.** PyTorch makes Gaussians by Box–Muller from uniforms on a grid of
  2^-b: u ≥ 2^-b, so each pair's radius √(−2 ln u) never exceeds √(2b ln 2). The Gaussian
  mass beyond that cap is 2^-b per pair. If the drawn distribution Q is the Gaussian P with
  mass ≤ m removed (Q = P conditioned on an event of probability ≥ 1 − m), then for every
  class P(c) ≥ Q(c) − m and P(c) ≤ Q(c) + m/(1 − m). A bound on Q therefore becomes a bound
  on P by subtracting m from lower bounds and adding m/(1 − m) to upper bounds
  (`smoothcert.bounds` does it; `tail_mass` gives m for one network's view of one input).

Known grids (PyTorch's generators):
- CPU float32: uniforms of 24 bits (`uniform_real_distribution<float>`), Box–Muller on
  blocks of 16 values pairing j with j+8, the last block of a tensor whose size is not a
  multiple of 16 redrawn whole. The coordinates of one input (D contiguous values of the
  batch) take their values from at most D/2 + 24 pairs: cap √(48 ln 2) ≈ 5.77, m ≤
  (D/2 + 24)·2^-24 (9.3e-5 at D = 3·32·32; 4.5e-3 at 3·224·224).
- CPU float64: 53-bit uniforms; m ≤ V·2^-53 (V: the coordinates the network sees).
- CUDA float32: curand's Philox with 32-bit uniforms, and the values of one Box–Muller pair
  land far apart in the tensor, so each coordinate may have its own pair: cap ≈ √(64 ln 2)
  ≈ 6.66 (one grid cell of margin), m ≤ V·2^-32.
- CUDA float64: 53-bit uniforms from two 32-bit draws; m ≤ V·2^-52.
Other devices and dtypes have no known grid here, and are refused.

What this does not cover: the values are discrete (a grid of uniforms, then float rounding of
ε·σ and of x + ε·σ), so the drawn distribution is not a Gaussian with a tail removed but a
quantised one. Voráček & Hein (2023) show that quantisation alone can make a smoothing
certificate wrong for a classifier built to exploit it; drawing in float64 and casting does
not remove it. This module accounts for the tail only; docs/guarantees.md §4 states the rest
as an open limitation.

Torch-free (NumPy for float32 rounding): the API can compute the same numbers as the engine.
"""

from __future__ import annotations

import math

import numpy as np

from smoothcert.bounds import InvalidParameters

# (device type, dtype name) -> (uniform grid bits b, pairs bound: "cpu-blocks" or "per-coordinate")
_GRIDS = {
    ("cpu", "float32"): (24, "cpu-blocks"),
    ("cpu", "float64"): (53, "per-coordinate"),
    ("cuda", "float32"): (32, "per-coordinate"),
    ("cuda", "float64"): (52, "per-coordinate"),
}
NOISE_DTYPES = ("float32", "float64")


def _dtype_name(dtype) -> str:
    # torch.float32 prints as "torch.float32"; numpy dtypes and strings as "float32".
    return str(dtype).removeprefix("torch.")


def rounded_sigma(sigma: float, dtype="float32") -> float:
    """σ as the noise dtype holds it (what `randn(...) * σ` multiplies by)."""
    name = _dtype_name(dtype)
    if name == "float64":
        return float(sigma)
    if name == "float32":
        return float(np.float32(sigma))
    raise InvalidParameters(f"noise is drawn in float32 or float64, not {name}")


def sigma_used(sigma: float, dtype="float32") -> float:
    """The σ a radius may use: the smaller of σ and σ rounded to the noise dtype."""
    return min(float(sigma), rounded_sigma(sigma, dtype))


def cap(device_type: str, dtype="float32") -> float:
    """The largest radius √(−2 ln 2^-b) of one Box–Muller pair on this device and dtype."""
    bits, _ = _grid(device_type, dtype)
    return math.sqrt(2 * bits * math.log(2))


def tail_mass(device_type: str, dtype, view_numel: int, input_numel: int | None = None) -> float:
    """m: an upper bound on the Gaussian mass the generator cannot produce for the
    `view_numel` coordinates one network sees of an input of `input_numel` values (DRS: a
    half sees half the input; default: the whole input)."""
    bits, layout = _grid(device_type, dtype)
    input_numel = view_numel if input_numel is None else input_numel
    pairs = view_numel
    if layout == "cpu-blocks":  # pairs within blocks of 16: D/2 + 16 for the blocks, 8 for a redrawn last block
        pairs = min(view_numel, math.ceil(input_numel / 2) + 24)
    return pairs * 2.0 ** -bits


def _grid(device_type: str, dtype) -> tuple[int, str]:
    key = (str(device_type), _dtype_name(dtype))
    if key not in _GRIDS:
        raise InvalidParameters(
            f"no known noise generator for device {key[0]!r} and dtype {key[1]!r}: the tail the generator "
            f"cannot draw is known for cpu and cuda in {' and '.join(NOISE_DTYPES)}")
    return _GRIDS[key]
