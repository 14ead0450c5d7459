"""Training checkpoints: everything `smoothcert.training.fit` needs to continue a run exactly.

A checkpoint is one `torch.save` of a dict holding only tensors, numbers, strings, None and
lists/dicts of them (state dicts of the model, optimiser and schedule, the generators'
states, torch's global RNG state, the σ table, the per-epoch history and the run's
configuration), so it loads with `torch.load(weights_only=True)`. It is written to a
temporary file and renamed: an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "smoothcert-train-checkpoint/1"


class CheckpointMismatch(ValueError):
    """The checkpoint belongs to a run with other settings."""


def save_checkpoint(path: str | os.PathLike, config: dict[str, Any], epoch: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, schedule: Any,
                    generators: dict[str, torch.Generator], sigma_table: torch.Tensor | None,
                    history: list[dict[str, Any]], device: torch.device) -> None:
    """Write the state after `epoch` finished epochs to `path` (atomically)."""
    state = {
        "format": FORMAT, "config": config, "epoch": epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "generators": {name: g.get_state() for name, g in generators.items()},
        # Only dropout-like layers draw from the global RNGs; kept so that they resume too.
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "sigma_table": None if sigma_table is None else sigma_table.detach().cpu(),
        "history": history,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict, loaded with weights_only=True onto the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a smoothcert training checkpoint ({FORMAT})")
    return state


def load_checkpoint(path: str | os.PathLike, config: dict[str, Any], model: nn.Module,
                    optimizer: torch.optim.Optimizer, schedule: Any,
                    generators: dict[str, torch.Generator],
                    device: torch.device) -> dict[str, Any] | None:
    """Restore the run's state from `path` into the given objects and return the checkpoint
    (None, touching nothing, when there is no file). A checkpoint of a run with a different
    configuration is refused: resuming it would not give that run's weights."""
    if not os.path.exists(path):
        return None
    state = read_checkpoint(path)
    if state["config"] != config:
        saved = state["config"]
        differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        raise CheckpointMismatch(f"{os.fspath(path)} was written by a run with other settings "
                         f"({', '.join(differ)} differ): resume with the same ones, or delete it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state
