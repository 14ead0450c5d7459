"""Training base classifiers for randomized smoothing.

One loop, `fit` (and `train`, which returns just the network); a method is a `Method` in
`METHODS`, hooks around a per-method loss of `smoothcert.losses`, not a second loop.

The methods (gaussian, feng, ddrs, insta, drs) and their settings, `MethodOptions`, are
described in `smoothcert.methods`.

Guarantees:
- noise is drawn in [0, 1] pixel space and added *before* the normalisation, which the loop
  puts in front of each network exactly as `load_bundle` does, so the networks are trained on
  the very inputs certification shows them; only the caller's networks are trained in place;
- seeded: shuffle, loss noise and σ-search noise come from separate generators derived from
  `seed`; on the CPU the same call (same initial weights, same torch thread count) gives the
  same weights bit for bit. The initial weights are the caller's: seed torch before building;
- with `checkpoint`, the full state (weights, optimiser, schedule, generators, σ table) is
  saved after every `checkpoint_every` epochs (tensors and plain containers only: it loads
  with `torch.load(weights_only=True)`); `resume=True` continues from it and ends with the
  weights an uninterrupted run ends with.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from smoothcert.architectures import Normalize
from smoothcert.checkpoint import load_checkpoint, save_checkpoint
from smoothcert.losses import gaussian_loss
from smoothcert.methods import METHODS, HalfPair, MethodOptions, RunState, default_sigma_range
from smoothcert.sampling import derive_seed, make_generator

__all__ = ["METHODS", "EpochStats", "MethodOptions", "Trained", "accuracy", "default_sigma_range",
           "fit", "gaussian_loss", "train", "train_gaussian"]

# progress(epochs_done, epochs, mean training loss of the epoch just finished)
Progress = Callable[[int, int, float], None]
Normalization = tuple[Sequence[float], Sequence[float]]
Networks = nn.Module | tuple[nn.Module, nn.Module]


@dataclass
class EpochStats:
    """One epoch: mean loss and accuracy on the noisy training copies; σ table summary."""

    epoch: int
    epochs: int
    loss: float
    accuracy: float
    lr: float
    seconds: float
    sigma: dict[str, float] | None = None  # min, mean, max of the σ table (ddrs, insta)


@dataclass
class Trained:
    """What `fit` returns: the network(s) in eval mode, per-epoch stats, the σ table."""

    net: Networks
    history: list[EpochStats]
    sigma_table: torch.Tensor | None
    resumed_from: int | None



def _with_normalize(net: nn.Module, normalize: Normalization | None) -> nn.Module:
    return net if normalize is None else nn.Sequential(Normalize(*normalize), net)


def _tensors(x, y, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.asarray(x), dtype=torch.float32).to(device),
            torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device))


def fit(
    net: Networks, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
    method: str = "gaussian", sigma: float, epochs: int, batch_size: int = 128,
    lr: float = 1e-3, optimizer: str = "adam", weight_decay: float = 0.0,
    normalize: Normalization | None = None, seed: int, device: str | torch.device = "cpu",
    options: MethodOptions | None = None, progress: Progress | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1, resume: bool = False,
) -> Trained:
    """Train `net` (a (left, right) pair for "drs") in place on images `x` ([N, C, H, W] in
    [0, 1]) with labels `y`. `optimizer` is "adam" or "sgd" (momentum 0.9); the learning rate
    follows a cosine schedule from `lr` to 0 over the epochs. The checkpoint, if asked, is
    written before `progress`/`on_epoch` hear of the epoch."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; known: {sorted(METHODS)}")
    if not sigma >= 0 or epochs < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError("need sigma >= 0, epochs >= 1, batch_size >= 1 and checkpoint_every >= 1")
    spec = METHODS[method]
    opts = (options or MethodOptions()).resolved(method, sigma, epochs)
    if spec.pair != isinstance(net, tuple):
        raise ValueError("method 'drs' trains a (left, right) pair of networks; the others one")
    device = torch.device(device)
    xs, ys = _tensors(x, y, device)
    if xs.dim() != 4 or len(xs) != len(ys) or len(xs) == 0:
        raise ValueError(f"need x [N, C, H, W] and y [N] with N > 0, got {list(xs.shape)}, "
                         f"{list(ys.shape)}")
    if spec.pair:
        model: nn.Module = HalfPair(*(_with_normalize(n, normalize) for n in net)).to(device)
    else:
        model = _with_normalize(net, normalize).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    # Independent streams: changing the batch size must not change the shuffle, and the
    # shuffle (a CPU randperm) must not depend on the device the noise is drawn on.
    shuffle = make_generator(derive_seed(seed, 0), "cpu")
    run = RunState(sigma=float(sigma), opts=opts, seed=seed, xs=xs,
               noise=make_generator(derive_seed(seed, 1), device),
               search=make_generator(derive_seed(seed, 2), device),
               table=torch.full((len(xs),), float(min(max(sigma, opts.sigma_min), opts.sigma_max)),
                                device=device) if spec.sigma_table else None)
    generators = {"shuffle": shuffle, "noise": run.noise, "search": run.search}
    config = dict(method=method, sigma=float(sigma), epochs=epochs, batch_size=batch_size, lr=lr,
                  optimizer=optimizer, weight_decay=weight_decay, seed=seed, n=len(xs),
                  options=dataclasses.asdict(opts))
    history: list[EpochStats] = []
    start, resumed_from = 0, None
    if resume and checkpoint is not None:
        state = load_checkpoint(checkpoint, config, model, opt, schedule, generators, device)
        if state is not None:
            start = resumed_from = state["epoch"]
            history = [EpochStats(**h) for h in state["history"]]
            if run.table is not None:
                run.table.copy_(state["sigma_table"])
    for epoch in range(start, epochs):
        started = time.perf_counter()
        model.train()
        if spec.epoch_start is not None:
            spec.epoch_start(run, model, epoch)
        order = torch.randperm(len(xs), generator=shuffle).to(device)
        total = correct = 0.0
        for first in range(0, len(xs), batch_size):
            idx = order[first:first + batch_size]
            loss, acc = spec.step(run, model, xs[idx], ys[idx], idx, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += float(acc) * len(idx)
        lr_used = schedule.get_last_lr()[0]
        schedule.step()
        table = None if run.table is None else {
            "min": float(run.table.min()), "mean": float(run.table.mean()), "max": float(run.table.max())}
        stats = EpochStats(epoch + 1, epochs, total / len(xs), correct / len(xs), lr_used,
                           time.perf_counter() - started, table)
        history.append(stats)
        if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
            save_checkpoint(checkpoint, config, epoch + 1, model, opt, schedule, generators,
                            run.table, [dataclasses.asdict(h) for h in history], device)
        if progress is not None:
            progress(epoch + 1, epochs, stats.loss)
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    out = tuple(n.eval() for n in net) if spec.pair else net.eval()
    return Trained(out, history, None if run.table is None else run.table.cpu(), resumed_from)


def train(net: Networks, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
          sigma: float, epochs: int, seed: int, **kwargs: Any) -> Networks:
    """`fit(...)`'s network(s), on its device, in eval mode."""
    return fit(net, x, y, sigma=sigma, epochs=epochs, seed=seed, **kwargs).net


def train_gaussian(
    net: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
    sigma: float, epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int,
    device: str | torch.device = "cpu", normalize: Normalization | None = None,
    progress: Progress | None = None, **kwargs: Any,
) -> nn.Module:
    """Gaussian noise augmentation at level `sigma` (Cohen et al.); see `fit`."""
    return train(net, x, y, method="gaussian", sigma=sigma, epochs=epochs,
                 batch_size=batch_size, lr=lr, seed=seed, device=device, normalize=normalize,
                 progress=progress, **kwargs)


@torch.no_grad()
def accuracy(
    net: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
    sigma: float = 0.0, normalize: Normalization | None = None, seed: int = 0,
    batch_size: int = 1024, device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy of the *base* network on `x` (σ = 0), or on one seeded noisy copy of
    each image (σ > 0): a quick proxy for how well the smoothed classifier will do."""
    device = torch.device(device)
    xs, ys = _tensors(x, y, device)
    was_training = net.training  # the wrapper is new: restore the caller's own mode
    model = _with_normalize(net, normalize).to(device).eval()
    generator = make_generator(seed, device)
    correct = 0
    for start in range(0, len(xs), batch_size):
        xb = xs[start:start + batch_size]
        if sigma > 0:
            xb = xb + sigma * torch.randn(xb.shape, generator=generator, device=device)
        correct += int((model(xb).argmax(1) == ys[start:start + batch_size]).sum())
    net.train(was_training)
    return correct / len(xs)
