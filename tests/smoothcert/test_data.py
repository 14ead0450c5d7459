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


def test_load_data_sources(tmp_path):
    from smoothcert.data import load_data
    from smoothcert.imageio import encode_png

    digits = load_data("sklearn-digits", "train")
    assert digits.x.shape[1:] == (1, 8, 8) and len(digits) == len(digits.y) and digits.classes[9] == "9"

    x = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "split.npz", x_train=x[:4], y_train=np.arange(4), x_test=x[4:], y_test=np.array([0, 3]))
    test = load_data(tmp_path / "split.npz", "test")
    assert test.x.shape == (2, 3, 4, 4) and test.x.dtype == np.float32 and test.y.tolist() == [0, 3]
    np.testing.assert_allclose(test.x, x[4:] / 255.0, rtol=1e-6)
    np.savez(tmp_path / "flat.npz", x=np.full((3, 4, 4), 0.5, np.float32), y=np.array([1, 0, 1]))
    flat = load_data(tmp_path / "flat.npz", "train")
    assert flat.x.shape == (3, 1, 4, 4) and flat.classes == ("0", "1")

    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / "tree" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.png").write_bytes(encode_png(np.full((1, 4, 4), i / 4, np.float32)))
    tree = load_data(tmp_path / "tree", "test")
    assert tree.x.shape == (4, 1, 4, 4) and tree.classes == ("cat", "dog") and tree.y.tolist() == [0, 0, 1, 1]


def test_mnist_5k_is_a_seeded_stratified_split_of_real_28x28_digits():
    from smoothcert.data import load_data, load_mnist_split

    train, test = load_data("mnist-5k", "train"), load_data("mnist-5k", "test")
    assert (len(train), len(test)) == (4000, 1000) and train.x.shape[1:] == (1, 28, 28)
    assert train.x.dtype == np.float32 and train.x.min() >= 0.0 and train.x.max() == 1.0
    assert np.bincount(train.y).tolist() == [400] * 10 and np.bincount(test.y).tolist() == [100] * 10
    # 8-bit pixels, each image with ink: not noise, not a blank filler
    assert np.array_equal(np.round(test.x * 255), test.x * np.float32(255))
    assert (test.x.reshape(1000, -1).max(axis=1) > 0.5).all()
    again, other = load_mnist_split(0), load_mnist_split(1)
    assert np.array_equal(again[2], test.x) and np.array_equal(again[3], test.y)
    assert not np.array_equal(other[3], test.y)
    # disjoint: no test image is a train image
    seen = {row.tobytes() for row in train.x}
    assert not any(row.tobytes() in seen for row in test.x)


def test_load_data_refusals(tmp_path):
    from smoothcert.data import load_data
    from smoothcert.imageio import ImageError

    with pytest.raises(ValueError, match="split"):
        load_data("sklearn-digits", "validation")
    with pytest.raises(ValueError, match="neither"):
        load_data(tmp_path / "missing")
    np.savez(tmp_path / "bad.npz", x=np.full((2, 1, 4, 4), 2.0, np.float32), y=np.array([0, 1]))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_data(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="needs arrays x and y"):
        load_data(tmp_path / "nolabels.npz")
