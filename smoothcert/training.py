"""Training base classifiers for randomized smoothing.

One loop, `train`, with one loss per method in `METHODS`. Today there is "gaussian": Gaussian
noise augmentation (Cohen et al. 2019), cross-entropy on `x + N(0, σ²I)`. Later methods
(consistency losses, per-input σ, DRS halves) add a loss function, not a second loop.

Guarantees:
- noise is drawn in [0, 1] pixel space and added *before* the normalisation, which the loop
  puts in front of the network exactly as `load_bundle` does (`nn.Sequential(Normalize, net)`),
  so the network is trained on the very inputs certification will show it; only `net` is
  trained in place and returned (save it with `normalize` in model.json);
- nothing is clipped to [0, 1] after adding noise, as in certification (`smoothcert.sampling`);
- seeded: shuffling and noise come from two torch.Generators derived from `seed`; on the CPU
  the same call (same initial weights, same torch thread count) gives the same weights bit for
  bit. The initial weights are the caller's: seed torch before building the network.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from smoothcert.architectures import Normalize
from smoothcert.sampling import derive_seed, make_generator

# loss(model, x, y, sigma, generator): `model` includes the normalisation; x is in [0, 1].
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, torch.Generator], torch.Tensor]
# progress(epochs_done, epochs, mean training loss of the epoch just finished)
Progress = Callable[[int, int, float], None]
Normalization = tuple[Sequence[float], Sequence[float]]


def gaussian_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy on one fresh noisy copy of each image: f(x + σε), ε ~ N(0, I)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.cross_entropy(model(x + sigma * noise), y)


METHODS: dict[str, LossFn] = {"gaussian": gaussian_loss}


def _with_normalize(net: nn.Module, normalize: Normalization | None) -> nn.Module:
    return net if normalize is None else nn.Sequential(Normalize(*normalize), net)


def _tensors(x, y, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.asarray(x), dtype=torch.float32).to(device),
            torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device))


def train(
    net: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
    method: str = "gaussian", sigma: float, epochs: int, batch_size: int = 128,
    lr: float = 1e-3, optimizer: str = "adam", weight_decay: float = 0.0,
    normalize: Normalization | None = None, seed: int, device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> nn.Module:
    """Train `net` in place on images `x` ([N, C, H, W] in [0, 1]) with labels `y`; return it
    on `device` in eval mode. `optimizer` is "adam" or "sgd" (momentum 0.9); the learning rate
    follows a cosine schedule from `lr` to 0 over the epochs."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; known: {sorted(METHODS)}")
    if not sigma >= 0 or epochs < 1 or batch_size < 1:
        raise ValueError("need sigma >= 0, epochs >= 1 and batch_size >= 1")
    device = torch.device(device)
    xs, ys = _tensors(x, y, device)
    if xs.dim() != 4 or len(xs) != len(ys) or len(xs) == 0:
        raise ValueError(f"need x [N, C, H, W] and y [N] with N > 0, got {list(xs.shape)}, "
                         f"{list(ys.shape)}")
    model = _with_normalize(net, normalize).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    # Two independent streams: changing the batch size must not change the shuffle, and the
    # shuffle (a CPU randperm) must not depend on the device the noise is drawn on.
    shuffle = make_generator(derive_seed(seed, 0), "cpu")
    noise = make_generator(derive_seed(seed, 1), device)
    loss_fn = METHODS[method]
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xs), generator=shuffle).to(device)
        total = 0.0
        for start in range(0, len(xs), batch_size):
            idx = order[start:start + batch_size]
            loss = loss_fn(model, xs[idx], ys[idx], sigma, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        schedule.step()
        if progress is not None:
            progress(epoch + 1, epochs, total / len(xs))
    return net.eval()


def train_gaussian(
    net: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
    sigma: float, epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int,
    device: str | torch.device = "cpu", normalize: Normalization | None = None,
    progress: Progress | None = None, **kwargs,
) -> nn.Module:
    """Gaussian noise augmentation at level `sigma` (Cohen et al.); see `train`."""
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
