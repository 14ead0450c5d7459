"""`smoothcert train`: train a base classifier on a data set's train split and write a bundle.

`--method selector` trains a σ selector's estimator instead, over the classifiers given with
`--experts` (smoothcert.selector_training), and writes a selector bundle holding both.

The output directory becomes a state-dict model bundle the service accepts as is
(`model.json` + `weights.pt`, or `left.pt` + `right.pt` for `--method drs`), plus
`train.json`: the canonical command, every resolved setting, the seed, the data source, the
normalisation and transforms, the per-epoch loss and accuracy, and the σ table's summary.
While training, `checkpoint.pt` in it holds the state after each `--checkpoint-every` epochs
and `--resume` continues from it; it is deleted when the bundle is written (it would travel
with an upload of the directory) unless `--keep-checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

METHOD_NAMES = ("gaussian", "feng", "ddrs", "insta", "drs", "selector")
# CLI flag -> MethodOptions field (None on the command line: the method's default).
OPTION_FLAGS = ("sigma_min", "sigma_max", "k", "lam", "ddrs_steps", "ddrs_lr", "ddrs_samples",
                "ddrs_loss", "macer_beta", "macer_gamma", "stage1_epochs", "insta_every",
                "insta_steps", "insta_samples")
# The selector's own flags: left out of the other methods' records and commands.
SELECTOR_FLAGS = ("experts", "sigmas", "label_samples", "temperature", "copies", "consistency", "no_reweight")
TRANSFORMS = "none: images are used as stored (no resize, crop or flip)"
NOISE = "N(0, sigma^2 I) in [0, 1] pixel space, added before the normalisation, not clipped"


class TrainError(ValueError):
    """A refused command line or input; the message says what to change."""


def register(commands) -> None:
    c = commands.add_parser(
        "train", help="train a base classifier and write a model bundle",
        description="Train a base classifier for randomized smoothing on the train split of "
                    "DATA and write a state-dict model bundle (plus train.json) to --out.")
    c.add_argument("--method", choices=METHOD_NAMES, default="gaussian", help="default: gaussian")
    c.add_argument("--arch", help="digits_cnn, mnist_cnn, linear, cifar_resnet20/110, torchvision:<name> "
                                  "(default with --init: the bundle's)")
    c.add_argument("--data", required=True, help="sklearn-digits, mnist-5k, an .npz or an ImageFolder directory")
    c.add_argument("--data-seed", type=int, default=0,
                   help="split seed of sklearn-digits and mnist-5k (default 0; evaluate with the same one)")
    c.add_argument("--limit", type=int, help="train on the first N training images only")
    c.add_argument("--sigma", type=float, required=True,
                   help="training noise level (pixel units); selector: σ_e, the estimator's")
    c.add_argument("--epochs", type=int, required=True)
    c.add_argument("--out", required=True, help="bundle directory to write")
    c.add_argument("--name", help="model name (default: the --out directory's name)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--lr", type=float, default=1e-3, help="initial learning rate (cosine to 0)")
    c.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    c.add_argument("--weight-decay", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=0, help="initial weights, shuffle and noise")
    c.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    c.add_argument("--normalize", nargs="+", metavar="MEAN,STD",
                   help="one MEAN,STD pair per channel, or 'auto' (the training images' "
                        "per-channel mean and std); default: the --init bundle's, else none")
    c.add_argument("--sigma-min", type=float, help="model.json's sigma.min and the lowest σ "
                   "ddrs/insta may give an example (default σ/2)")
    c.add_argument("--sigma-max", type=float, help="likewise the highest (default 4σ, at most 2)")
    c.add_argument("--k", type=int, help="noisy copies per image for feng and ddrs (default 8)")
    c.add_argument("--lam", type=float, help="regulariser weight (feng 0.1, ddrs-loss macer 12)")
    c.add_argument("--ddrs-steps", type=int, help="σ ascent steps before each weight step (default 2)")
    c.add_argument("--ddrs-lr", type=float, help="σ ascent step size (default 0.01)")
    c.add_argument("--ddrs-samples", type=int, help="noisy copies per ascent step (default 8)")
    c.add_argument("--ddrs-loss", choices=("ce", "macer"), help="ddrs weight loss (default ce)")
    c.add_argument("--macer-beta", type=float, help="MACER inverse temperature (default 16)")
    c.add_argument("--macer-gamma", type=float, help="MACER hinge (default 8)")
    c.add_argument("--stage1-epochs", type=int, help="insta: epochs at fixed σ (default epochs/2)")
    c.add_argument("--insta-every", type=int, help="insta: search σ again every N epochs (default 0: once)")
    c.add_argument("--insta-steps", type=int, help="insta: bracketing rounds per search (default 2)")
    c.add_argument("--insta-samples", type=int, help="insta: noisy votes per σ scored (default 32)")
    c.add_argument("--init", help="a standard bundle whose weights start the training (drs: "
                                  "both halves, when its architecture takes the half shape; selector: "
                                  "the estimator, all but the class head)")
    s = c.add_argument_group("selector (--method selector)")
    s.add_argument("--experts", nargs="+", metavar="BUNDLE",
                   help="the classifiers of the levels: one bundle for every level, or one per level in --sigmas order")
    s.add_argument("--sigmas", nargs="+", type=float, metavar="SIGMA", help="the levels Σ the estimator chooses among")
    s.add_argument("--label-samples", type=int, default=100, help="noisy copies per image and level for the "
                   "radius estimates behind the soft labels (default 100)")
    s.add_argument("--temperature", type=float, default=0.1, help="of the softmax over estimated radii, in "
                   "pixel units (default 0.1)")
    s.add_argument("--copies", type=int, default=4, help="noisy copies per image in each step (default 4)")
    s.add_argument("--consistency", type=float, default=1.0, help="weight of the consistency term (default 1)")
    s.add_argument("--no-reweight", action="store_true", help="do not reweight images by their target level")
    c.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    c.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    c.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint.pt at the end")
    c.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train and write the bundle; 0 on success, 2 (with a message) for refused input."""
    if args.method == "selector":
        from smoothcert.commands.train_selector import train_selector

        return train_selector(args)
    try:
        setup = _setup(args)
    except (ValueError, FileNotFoundError) as e:  # TrainError, BundleError, ImageError, load_data's
        print(f"smoothcert train: {e}", file=sys.stderr)
        return 2
    return _train(args, **setup)


