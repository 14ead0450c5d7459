"""Model bundles: `model.json` plus a network, as a directory or a .zip of it.

Format (docs/bundles.md): `model.json` and either `model.pt2` (a
`torch.export` program with a dynamic batch dimension) or `"architecture"` plus `weights.pt`
(a state dict); `kind: "drs"` bundles hold `left.*` and `right.*`, each taking a half-image
`[C, H, W/2]`; `kind: "selector"` bundles hold `estimator.*` (logits over the levels) and
`expert.*` (one classifier for every level) or `expert0.*`, `expert1.*`, … (one per level);
`kind: "remote"` bundles are model.json alone, naming a model served over the
Open Inference Protocol v2 (smoothcert.remote). Guarantees of `load_bundle`:

- nothing from the bundle is unpickled beyond tensors: state dicts go through
  `torch.load(weights_only=True)`, and a `.pt2` archive is vetted first (`smoothcert.pt2check`),
  because `torch.export.load` itself falls back to full pickle, runs AOTInductor libraries,
  evaluates guard code and `sympify`s shape expressions;
- every network maps `[B, *network_shape]` in [0,1] pixel space (`Normalize` prepended when
  `normalize` is given) to logits `[B, num_classes]`, gives each image the same logits
  whatever else is in the batch, and is in eval mode with gradients off;
- `digest` is "sha256:" over the files used (name, NUL, 8-byte big-endian length,
  content; sorted by name), so a directory and its zip have the same digest. A remote
  bundle's digest covers its model.json only: it names the description, not the served
  model, which its canaries pin instead.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from smoothcert.architectures import Normalize, build_architecture
from smoothcert.archive import (
    bundle_digest,
    inspect_bundle,
    is_network_file,
    is_torchscript,
    network_names,
    read_bundle_files,
    torchscript_error,
    zip_bundle,
)
from smoothcert.manifest import BundleError, ModelSpec, SigmaRange
from smoothcert.pt2check import check_pt2
from smoothcert.remote import RemoteClassifier, RemoteOptions

__all__ = [
    "Bundle", "BundleError", "ModelSpec", "SigmaRange", "bundle_digest", "load_bundle",
    "read_bundle_files", "save_bundle", "zip_bundle",
]

@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: `classifier` (standard), `left`/`right` (drs) or `estimator` and
    `experts` (selector: one, or one per level), in eval mode."""

    spec: ModelSpec
    digest: str
    classifier: nn.Module | None = None
    left: nn.Module | None = None
    right: nn.Module | None = None
    estimator: nn.Module | None = None
    experts: tuple[nn.Module, ...] | None = None

    @property
    def networks(self) -> tuple[nn.Module, ...]:
        """The networks in `spec.roles` order: (classifier,), (left, right) or (estimator, *experts)."""
        if self.spec.kind == "selector":
            return (self.estimator, *self.experts)
        return (self.left, self.right) if self.spec.kind == "drs" else (self.classifier,)

    @property
    def remote(self):
        """The RemoteClassifier of a remote bundle (smoothcert.remote), else None."""
        return self.classifier if self.spec.kind == "remote" else None

    def to(self, device: str | torch.device) -> Bundle:
        """A new Bundle on `device`; this one is untouched (its modules are copied first).

        For .pt2 networks whose graph creates tensors on a fixed device, prefer
        `load_bundle(..., device=...)`, which also rewrites those devices. A remote bundle has
        nothing to move (its answers come back on the input's device)."""
        if self.spec.kind == "remote":
            return self
        def move(m: nn.Module) -> nn.Module:
            return _frozen(copy.deepcopy(m).to(device))

        moved = {k: move(m) for k in ("classifier", "left", "right", "estimator")
                 if (m := getattr(self, k)) is not None}
        if self.experts is not None:
            moved["experts"] = tuple(move(m) for m in self.experts)
        return dataclasses.replace(self, **moved)


