"""The per-method training losses of `smoothcert.training`, and the per-example σ ascent.

Every `*_step` takes the model (normalisation included), a batch `x` in [0, 1] pixel space
with labels `y`, the noise level and the generator the noise comes from, and returns
`(loss, accuracy)`: the loss to minimise and the fraction of the noisy copies the model
classified correctly (a detached scalar, for the progress report). The noise level is a
float or one σ per example (a tensor `[B]`, broadcast over `[B, 1, 1, 1]`). Noise is added
in pixel space and never clipped, as in certification (`smoothcert.sampling`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from smoothcert.drs import split_half
from smoothcert.sigma import P_CLAMP

Sigma = float | torch.Tensor
Step = tuple[torch.Tensor, torch.Tensor]
# Clamp of MACER's top-two scores before Φ⁻¹ (float64): wide enough that a clamped pair
# (ξ = 2·Φ⁻¹(1 − 1e-7) ≈ 10.4) is already past any sensible hinge γ, so it only removes
# the infinities MACER's reference code filters out.
MACER_CLAMP = (1e-7, 1.0 - 1e-7)


def _scale(sigma: Sigma, x: torch.Tensor) -> Sigma:
    """σ as a float, or per example shaped [B, 1, 1, 1] to broadcast over x [B, C, H, W]."""
    if isinstance(sigma, torch.Tensor):
        return sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return sigma


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(-1) == y).float().mean()


def _copy_logits(model: nn.Module, x: torch.Tensor, sigma: Sigma, k: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Logits `[k, B, K]` of k independent noisy copies x + σ·ε of every image."""
    noise = torch.randn((k, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    logits = model((x + _scale(sigma, x) * noise).flatten(0, 1))
    return logits.float().view(k, len(x), -1)


def gaussian_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: Sigma,
                  generator: torch.Generator) -> Step:
    """Cohen et al.: cross-entropy on one fresh noisy copy of each image."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    logits = model(x + _scale(sigma, x) * noise)
    return F.cross_entropy(logits, y), _accuracy(logits, y)


def gaussian_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: Sigma,
                  generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy on one fresh noisy copy of each image: f(x + σε), ε ~ N(0, I)."""
    return gaussian_step(model, x, y, sigma, generator)[0]


def copies_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: Sigma,
                generator: torch.Generator, k: int) -> Step:
    """Mean cross-entropy over k noisy copies of each image."""
    logits = _copy_logits(model, x, sigma, k, generator)
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(k)), _accuracy(logits, y)


# At n = 100,000 and α = 0.001 the two-sided bound's pB_up stays above ~7e-5 even when the
# runner-up gets no vote, so pushing Ĝ_c̃ below 1e-4 cannot tighten a certificate.
FENG_FLOOR = 1e-4


def feng_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: Sigma,
              generator: torch.Generator, k: int, lam: float) -> Step:
    """Feng et al. (docs/algorithms.md §2): mean CE over k noisy copies + λ·mean_b log Ĝ_c̃(x_b),
    Ĝ the average softmax over the copies, c̃ = argmax_{c ≠ y} Ĝ_c: the runner-up when Ĝ's
    top class is the label, else the top class. c̃ is a selection (no gradient); log Ĝ is a
    logsumexp of log-softmaxes, exact however small Ĝ_c̃ is.

    log Ĝ_c̃ is floored at log FENG_FLOOR: unbounded below, the term rewards inflating the
    logits without end (seen here: loss −600 by epoch 30 on digits, accuracy falling), and
    below the floor a smaller runner-up no longer tightens any certificate."""
    logits = _copy_logits(model, x, sigma, k, generator)
    log_p = F.log_softmax(logits, dim=-1)
    ce = -log_p.gather(-1, y.view(1, -1, 1).expand(k, -1, 1)).mean()
    log_g = torch.logsumexp(log_p, dim=0) - math.log(k)  # [B, K]: log Ĝ
    wrong = log_g.masked_fill(F.one_hot(y, log_g.shape[-1]).bool(), -math.inf)
    runner_up = wrong.max(dim=-1).values.clamp(min=math.log(FENG_FLOOR))
    return ce + lam * runner_up.mean(), _accuracy(logits, y)