def _parse_normalize(values: list[str] | None, x, channels: int) -> tuple | None:
    if not values:
        return None
    if values == ["auto"]:  # rounded first, so that training and model.json use the same numbers
        mean = [round(float(v), 6) for v in x.mean(axis=(0, 2, 3), dtype="float64")]
        std = [max(round(float(v), 6), 1e-6) for v in x.std(axis=(0, 2, 3), dtype="float64")]
        return tuple(mean), tuple(std)
    try:
        pairs = [tuple(float(p) for p in v.split(",")) for v in values]
    except ValueError:
        pairs = []
    if len(pairs) != channels or any(len(p) != 2 or p[1] <= 0 or not all(map(math.isfinite, p)) for p in pairs):
        raise TrainError(f"--normalize takes one MEAN,STD pair per channel ({channels}) with STD > 0, "
                         f"or 'auto'; got {' '.join(values)}")
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def announce_resume(args: argparse.Namespace, checkpoint: Path) -> None:
    """With --resume, say whether the run continues from `checkpoint` or starts afresh."""
    if args.resume:
        print(f"smoothcert train: resuming from {checkpoint}" if checkpoint.exists() else
              f"smoothcert train: no {checkpoint}: starting from epoch 1", file=sys.stderr)


def training_split(args: argparse.Namespace):
    """(data set, x, y): the train split of --data (split by --data-seed), its first --limit images."""
    from smoothcert.data import load_data

    data = load_data(args.data, "train", seed=args.data_seed)
    x, y = data.x, data.y
    if args.limit is not None:
        if args.limit < 1:
            raise TrainError("--limit must be >= 1")
        x, y = x[:args.limit], y[:args.limit]
    return data, x, y


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    """Everything checked before any training: data, options, model.json, initial weights."""
    import dataclasses

    import torch

    from smoothcert.architectures import build_architecture
    from smoothcert.bundle import load_bundle
    from smoothcert.manifest import ModelSpec, SigmaRange
    from smoothcert.methods import MethodOptions

    if args.epochs < 1 or args.batch_size < 1 or args.checkpoint_every < 1 or not args.sigma > 0:
        raise TrainError("need --sigma > 0, --epochs >= 1, --batch-size >= 1, --checkpoint-every >= 1")
    data, x, y = training_split(args)
    num_classes, shape = len(data.classes), tuple(int(s) for s in x.shape[1:])
    if len(y) == 0 or num_classes < 2 or int(y.max()) >= num_classes:
        raise TrainError(f"{data.source}: need images of at least 2 classes with labels < {num_classes}")
    init = load_bundle(args.init) if args.init else None
    if init is not None and (init.spec.kind != "standard" or init.spec.input_shape != shape
                             or init.spec.num_classes != num_classes):
        raise TrainError(f"--init needs a standard bundle for input {list(shape)} and {num_classes} "
                         f"classes; {args.init} is {init.spec.kind}, {list(init.spec.input_shape)}, "
                         f"{init.spec.num_classes} classes")
    arch = args.arch or (init.spec.architecture if init is not None else None)
    if not arch:
        raise TrainError("give --arch (or --init with a bundle that names its architecture)")
    normalize = _parse_normalize(args.normalize, x, shape[0])
    if normalize is None and init is not None and not args.normalize:
        normalize = init.spec.normalize
    options = MethodOptions(**{f: getattr(args, f) for f in OPTION_FLAGS if getattr(args, f) is not None})
    options = options.resolved(args.method, args.sigma, args.epochs)
    kind = "drs" if args.method == "drs" else "standard"
    name = args.name or Path(args.out).resolve().name
    try:
        spec = ModelSpec(name=name, kind=kind, input_shape=shape, num_classes=num_classes,
                         labels=data.classes, sigma=SigmaRange(args.sigma, options.sigma_min, options.sigma_max),
                         normalize=normalize, architecture=arch)
    except ValueError as e:
        raise TrainError(f"{e} (choose the model's name with --name)" if "'name'" in str(e) else str(e)) from None

    def build() -> list[torch.nn.Module]:
        torch.manual_seed(args.seed)  # the initial weights
        return [build_architecture(arch, spec.network_shape, num_classes)
                for _ in range(2 if kind == "drs" else 1)]

    nets, init_note = build(), None
    if init is not None:
        inner = init.classifier[1] if init.spec.normalize is not None else init.classifier
        try:
            if init.spec.architecture != arch:
                raise RuntimeError(f"it is a {init.spec.architecture or 'torch.export'} network, not {arch}")
            for net in nets:
                net.load_state_dict(inner.state_dict(), strict=True)
            init_note = "weights copied" + (" into both halves" if kind == "drs" else "")
        except RuntimeError as e:
            if kind != "drs":
                raise TrainError(f"--init {args.init}: its weights do not fit {arch}: {e}") from None
            nets = build()  # a failed load_state_dict may have copied some tensors already
            init_note = f"halves trained from scratch: {arch} at {list(spec.network_shape)} cannot take its weights"
            print(f"smoothcert train: {init_note}", file=sys.stderr)
        init_note = {"bundle": os.fspath(args.init), "digest": init.digest, "weights": init_note}
    return dict(data=data, x=x, y=y, spec=spec, options=options, nets=nets, init=init_note,
                options_dict=dataclasses.asdict(options))