class _ExportedNetwork(nn.Module):
    """An unlifted torch.export program. Its train/eval behaviour was fixed at export and the
    GraphModule refuses .train()/.eval(), so here they only set the flag (callers may call them)."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> _ExportedNetwork:
        self.training = mode
        return self


# ---------------------------------------------------------------- loading networks


def _load_pt2(data: bytes, fname: str, device: torch.device) -> nn.Module:
    if is_torchscript(data):
        raise torchscript_error(fname)
    check_pt2(data, fname)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:
        raise BundleError(f"{fname} could not be loaded as a torch.export program ({e})") from None
    users = ep.graph_signature.user_inputs
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]
    if len(vals) != 1 or not isinstance(vals[0], torch.Tensor) or vals[0].dim() == 0 \
            or not isinstance(vals[0].shape[0], torch.SymInt):
        raise BundleError(f"{fname} must take one image batch with a dynamic batch dimension: "
                          "export with dynamic_shapes=({0: torch.export.Dim('batch')},)")
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        ep = move_to_device_pass(ep, device)
    return _ExportedNetwork(ep.module())


def _load_state_dict(spec: ModelSpec, data: bytes, fname: str, outputs: int) -> nn.Module:
    if is_torchscript(data):
        raise torchscript_error(fname)
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # Name the offending class, but not torch's advice to allowlist it: we never will.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" such as {found.group(1)}" if found else ""
        raise BundleError(f"{fname} must be a state dict of tensors, but it pickles other objects"
                          f"{what} (a whole nn.Module saved with torch.save(model)?); save it "
                          "with torch.save(model.state_dict(), ...)") from None
    except Exception as e:
        raise BundleError(f"{fname} could not be read as a torch.save state dict ({e})") from None
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        hint = " (it looks like a checkpoint: save its 'state_dict' entry)" \
            if isinstance(state, Mapping) and "state_dict" in state else ""
        raise BundleError(f"{fname} must be a state dict mapping names to tensors{hint}")
    try:
        net = build_architecture(spec.architecture, spec.network_shape, outputs, **spec.architecture_args)
    except Exception as e:
        raise BundleError(f"model.json: architecture {spec.architecture!r} cannot be built for "
                          f"input {list(spec.network_shape)} ({e})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{fname} does not fit architecture {spec.architecture!r}: {e}") from None
    return net


def _frozen(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _check_network(net: nn.Module, spec: ModelSpec, what: str, device: torch.device,
                   thorough: bool = True, outputs: int | None = None) -> None:
    """Finite logits of shape [2, K] (K: `outputs`, default num_classes); if thorough, also
    per image: an image's logits must not depend on its batch-mates or change between calls
    (Monte Carlo samples must be i.i.d.)."""
    shape, k = spec.network_shape, outputs or spec.num_classes
    count = "levels" if outputs is not None and outputs != spec.num_classes else "num_classes"
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            zero = net(torch.zeros(2, *shape, device=device))
            if not isinstance(zero, torch.Tensor) or tuple(zero.shape) != (2, k):
                got = list(zero.shape) if isinstance(zero, torch.Tensor) else type(zero).__name__
                raise BundleError(f"{what} maps a batch {[2, *shape]} to {got}, "
                                  f"not logits [2, {k}] ({count})")
            if thorough:
                pair, first, again = net(x), net(x[:1]), net(x)
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"{what} fails on a batch of shape {[2, *shape]}: "
                          f"{type(e).__name__}: {e}") from None
    if not zero.is_floating_point() or not torch.isfinite(zero).all():
        raise BundleError(f"{what} gives non-finite or non-float logits for a blank image")
    if not thorough:
        return
    tol = 1e-3 * (1.0 + pair.abs().max().item())  # room for TF32 and batch-size kernels
    if (pair[:1] - first).abs().max() > tol or (pair - again).abs().max() > tol:
        raise BundleError(f"{what} gives an image different logits depending on its batch or "
                          "from call to call (BatchNorm in train mode? dropout?): save it in "
                          "eval mode")


def load_bundle(source: str | os.PathLike | bytes, *, device: str | torch.device = "cpu",
                remote: RemoteOptions | None = None) -> Bundle:
    """Read, validate and load a bundle (directory, zip path or zip bytes); see module doc.
    A remote bundle connects to its endpoint only if `remote` (the operator's options)
    allows it; without them every endpoint is refused."""
    device = torch.device(device)
    files = read_bundle_files(source)
    spec, names, digest = inspect_bundle(files)
    if spec.kind == "remote":
        return Bundle(spec=spec, digest=digest, classifier=RemoteClassifier(spec, remote or RemoteOptions()))
    nets = []
    for name, role in zip(names, spec.roles, strict=True):
        outputs = spec.outputs(role)
        if spec.architecture is None:
            net = _load_pt2(files[name], name, device)
        else:
            net = _load_state_dict(spec, files[name], name, outputs)
        if spec.normalize is not None:  # noise is added in pixel space, before normalising
            net = nn.Sequential(Normalize(*spec.normalize), net)
        net = _frozen(net.to(device))
        _check_network(net, spec, name, device, outputs=outputs)
        nets.append(net)
    if spec.kind == "drs":
        return Bundle(spec=spec, digest=digest, left=nets[0], right=nets[1])
    if spec.kind == "selector":
        return Bundle(spec=spec, digest=digest, estimator=nets[0], experts=tuple(nets[1:]))
    return Bundle(spec=spec, digest=digest, classifier=nets[0])


# ---------------------------------------------------------------- saving


def save_bundle(out_dir: str | os.PathLike, spec: ModelSpec | Mapping,
                networks: nn.Module | tuple[nn.Module, ...], *, fmt: str = "pt2") -> str:
    """Write a bundle to `out_dir` (replacing any bundle files there); returns its digest.

    `spec`: a `ModelSpec`, or the model.json object as a dict (validated by
    `ModelSpec.from_json`, so its errors name the field). `networks`: one module (standard),
    (left, right) (drs) or (estimator, expert) / (estimator, expert0, expert1, …) (selector,
    in `spec.roles` order; the estimator gives one logit per level), each expecting normalised
    input of `spec.network_shape`; they are copied to the CPU and not modified. fmt="pt2"
    exports with a dynamic batch dimension (and writes no 'architecture'); fmt="state_dict"
    needs `spec.architecture` and checks the weights fit it. Anything else (another type of
    spec or network, a remote spec, a network that does not map a batch to its logits) raises
    BundleError before a file is written.
    """
    if fmt not in ("pt2", "state_dict"):
        raise BundleError(f"fmt must be 'pt2' or 'state_dict', got {fmt!r}")
    if isinstance(spec, Mapping):
        spec = ModelSpec.from_json(dict(spec))
    elif not isinstance(spec, ModelSpec):
        raise BundleError(f"spec must be a ModelSpec or the model.json object as a dict, got "
                          f"{type(spec).__name__}")
    if spec.kind == "remote":
        raise BundleError("a remote bundle has no network: it is model.json alone "
                          "(json.dumps(spec.to_json()) into model.json)")
    roles = spec.roles
    wanted = ("one nn.Module" if spec.kind == "standard"
              else f"nn.Modules for ({', '.join(roles)})")
    if isinstance(networks, nn.Module):
        nets: tuple = (networks,)
    elif isinstance(networks, (tuple, list)):
        nets = tuple(networks)
    else:
        hint = " (a state dict? pass the module itself)" if isinstance(networks, Mapping) else ""
        raise BundleError(f"a {spec.kind} bundle needs {wanted}, got {type(networks).__name__}{hint}")
    if len(nets) != len(roles) or not all(isinstance(n, nn.Module) for n in nets):
        got = ", ".join(type(n).__name__ for n in nets) or "nothing"
        raise BundleError(f"a {spec.kind} bundle needs {wanted}, got ({got})")
    if fmt == "state_dict" and spec.architecture is None:
        raise BundleError("fmt='state_dict' needs spec.architecture (the network to rebuild)")
    if fmt == "pt2":  # the program carries its own graph
        spec = dataclasses.replace(spec, architecture=None, architecture_args={})
    shape = spec.network_shape
    files: dict[str, bytes] = {}
    for name, role, net in zip(network_names(roles, fmt), roles, nets, strict=True):
        outputs = spec.outputs(role)
        net = copy.deepcopy(net).cpu().eval()
        _check_network(net, spec, name, torch.device("cpu"), thorough=False, outputs=outputs)  # load checks all
        buf = io.BytesIO()
        if fmt == "pt2":
            try:
                program = torch.export.export(net, (torch.zeros(2, *shape),),
                                              dynamic_shapes=({0: torch.export.Dim("batch")},))
            except Exception as e:  # torch raises many types here; the cause stays chained
                raise BundleError(f"{name}: torch.export cannot export the network with a dynamic batch "
                                  f"dimension ({type(e).__name__}: {e}); make forward() independent of "
                                  "the batch size, or save fmt='state_dict' with an architecture") from e
            torch.export.save(program, buf)
        else:
            state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            try:
                build_architecture(spec.architecture, shape, outputs,
                                   **spec.architecture_args).load_state_dict(state, strict=True)
            except Exception as e:
                raise BundleError(f"{name}: the network does not fit architecture "
                                  f"{spec.architecture!r}: {e}") from None
            torch.save(state, buf)
        files[name] = buf.getvalue()
    files["model.json"] = (json.dumps(spec.to_json(), indent=2) + "\n").encode("utf-8")
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # another form or kind would make the bundle ambiguous
        if is_network_file(stale) and stale not in files and os.path.isfile(path := os.path.join(out_dir, stale)):
            os.remove(path)
    for name, data in files.items():  # write-then-rename: a reader never sees half a file
        tmp = os.path.join(out_dir, f".{name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, os.path.join(out_dir, name))
    return bundle_digest(files)
