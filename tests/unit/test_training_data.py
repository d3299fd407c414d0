"""The dataset splits are fixed by their seed: training, tests and benchmarks agree on them."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from training.data import Splits, breast_cancer_splits, digits_splits

LOADERS = {"digits": digits_splits, "breast_cancer": breast_cancer_splits}
FULL = {"digits": load_digits, "breast_cancer": load_breast_cancer}
SHAPES = {"digits": (1, 8, 8), "breast_cancer": (30,)}


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def _arrays(s: Splits) -> list[np.ndarray]:
    return [s.x_train, s.y_train, s.x_val, s.y_val, s.x_test, s.y_test]


@pytest.mark.parametrize("name", LOADERS)
def test_same_seed_gives_identical_splits(name: str) -> None:
    for a, b in zip(_arrays(LOADERS[name](0)), _arrays(LOADERS[name](0))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", LOADERS)
def test_other_seed_gives_other_test_split(name: str) -> None:
    assert not np.array_equal(LOADERS[name](0).x_test, LOADERS[name](1).x_test)


@pytest.mark.parametrize("name", LOADERS)
def test_splits_are_disjoint_typed_and_stratified(name: str) -> None:
    s = LOADERS[name](0)
    parts = [s.x_train, s.x_val, s.x_test]
    for x in parts:
        assert x.dtype == np.float32 and x.shape[1:] == SHAPES[name]
    for y in (s.y_train, s.y_val, s.y_test):
        assert y.dtype == np.int64
    # Together the splits are exactly the dataset: nothing lost, nothing duplicated.
    rows = np.concatenate([x.reshape(len(x), -1) for x in parts])
    full = FULL[name]().data.astype(np.float32)
    assert rows.shape == full.shape
    np.testing.assert_array_equal(_sorted_rows(rows), _sorted_rows(full))
    assert abs(len(s.x_test) / len(full) - 0.2) < 0.01
    # Every class appears in every split, in similar proportions.
    train_freq = np.bincount(s.y_train) / len(s.y_train)
    test_freq = np.bincount(s.y_test) / len(s.y_test)
    assert len(train_freq) == len(test_freq) == s.num_classes
    assert np.abs(train_freq - test_freq).max() < 0.05