def macer_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: Sigma,
               generator: torch.Generator, k: int, lam: float, beta: float = 16.0,
               gamma: float = 8.0) -> Step:
    """MACER (Zhai et al. 2020) with σ per example: −log Ĝ_y(x) + λ·mean_b σ_b/2·h_b.

    Ĝ = mean softmax over the k copies; h_b = max(0, γ − ξ_b) for images whose smoothed soft
    classifier at inverse temperature β (mean of softmax(β·logits)) ranks the label first,
    ξ = Φ⁻¹(p_y) − Φ⁻¹(p_runner-up), and h_b = 0 for the others — the reference code's hinge,
    with its inf/NaN filter replaced by a clamp of p (MACER_CLAMP)."""
    logits = _copy_logits(model, x, sigma, k, generator)
    log_g = torch.logsumexp(F.log_softmax(logits, dim=-1), dim=0) - math.log(k)
    classification = F.nll_loss(log_g, y)
    soft = torch.softmax(beta * logits, dim=-1).mean(dim=0)
    top, index = soft.topk(2, dim=-1)
    p = top.double().clamp(*MACER_CLAMP)
    xi = torch.special.ndtri(p[:, 0]) - torch.special.ndtri(p[:, 1])
    hinge = (gamma - xi).clamp(min=0) * (index[:, 0] == y)
    scale = sigma.double() / 2 if isinstance(sigma, torch.Tensor) else sigma / 2
    return classification + lam * (scale * hinge).mean().float(), _accuracy(logits, y)


def drs_step(pair: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: Sigma,
             generator: torch.Generator) -> Step:
    """DRS halves: one noisy copy of the full image, split by the checkerboard; CE of the left
    network on half 0 plus CE of the right one on half 1 (each network's gradient is its own
    CE's). The halves are disjoint, so each sees independent N(0, σ²) noise, as in
    certification. Accuracy is the mean of the two halves'."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noisy = x + _scale(sigma, x) * noise
    left, right = pair.left(split_half(noisy, 0)), pair.right(split_half(noisy, 1))
    loss = F.cross_entropy(left, y) + F.cross_entropy(right, y)
    return loss, (_accuracy(left, y) + _accuracy(right, y)) / 2


def ddrs_sigma_ascent(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, *, steps: int,
                      lr: float, samples: int, sigma_min: float, sigma_max: float,
                      generator: torch.Generator) -> torch.Tensor:
    """`steps` DDRS ascent steps (docs/algorithms.md §3) for every image of a batch at once:
    σ_b ← clamp(σ_b + lr·∂R̃_b/∂σ_b, σ_min, σ_max), R̃_b = σ_b/2·(Φ⁻¹(p1) − Φ⁻¹(p2)) on the
    top two of ψ (mean softmax over `samples` fresh noisy copies), clamped to P_CLAMP as at
    certification. Only σ gets a gradient (parameters' .grad untouched). Run it with the model
    in eval mode: then an image's ψ does not depend on its batch-mates, so the gradient of
    ΣR̃ with respect to σ_b is exactly ∂R̃_b/∂σ_b. Returns the new σ, detached."""
    sigma = sigma.detach().clamp(sigma_min, sigma_max)
    for _ in range(steps):
        s = sigma.clone().requires_grad_(True)
        with torch.enable_grad():
            psi = torch.softmax(_copy_logits(model, x, s, samples, generator), dim=-1).mean(dim=0)
            top2 = psi.topk(2, dim=-1).values.clamp(*P_CLAMP)
            radius = s / 2 * (torch.special.ndtri(top2[:, 0]) - torch.special.ndtri(top2[:, 1]))
            (grad,) = torch.autograd.grad(radius.sum(), s)
        sigma = (sigma + lr * grad).clamp(sigma_min, sigma_max)
    return sigma.detach()
