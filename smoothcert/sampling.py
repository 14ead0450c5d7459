"""Batched Monte Carlo sampling of a base classifier under Gaussian noise.

Guarantees:
- noise is N(0, σ²I) in [0,1] pixel space, drawn on the input's device from the caller's
  `torch.Generator`: the same seed on the same device gives the same counts;
- class counts accumulate on the device; the host reads them once, at the end, so no batch
  waits for a device→host copy;
- `progress(done, total)` and `cancel()` run on the host between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from smoothcert.seeds import derive_seed, fresh_seed  # noqa: F401 (the engine's seeds, re-exported)

Progress = Callable[[int, int], None]
CancelCheck = Callable[[], bool]

# One batch is at most this many input elements, whatever batch_size asks: it keeps the
# noise tensor of a large model within a few hundred MiB.
MAX_BATCH_ELEMENTS = 64 * 2**20


class Cancelled(Exception):
    """Raised between batches when the caller's cancel check answers True."""


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (the only source of noise in the engine)."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


def effective_batch(batch_size: int, input_numel: int) -> int:
    """`batch_size`, lowered so one noise batch holds at most MAX_BATCH_ELEMENTS values."""
    return max(1, min(batch_size, MAX_BATCH_ELEMENTS // max(1, input_numel)))


def sample_counts(
    classifier: nn.Module,
    x: torch.Tensor,
    sigma: float,
    num: int,
    *,
    num_classes: int,
    batch_size: int,
    generator: torch.Generator,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Counts of the base classifier's hard predictions on `num` noisy copies of `x`.

    `x` has the model's input shape (no batch dimension) and lives on the model's device.
    Returns an int64 array of length `num_classes`.
    """
    return sample_counts_multi(
        [classifier], [identity], x, sigma, num,
        num_classes=num_classes, batch_size=batch_size, generator=generator,
        progress=progress, cancel=cancel,
    )[0]


def sample_counts_multi(
    classifiers: Sequence[nn.Module],
    views: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    x: torch.Tensor,
    sigma: float,
    num: int,
    *,
    num_classes: int,
    batch_size: int,
    generator: torch.Generator,
    progress: Progress | None = None,
    cancel: CancelCheck | None = None,
) -> list[np.ndarray]:
    """Counts for several classifiers that each see a `view` of the same noisy batches.

    Dual smoothing uses this with the two half-image views: one noise draw per sample serves
    both halves, which are disjoint, so each half still sees independent N(0, σ²) noise.
    Classifiers bound to a BatchScheduler (smoothcert.batching) hand each batch, noise
    drawing included, to the scheduler's thread; the draws and counts are the same.
    """
    if num < 0:
        raise ValueError("num must be ≥ 0")
    counts = [torch.zeros(num_classes, dtype=torch.int64, device=x.device) for _ in classifiers]
    scheduler = getattr(classifiers[0], "scheduler", None) if classifiers else None
    batch_size = effective_batch(batch_size, x.numel())
    done = 0
    with torch.inference_mode():
        while done < num:
            if cancel is not None and cancel():
                raise Cancelled()
            this = min(batch_size, num - done)
            if scheduler is not None:
                scheduler.count(tuple(c.network for c in classifiers), tuple(views), x, sigma, this,
                                generator, counts)
            else:
                count_batch(classifiers, views, noisy_batch(x, sigma, this, generator), counts)
            done += this
            if progress is not None:
                progress(done, num)
    return [count.cpu().numpy() for count in counts]


def noisy_batch(x: torch.Tensor, sigma: float, rows: int, generator: torch.Generator,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`rows` copies `x + σ·ε`, drawn in place (into `out` when given: same draws)."""
    shape = (rows, *x.shape)
    if out is None:
        batch = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        batch = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype, out=out)
    return batch.mul_(sigma).add_(x)


def count_batch(classifiers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                views: Sequence[Callable[[torch.Tensor], torch.Tensor]], batch: torch.Tensor,
                counts: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]] | None = None,
                ) -> None:
    """Add each classifier's hard predictions on its view of `batch` to `counts`; with
    `spans`, `counts[j][i]` takes rows spans[j] (several callers' rows in one batch)."""
    for k, (classifier, view) in enumerate(zip(classifiers, views, strict=True)):
        predictions = classifier(view(batch)).argmax(dim=1)
        if spans is None:
            # index_add_ (unlike bincount) never asks the host for the output size.
            counts[k].index_add_(0, predictions, _ones(predictions))
        else:
            for own, (start, stop) in zip(counts, spans, strict=True):
                part = predictions[start:stop]
                own[k].index_add_(0, part, _ones(part))


def identity(batch: torch.Tensor) -> torch.Tensor:
    """The whole-input view (one shared object, so batches of different jobs can merge)."""
    return batch


def _ones(predictions: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(predictions, dtype=torch.int64)


def soft_scores(
    classifier: nn.Module, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """ψ_σ(x) = mean_j softmax(f(x + σ·ε_j)), differentiable in σ (reparameterised noise)."""
    logits = classifier(x.unsqueeze(0) + sigma * noise)
    return torch.softmax(logits.float(), dim=1).mean(dim=0)

