"""`smoothcert train --method selector`: train a σ selector's estimator over the classifiers of
its levels (`--experts`), and write a selector bundle holding the estimator and the experts.

The bundle is written in torch.export form, each network with its own normalisation inside
(the experts keep theirs, the estimator gets `--normalize` or the first expert's), so its
model.json has no `normalize`. `train.json` records the command, the settings, the data, the
experts' digests, the `--init` bundle the estimator started from (and which of its layers did
not fit), what the radius estimates said (the mean estimated radius at each level,
the share of images whose target prefers each level, the share no level classifies) and the
epochs' loss and agreement. As for the other methods, OUT/checkpoint.pt holds the state after
every `--checkpoint-every` epochs, `--resume` continues from it bit for bit (the radius
estimates are computed again: they are seeded), and it is removed at the end unless
`--keep-checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from smoothcert.commands.train import (
    NOISE,
    TRANSFORMS,
    TrainError,
    _command,
    _parse_normalize,
    _plain,
    announce_resume,
    training_split,
)


def train_selector(args: argparse.Namespace) -> int:
    """0 on success, 2 (with a message) for refused input."""
    try:
        setup = _setup(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"smoothcert train: {e}", file=sys.stderr)
        return 2
    return _train(args, **setup)


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    from smoothcert.architectures import Normalize, build_architecture
    from smoothcert.bundle import load_bundle
    from smoothcert.manifest import ModelSpec, SelectorSpec, SigmaRange
    from smoothcert.selector_training import SelectorTraining

    if not args.experts or not args.sigmas:
        raise TrainError("--method selector needs --experts (one bundle, or one per level) and --sigmas")
    if len(args.experts) not in (1, len(args.sigmas)):
        raise TrainError(f"--experts takes one bundle for every level or one per level ({len(args.sigmas)}), "
                         f"got {len(args.experts)}")
    if not args.arch:
        raise TrainError("--method selector needs --arch: the estimator's network (one output per level)")
    if args.epochs < 1 or args.batch_size < 1 or args.checkpoint_every < 1 or not args.sigma > 0:
        raise TrainError("need --sigma (σ_e) > 0, --epochs >= 1, --batch-size >= 1, --checkpoint-every >= 1")
    settings = SelectorTraining(sigmas=tuple(args.sigmas), sigma_e=args.sigma, label_samples=args.label_samples,
                                temperature=args.temperature, copies=args.copies, consistency=args.consistency,
                                reweight=not args.no_reweight)
    data, x, y = training_split(args)
    shape, num_classes = tuple(int(s) for s in x.shape[1:]), len(data.classes)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    experts = [load_bundle(path, device=device) for path in args.experts]
    for path, b in zip(args.experts, experts, strict=True):
        if b.spec.kind != "standard" or b.spec.input_shape != shape or b.spec.num_classes != num_classes:
            raise TrainError(f"--experts: {path} is a {b.spec.kind} bundle for {list(b.spec.input_shape)} and "
                             f"{b.spec.num_classes} classes; the data needs standard bundles for {list(shape)} "
                             f"and {num_classes}")
    normalize = _parse_normalize(args.normalize, x, shape[0]) or experts[0].spec.normalize
    name = args.name or Path(args.out).resolve().name
    levels = tuple(args.sigmas)
    try:
        spec = ModelSpec(name=name, kind="selector", input_shape=shape, num_classes=num_classes,
                         labels=experts[0].spec.labels, sigma=SigmaRange(levels[0], min(levels), max(levels)),
                         selector=SelectorSpec(levels, args.sigma, "shared" if len(experts) == 1 else "per_sigma"))
    except ValueError as e:
        raise TrainError(str(e)) from None
    torch.manual_seed(args.seed)  # the estimator's initial weights
    net = build_architecture(args.arch, shape, len(levels))
    init = _init_estimator(args, net, shape) if args.init else None
    estimator = (nn.Sequential(Normalize(*normalize), net) if normalize is not None else net).to(device)
    return dict(data=data, x=x, y=y, spec=spec, settings=settings, estimator=estimator, experts=experts,
                device=device, normalize=normalize, init=init)


def _init_estimator(args: argparse.Namespace, net, shape: tuple[int, ...]) -> dict[str, Any]:
    """Start the estimator from `--init`'s weights wherever name and shape match: all but the
    last layer, which has one output per class there and one per level here. A classifier
    trained under the estimator's noise (the expert at σ_e) already has features that survive
    it; the estimator then learns which level each of them calls for."""
    from smoothcert.bundle import load_bundle

    init = load_bundle(args.init)
    if init.spec.kind != "standard" or init.spec.input_shape != shape or init.spec.architecture != args.arch:
        raise TrainError(f"--init needs a standard {args.arch} bundle for input {list(shape)}; {args.init} is a "
                         f"{init.spec.kind} {init.spec.architecture or 'torch.export'} bundle for "
                         f"{list(init.spec.input_shape)}")
    inner = init.classifier[1] if init.spec.normalize is not None else init.classifier
    own, theirs = net.state_dict(), inner.state_dict()
    copied = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(copied, strict=False)
    skipped = sorted(set(own) - set(copied))
    return {"bundle": os.fspath(args.init), "digest": init.digest, "copied": len(copied), "skipped": skipped}


def _train(args: argparse.Namespace, *, data, x, y, spec, settings, estimator, experts, device, normalize,
           init) -> int:
    import dataclasses

    import numpy as np
    import torch

    from smoothcert.bundle import save_bundle
    from smoothcert.checkpoint import CheckpointMismatch, read_checkpoint
    from smoothcert.progress import ProgressBar
    from smoothcert.selector_training import level_weights, radius_estimates, soft_labels, train_estimator

    started = time.perf_counter()
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64, device=device)
    levels = spec.selector.sigmas
    bar = ProgressBar(len(levels), "radius estimates")
    radii = radius_estimates([b.classifier for b in experts], xt, yt, levels, settings.label_samples,
                             batch_size=max(args.batch_size, settings.label_samples) * 4, seed=args.seed,
                             progress=lambda done, total: bar.advance(f"σ = {levels[done - 1]}"))
    bar.close()
    targets = soft_labels(radii, settings.temperature)
    weights = level_weights(targets) if settings.reweight else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    resumed_from = read_checkpoint(checkpoint)["epoch"] if args.resume and checkpoint.exists() else None
    announce_resume(args, checkpoint)
    bar = ProgressBar(args.epochs, "train estimator")

    def on_epoch(s) -> None:
        bar.done = s.epoch - 1  # after a resume the bar starts where the checkpoint left off
        bar.advance(f"loss {s.loss:.4f} agreement {s.agreement:.3f} {s.seconds:.1f}s")

    # The run's identity for --resume: a checkpoint of other experts, data or start is refused.
    run = {"experts": [b.digest for b in experts], "init": init and init["digest"], "data": data.source,
           "data_seed": args.data_seed, "limit": args.limit, "sigmas": list(levels), "sigma_e": args.sigma}
    try:
        history = train_estimator(
            estimator, xt, targets, weights, settings=settings, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed, on_epoch=on_epoch, checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every, resume=args.resume, config=run)
    except CheckpointMismatch as e:
        print(f"smoothcert train: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    digest = save_bundle(out, spec, (estimator.cpu(), *(b.classifier.cpu() for b in experts)), fmt="pt2")
    top = targets.argmax(axis=1)
    unclassified = (radii == 0).all(axis=1)
    record = {
        "format": "smoothcert-train/1",
        "command": _command(args),
        "config": {k: v for k, v in sorted(vars(args).items()) if _plain(k, v)} | {"device": str(device)},
        "selector": dataclasses.asdict(settings),
        "seed": args.seed,
        "data": {"source": data.source, "split": "train", "data_seed": args.data_seed, "images": len(y),
                 "limit": args.limit, "input_shape": list(spec.input_shape), "classes": list(data.classes)},
        "normalize": None if normalize is None else {"mean": list(normalize[0]), "std": list(normalize[1])},
        "transforms": TRANSFORMS, "noise": NOISE,
        "experts": [{"bundle": os.fspath(p), "digest": b.digest} for p, b in zip(args.experts, experts, strict=True)],
        "init": init,
        "labels": {"mean_radius": [float(v) for v in radii.mean(axis=0)],
                   "prefers": [float(v) for v in np.bincount(top[~unclassified], minlength=len(levels)) / len(y)],
                   "unclassified": float(unclassified.mean())},
        "resumed_from_epoch": resumed_from,
        "epochs": [vars(h) for h in history],
        "bundle": {"digest": digest, "kind": "selector", "name": spec.name, "sigmas": list(levels),
                   "sigma_e": spec.selector.sigma_e, "experts": spec.selector.experts},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not args.keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    last = history[-1]
    print(f"smoothcert train: wrote {out} (selector bundle {digest}); last epoch loss {last.loss:.4f} "
          f"agreement {last.agreement:.3f}", file=sys.stderr)
    return 0
