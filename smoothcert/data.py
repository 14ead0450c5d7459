"""Small built-in data sets for the demo model, tests and examples.

`load_digits_split` is scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes, UCI
Optical Recognition of Handwritten Digits test set), so it needs no download and trains in
seconds on a CPU.
"""

from __future__ import annotations

import numpy as np


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
