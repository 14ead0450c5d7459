"""Training a σ selector's estimator (docs/algorithms.md §6, "Training the estimator").

The classifiers of the levels (the experts) are given and stay fixed. For each training image
x with label y and each level σ_i, a cheap estimate of the radius the classifier smoothed at
σ_i would certify for y:

    R_i(x) = σ_i·Φ⁻¹(p̂_i),  p̂_i = (k_i + 1/2)/(N + 1)  when p̂_i > 1/2, else 0,

k_i the votes for y among N noisy copies (default N = 100). The estimator's target is
softmax_i(R_i/T) with temperature T in pixel units (default 0.1): the level that certifies
the largest radius gets the most weight, and levels within about T of it share it. Where
every level misclassifies x, every R_i is 0 and the target is uniform: nothing certifies x
correctly, and a uniform target pushes the smoothed estimator towards abstaining there.

The loss, on `copies` noisy copies x + σ_e·ε of each image (the noise the estimator is
smoothed with):

    w(x)·[ mean_j CE(target, softmax(g_e(x + σ_e ε_j))) + λ·mean_j KL(p̄ ‖ softmax(g_e(x + σ_e ε_j))) ],

p̄ the mean of the copies' softmax. The KL term (consistency) makes the copies agree, which
raises the smoothed estimator's top probability and with it R_σ. w(x) reweights by the
frequency of the target's top level, so that a level most images prefer does not drown the
others (weights of mean 1).

Seeded: the radius estimates, the shuffle and the noise come from generators derived from
`seed`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn
from torch.nn import functional as F

from smoothcert.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.sampling import derive_seed, make_generator


@dataclass(frozen=True)
class SelectorTraining:
    """The estimator's training settings (module doc); every default documented there."""

    sigmas: tuple[float, ...]
    sigma_e: float
    label_samples: int = 100
    temperature: float = 0.1
    copies: int = 4
    consistency: float = 1.0
    reweight: bool = True

    def __post_init__(self) -> None:
        if len(self.sigmas) < 2 or min(self.sigmas) <= 0 or self.sigma_e <= 0:
            raise ValueError("need at least two positive levels and a positive sigma_e")
        if self.label_samples < 1 or self.copies < 1 or not self.temperature > 0 or self.consistency < 0:
            raise ValueError("need label_samples >= 1, copies >= 1, temperature > 0 and consistency >= 0")


def radius_estimates(experts: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float],
                     samples: int, *, batch_size: int = 512, seed: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """[N, levels] estimated radii R_i(x) (module doc) of each image at each level, from
    `samples` noisy copies per image and level; 0 where the level's smoothed classifier would
    not give the label a majority. `experts`: one network for every level, or one per level."""
    out = np.zeros((len(x), len(sigmas)), dtype=np.float64)
    generator = make_generator(derive_seed(seed, 1), x.device)
    per_batch = max(1, batch_size // samples)
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            expert = experts[i] if len(experts) > 1 else experts[0]
            for start in range(0, len(x), per_batch):
                xb, yb = x[start:start + per_batch], y[start:start + per_batch]
                noisy = xb.repeat_interleave(samples, 0)
                noisy = noisy + sigma * torch.randn(noisy.shape, generator=generator, device=x.device)
                votes = expert(noisy).argmax(1).view(len(xb), samples)
                k = (votes == yb[:, None]).sum(1).double().cpu().numpy()
                p = (k + 0.5) / (samples + 1)
                out[start:start + len(xb), i] = np.where(p > 0.5, sigma * norm.ppf(p), 0.0)
            if progress is not None:
                progress(i + 1, len(sigmas))
    return out


def soft_labels(radii: np.ndarray, temperature: float) -> np.ndarray:
    """softmax over levels of radii / temperature, row by row (a row of zeros: uniform)."""
    z = radii / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def level_weights(targets: np.ndarray) -> np.ndarray:
    """Per-image weights, inversely proportional to how many images share the target's top
    level, scaled to mean 1."""
    top = targets.argmax(axis=1)
    counts = np.bincount(top, minlength=targets.shape[1]).astype(np.float64)
    w = 1.0 / counts[top]
    return w * (len(w) / w.sum())


@dataclass
class EstimatorEpoch:
    epoch: int
    epochs: int
    loss: float
    agreement: float  # share of noisy copies whose top level is the target's top level
    seconds: float


def train_estimator(estimator: nn.Module, x: torch.Tensor, targets: np.ndarray, weights: np.ndarray | None, *,
                    settings: SelectorTraining, epochs: int, batch_size: int = 128, lr: float = 1e-3,
                    seed: int = 0, on_epoch: Callable[[EstimatorEpoch], None] | None = None,
                    checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1,
                    resume: bool = False, config: dict | None = None) -> list[EstimatorEpoch]:
    """Train `estimator` (which takes pixel-space input, its normalisation inside) in place on
    the loss of the module doc; Adam with a cosine schedule to 0. Returns the epochs' stats
    (after a resume, the checkpoint's epochs first).

    With `checkpoint`, the whole state (weights, optimiser, schedule, both generators, the
    epochs so far) is saved after every `checkpoint_every` epochs; `resume` continues from it
    bit for bit on the same device. `config` names the run: a checkpoint of another run is
    refused (smoothcert.checkpoint.CheckpointMismatch)."""
    device = x.device
    t = torch.as_tensor(targets, dtype=torch.float32, device=device)
    w = torch.as_tensor(weights if weights is not None else np.ones(len(x)), dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * -(-len(x) // batch_size))
    shuffle = torch.Generator().manual_seed(derive_seed(seed, 2))
    noise = make_generator(derive_seed(seed, 3), device)
    generators = {"shuffle": shuffle, "noise": noise}
    config = dict(config or {}, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, n=len(x),
                  settings=dataclasses.asdict(settings))
    k, history, start = settings.copies, [], 1
    if resume and checkpoint is not None:
        state = load_checkpoint(checkpoint, config, estimator, optimizer, schedule, generators, device)
        if state is not None:
            history = [EstimatorEpoch(**h) for h in state["history"]]
            start = state["epoch"] + 1
    for epoch in range(start, epochs + 1):
        started, total, agree, seen = time.perf_counter(), 0.0, 0, 0
        estimator.train()
        for idx in torch.randperm(len(x), generator=shuffle).split(batch_size):
            idx = idx.to(device)
            xb, tb, wb = x[idx], t[idx], w[idx]
            noisy = xb.repeat_interleave(k, 0)
            noisy = noisy + settings.sigma_e * torch.randn(noisy.shape, generator=noise, device=device)
            logp = F.log_softmax(estimator(noisy), dim=1).view(len(xb), k, -1)
            ce = -(tb[:, None, :] * logp).sum(-1).mean(1)
            p = logp.exp()
            mean = p.mean(1, keepdim=True)
            kl = (mean * (mean.clamp_min(1e-12).log() - logp)).sum(-1).mean(1)
            loss = (wb * (ce + settings.consistency * kl)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(xb)
            agree += int((p.argmax(-1) == tb.argmax(-1)[:, None]).sum())
            seen += len(xb)
        estimator.eval()
        stats = EstimatorEpoch(epoch, epochs, total / seen, agree / (seen * k), time.perf_counter() - started)
        history.append(stats)
        if checkpoint is not None and (epoch % checkpoint_every == 0 or epoch == epochs):
            save_checkpoint(checkpoint, config, epoch, estimator, optimizer, schedule, generators, None,
                            [dataclasses.asdict(h) for h in history], device)
        if on_epoch is not None:
            on_epoch(stats)
    return history
