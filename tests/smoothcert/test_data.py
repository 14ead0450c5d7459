"""The digits split: deterministic, the documented shapes and range, a stratified partition."""

from __future__ import annotations

import numpy as np
import pytest

from smoothcert.data import load_digits_split

N_DIGITS = 1797  # scikit-learn's digits data set


def test_split_is_deterministic_and_depends_on_the_seed():
    first, again = load_digits_split(seed=0), load_digits_split(seed=0)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = load_digits_split(seed=1)
    assert not np.array_equal(first[3], other[3])


def test_shapes_types_and_range():
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1347, 1, 8, 8) and x_test.shape == (450, 1, 8, 8)
    assert y_train.shape == (1347,) and y_test.shape == (450,)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    for x in (x_train, x_test):
        assert x.min() == 0.0 and x.max() == 1.0  # 0..16 divided by 16
        np.testing.assert_array_equal(x * 16, np.round(x * 16))
    assert set(np.unique(y_train)) == set(np.unique(y_test)) == set(range(10))


def test_train_and_test_partition_the_data_set():
    from sklearn.datasets import load_digits

    x_train, y_train, x_test, y_test = load_digits_split()
    assert len(x_train) + len(x_test) == N_DIGITS

    def rows(x, y):  # each image (raw 0..16 intensities) with its label, as a sortable row
        return np.concatenate([x.reshape(len(x), -1), y[:, None]], axis=1)

    split = rows(np.concatenate([x_train, x_test]) * 16, np.concatenate([y_train, y_test]))
    digits = load_digits()
    full = rows(digits.images, digits.target)
    # Same multiset of (image, label) rows: every image is in exactly one of the two parts.
    np.testing.assert_array_equal(np.unique(split, axis=0, return_counts=True)[1],
                                  np.unique(full, axis=0, return_counts=True)[1])
    np.testing.assert_array_equal(np.unique(split, axis=0), np.unique(full, axis=0))


def test_split_is_stratified():
    _, y_train, _, y_test = load_digits_split(test_fraction=0.25)
    for c in range(10):
        total = np.sum(y_train == c) + np.sum(y_test == c)
        assert abs(np.sum(y_test == c) - 0.25 * total) <= 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=fraction)
