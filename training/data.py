"""Fixed, seeded train/val/test splits of the real datasets shipped inside scikit-learn.

Nothing is downloaded: `load_digits` and `load_breast_cancer` read files bundled with the
package. Splits are stratified and depend only on `seed`, so the training script, the tests and
the benchmarks all see the same held-out test rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1  # of the whole dataset


@dataclass(frozen=True)
class Splits:
    """Features are float32 in the layout the served model takes; labels are int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(max(self.y_train.max(), self.y_val.max(), self.y_test.max())) + 1


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> Splits:
    from sklearn.model_selection import train_test_split  # imported on use: it takes a second

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest,
        y_rest,
        test_size=VAL_FRACTION / (1.0 - TEST_FRACTION),
        random_state=seed,
        stratify=y_rest,
    )
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


def digits_splits(seed: int = 0) -> Splits:
    """Handwritten digits (1,797 images), x shaped [N, 1, 8, 8], raw pixel values 0..16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.images.reshape(-1, 1, 8, 8), data.target, seed)


def breast_cancer_splits(seed: int = 0) -> Splits:
    """Wisconsin breast cancer (569 rows), x shaped [N, 30], raw (unscaled) feature values."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return _split(data.data, data.target, seed)
