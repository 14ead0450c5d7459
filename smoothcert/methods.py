"""The training methods of `smoothcert.training`: each a `Method` of hooks around the losses
of `smoothcert.losses`, and `MethodOptions`, their settings.

- gaussian: CE on one noisy copy at σ (Cohen et al. 2019).
- feng: mean CE over k noisy copies + λ·log Ĝ_c̃ (docs/algorithms.md §2; k=8, λ=0.1).
- ddrs: a per-example σ table (initialised at σ, indexed by position in the training set);
  before each weight step `ddrs_steps` DDRS ascent steps (`losses.ddrs_sigma_ascent`, the
  surrogate of docs/algorithms.md §3 on the top two classes, as at test time) move the batch's σ
  within [σ_min, σ_max]; then CE over k noisy copies at each example's σ, or
  (`ddrs_loss="macer"`) MACER's loss with per-example σ (k=8; λ=12, β=16, γ=8: MACER's
  reference defaults).
- insta (documented reconstruction, docs/algorithms.md §4): gaussian at σ for `stage1_epochs`
  (default epochs // 2); then every example's σ is set by `sigma.insta_search` (the test-time
  multi-start search, `insta_samples` votes per σ, `insta_steps` bracketing rounds, starting
  from the example's current σ) at the start of stage 2 and every `insta_every` epochs after
  it (0: only once), and training goes on with one noisy copy at each example's σ.
- drs: a (left, right) pair; CE of each on its checkerboard half of one noisy image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from smoothcert import bounds, losses
from smoothcert.sampling import derive_seed, make_generator
from smoothcert.sigma import insta_search


def default_sigma_range(sigma: float) -> tuple[float, float]:
    """[σ/2, 4σ], the top capped at 2 (unless σ is larger): in [0, 1] pixel space noise of
    σ = 2 already drowns any image."""
    return sigma / 2, max(sigma, min(4 * sigma, 2.0))


@dataclass(frozen=True)
class MethodOptions:
    """Settings of the non-gaussian methods; None means the method's default (`resolved`)."""

    sigma_min: float | None = None
    sigma_max: float | None = None
    k: int | None = None  # noisy copies per image: feng, ddrs
    lam: float | None = None  # feng: 0.1; ddrs with the macer loss: 12.0
    ddrs_steps: int = 2
    ddrs_lr: float = 0.01
    ddrs_samples: int = 8  # noisy copies per ascent step
    ddrs_loss: str = "ce"  # or "macer"
    macer_beta: float = 16.0
    macer_gamma: float = 8.0
    stage1_epochs: int | None = None  # insta
    insta_every: int = 0
    insta_steps: int = 2
    insta_samples: int = 32

    def resolved(self, method: str, sigma: float, epochs: int) -> MethodOptions:
        """Defaults filled in and every value checked (ValueError names the option)."""
        low, high = default_sigma_range(sigma)
        macer = method == "ddrs" and self.ddrs_loss == "macer"
        out = dataclasses.replace(
            self, sigma_min=low if self.sigma_min is None else self.sigma_min,
            sigma_max=high if self.sigma_max is None else self.sigma_max,
            k=8 if self.k is None else self.k,
            lam=(12.0 if macer else 0.1) if self.lam is None else self.lam,
            stage1_epochs=epochs // 2 if self.stage1_epochs is None else self.stage1_epochs)
        checks = {
            "sigma_min/sigma_max (0 < sigma_min <= sigma <= sigma_max)":
                method not in ("ddrs", "insta") or 0 < out.sigma_min <= sigma <= out.sigma_max,
            "k (>= 1)": out.k >= 1, "lam (finite)": np.isfinite(out.lam),
            "ddrs_steps (>= 0)": out.ddrs_steps >= 0, "ddrs_lr (>= 0)": out.ddrs_lr >= 0,
            "ddrs_samples (>= 1)": out.ddrs_samples >= 1,
            "ddrs_loss ('ce' or 'macer')": out.ddrs_loss in ("ce", "macer"),
            "stage1_epochs (0..epochs)": 0 <= out.stage1_epochs <= epochs,
            "insta_every (>= 0)": out.insta_every >= 0, "insta_steps (>= 0)": out.insta_steps >= 0,
            "insta_samples (>= 1)": out.insta_samples >= 1,
        }
        if bad := [name for name, ok in checks.items() if not ok]:
            raise ValueError(f"bad training options: {', '.join(bad)}")
        return out


class HalfPair(nn.Module):
    """The two DRS half networks, trained together."""

    def __init__(self, left: nn.Module, right: nn.Module):
        super().__init__()
        self.left, self.right = left, right


@dataclass
class RunState:
    """What the method hooks see."""

    sigma: float
    opts: MethodOptions
    seed: int
    noise: torch.Generator  # loss noise
    search: torch.Generator  # ddrs ascent noise
    table: torch.Tensor | None  # σ per training example (ddrs, insta)
    xs: torch.Tensor


StepFn = Callable[[RunState, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, int], losses.Step]


@dataclass(frozen=True)
class Method:
    """A training method: its loss step, an optional hook at the start of every epoch, and
    whether it keeps a per-example σ table or trains a (left, right) pair."""

    step: StepFn  # (run, model, x, y, positions in the training set, epoch) -> (loss, acc)
    epoch_start: Callable[[RunState, nn.Module, int], None] | None = None
    sigma_table: bool = False
    pair: bool = False


def _ddrs_step(run: RunState, model: nn.Module, x, y, idx, epoch: int) -> losses.Step:
    o = run.opts
    model.eval()  # frozen weights, per-image ψ: see losses.ddrs_sigma_ascent
    sigma = losses.ddrs_sigma_ascent(model, x, run.table[idx], steps=o.ddrs_steps, lr=o.ddrs_lr,
                                     samples=o.ddrs_samples, sigma_min=o.sigma_min,
                                     sigma_max=o.sigma_max, generator=run.search)
    model.train()
    run.table[idx] = sigma
    if o.ddrs_loss == "macer":
        return losses.macer_step(model, x, y, sigma, run.noise, o.k, o.lam, o.macer_beta, o.macer_gamma)
    return losses.copies_step(model, x, y, sigma, run.noise, o.k)


def _insta_epoch(run: RunState, model: nn.Module, epoch: int) -> None:
    o = run.opts
    since = epoch - o.stage1_epochs
    if since < 0 or (since > 0 and (not o.insta_every or since % o.insta_every)):
        return
    model.eval()
    # Its own stream per search epoch: nothing to checkpoint, the same σ after a resume.
    generator = make_generator(derive_seed(run.seed, 3, epoch), run.xs.device)
    cap = bounds.cp_lower(100_000, 100_000, 0.001)  # certify-local's default n and α
    with torch.no_grad():
        num_classes = model(run.xs[:1]).shape[1]
    for i in range(len(run.xs)):
        run.table[i] = insta_search(
            model, run.xs[i], float(run.table[i]), num_classes=num_classes,
            sigma_min=o.sigma_min, sigma_max=o.sigma_max, steps=o.insta_steps,
            samples=o.insta_samples, cap=cap, batch_size=o.insta_samples, generator=generator)[0]
    model.train()


def _insta_step(run: RunState, model: nn.Module, x, y, idx, epoch: int) -> losses.Step:
    sigma = run.sigma if epoch < run.opts.stage1_epochs else run.table[idx]
    return losses.gaussian_step(model, x, y, sigma, run.noise)


METHODS: dict[str, Method] = {
    "gaussian": Method(lambda r, m, x, y, i, e: losses.gaussian_step(m, x, y, r.sigma, r.noise)),
    "feng": Method(lambda r, m, x, y, i, e: losses.feng_step(m, x, y, r.sigma, r.noise, r.opts.k,
                                                             r.opts.lam)),
    "ddrs": Method(_ddrs_step, sigma_table=True),
    "insta": Method(_insta_step, _insta_epoch, sigma_table=True),
    "drs": Method(lambda r, m, x, y, i, e: losses.drs_step(m, x, y, r.sigma, r.noise), pair=True),
}