def _train(args: argparse.Namespace, *, data, x, y, spec, options, nets, init, options_dict) -> int:
    import torch

    from smoothcert.bundle import save_bundle
    from smoothcert.checkpoint import CheckpointMismatch
    from smoothcert.progress import ProgressBar
    from smoothcert.training import EpochStats, fit

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    bar = ProgressBar(args.epochs, "train")

    def on_epoch(s: EpochStats) -> None:
        bar.done = s.epoch - 1  # after a resume the bar starts where the checkpoint left off
        table = "" if s.sigma is None else \
            f" sigma {s.sigma['min']:.3f}/{s.sigma['mean']:.3f}/{s.sigma['max']:.3f}"
        bar.advance(f"loss {s.loss:.4f} acc {s.accuracy:.3f} lr {s.lr:.2e} {s.seconds:.1f}s{table}")

    announce_resume(args, checkpoint)
    started = time.perf_counter()
    try:
        result = fit(tuple(nets) if spec.kind == "drs" else nets[0], x, y, method=args.method,
                     sigma=args.sigma, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     optimizer=args.optimizer, weight_decay=args.weight_decay, normalize=spec.normalize,
                     seed=args.seed, device=device, options=options, on_epoch=on_epoch,
                     checkpoint=os.fspath(checkpoint), checkpoint_every=args.checkpoint_every,
                     resume=args.resume)
    except CheckpointMismatch as e:
        print(f"smoothcert train: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    digest = save_bundle(out, spec, result.net, fmt="state_dict")
    table = result.sigma_table
    record = {
        "format": "smoothcert-train/1",
        "command": _command(args),
        "config": {**{k: v for k, v in sorted(vars(args).items())
                      if _plain(k, v, args.method) and k not in OPTION_FLAGS},
                   "options": options_dict, "device": str(device)},
        "seed": args.seed,
        "data": {"source": data.source, "split": "train", "data_seed": args.data_seed,
                 "images": len(y), "limit": args.limit, "input_shape": list(spec.input_shape),
                 "classes": list(data.classes)},
        "normalize": None if spec.normalize is None else
        {"mean": list(spec.normalize[0]), "std": list(spec.normalize[1]),
         "from": "auto" if args.normalize == ["auto"] else "--normalize" if args.normalize else "--init"},
        "transforms": TRANSFORMS, "noise": NOISE, "init": init,
        "resumed_from_epoch": result.resumed_from,
        "epochs": [vars(h) for h in result.history],
        "sigma_table": None if table is None else {
            "min": float(table.min()), "mean": float(table.mean()), "max": float(table.max()),
            "allowed": [options.sigma_min, options.sigma_max]},
        "bundle": {"digest": digest, "kind": spec.kind, "name": spec.name,
                   "sigma": {"default": spec.sigma.default, "min": spec.sigma.min, "max": spec.sigma.max}},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)},
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if not args.keep_checkpoint:
        checkpoint.unlink(missing_ok=True)
    last = result.history[-1] if result.history else None
    summary = "" if last is None else f"; last epoch loss {last.loss:.4f} acc {last.accuracy:.3f}"
    print(f"smoothcert train: wrote {out} ({spec.kind} bundle {digest}){summary}", file=sys.stderr)
    return 0


def _plain(key: str, value: Any, method: str = "selector") -> bool:
    return (key not in ("run", "command") and not callable(value)
            and (method == "selector" or key not in SELECTOR_FLAGS))


def _command(args: argparse.Namespace) -> str:
    """The command line that repeats this run: every option, defaults included."""
    words = ["smoothcert", "train"]
    for key, value in sorted(vars(args).items()):
        if not _plain(key, value, args.method) or value is None or value is False:
            continue
        words.append("--" + key.replace("_", "-"))
        if value is not True:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return shlex.join(words)
