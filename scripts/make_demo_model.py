"""Train the bundled demo model `models/digits` and write the example images `examples/`.

    .venv/bin/python scripts/make_demo_model.py            # from the repository root

Trains `digits_cnn` on the train split of scikit-learn's 8×8 digits with Gaussian noise
augmentation at σ = 0.25, saves it as a state-dict bundle, writes one test-split image per
class as `examples/digit-<class>.png`, and prints what the model achieves: clean and noisy
accuracy of the base network on the test split, and the certified accuracy of the smoothed
classifier on the first test images (Cohen's CERTIFY, seeded; certified accuracies and radii
printed rounded down, never up: smoothcert.rounding.floor_text). Everything is seeded; on the
CPU with the same torch thread count a rerun writes the same weights. The numbers of the
committed run are in `models/digits/README.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from smoothcert.architectures import build_architecture
from smoothcert.bundle import ModelSpec, load_bundle, save_bundle
from smoothcert.certifier import Certifier
from smoothcert.data import load_digits_split
from smoothcert.imageio import decode_image, encode_png
from smoothcert.rounding import floor_text
from smoothcert.training import accuracy, train_gaussian

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "name": "digits", "kind": "standard", "input_shape": [1, 8, 8], "num_classes": 10,
    "labels": [str(i) for i in range(10)],
    "sigma": {"default": 0.25, "min": 0.12, "max": 1.0},
    "normalize": {"mean": [0.5], "std": [0.5]}, "architecture": "digits_cnn",
}
RADII = (0.0, 0.25, 0.5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "models" / "digits")
    p.add_argument("--examples", type=Path, default=ROOT / "examples")
    p.add_argument("--sigma", type=float, default=0.25, help="training noise level")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--certify-count", type=int, default=50, help="first test images certified")
    p.add_argument("--n", type=int, default=1000, help="Monte Carlo samples per certificate")
    p.add_argument("--alpha", type=float, default=0.001)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed=args.seed)
    spec = ModelSpec.from_json(SPEC)
    print(f"data: {len(x_train)} train / {len(x_test)} test images; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    torch.manual_seed(args.seed)  # the initial weights
    net = build_architecture(spec.architecture, spec.input_shape, spec.num_classes)

    def progress(epoch: int, epochs: int, loss: float) -> None:
        if epoch % 20 == 0 or epoch == epochs:
            print(f"  epoch {epoch}/{epochs} loss {loss:.4f}", file=sys.stderr, flush=True)

    t = time.perf_counter()
    train_gaussian(net, x_train, y_train, sigma=args.sigma, epochs=args.epochs, lr=args.lr,
                   seed=args.seed, normalize=spec.normalize, progress=progress)
    train_s = time.perf_counter() - t
    digest = save_bundle(args.out, spec, net, fmt="state_dict")
    sizes = {f: os.path.getsize(args.out / f) for f in ("model.json", "weights.pt")}
    print(f"trained {args.epochs} epochs (sigma={args.sigma}, lr={args.lr}, seed={args.seed}) "
          f"in {train_s:.1f} s")
    print(f"bundle: {os.path.relpath(args.out)} {digest}; bytes {sizes}")

    clean = accuracy(net, x_test, y_test, normalize=spec.normalize)
    noisy = accuracy(net, x_test, y_test, sigma=spec.sigma.default, normalize=spec.normalize,
                     seed=args.seed)
    print(f"base network, test split ({len(x_test)}): clean accuracy {clean:.4f}, "
          f"accuracy under one N(0, {spec.sigma.default}^2) draw {noisy:.4f}")

    # The smoothed classifier, through the bundle as it was saved and will be served.
    certifier = Certifier(load_bundle(args.out), device="cpu")
    t = time.perf_counter()
    count = min(args.certify_count, len(x_test))
    certs = [certifier.certify(x_test[i], sigma=spec.sigma.default, n0=100, n=args.n,
                               alpha=args.alpha, seed=i) for i in range(count)]
    certify_s = time.perf_counter() - t
    correct = np.array([c.prediction == int(y) for c, y in zip(certs, y_test[:count], strict=True)])
    radius = np.array([c.radius for c in certs])
    abstained = sum(c.prediction is None for c in certs)
    print(f"smoothed classifier, first {count} test images (sigma={spec.sigma.default}, "
          f"n0=100, n={args.n}, alpha={args.alpha}, seed=index), {certify_s:.1f} s; "
          f"{abstained} abstained")
    for r in RADII:
        print(f"  certified accuracy at radius {r}: {floor_text(float(np.mean(correct & (radius >= r))), 2)}")

    # One test image per class (the first of each), through an 8-bit PNG (values quantised).
    args.examples.mkdir(parents=True, exist_ok=True)
    notes = []
    for c in range(spec.num_classes):
        i = int(np.flatnonzero(y_test == c)[0])
        path = args.examples / f"digit-{c}.png"
        path.write_bytes(encode_png(x_test[i]))
        cert = certifier.certify(decode_image(path.read_bytes(), channels=1), n=500, seed=0)
        notes.append(f"{c}->{'abstain' if cert.prediction is None else cert.prediction}"
                     f"@{floor_text(cert.radius, 2)}")
    print(f"examples: {os.path.relpath(args.examples)}/digit-0..9.png (test indices of the first of each "
          f"class); certified at n=500, seed 0: {' '.join(notes)}")
    print(f"wall time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
