"""scikit-learn's diabetes data set (442 patients, real, shipped inside scikit-learn): splits,
targets for both outputs, and the metric.

Split (seeded): 88 patients for evaluation, the other 354 for training; calibration takes 64 of
the training patients. A sample is ``(features float32 [10], (progression float32 [1], risk int64))``
where ``risk`` is 1 when the progression is above the training median.
"""

from __future__ import annotations

import numpy as np

__all__ = ["load", "make_datasets", "r2"]

N_EVAL = 88
N_CALIBRATION = 64


def load(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Training and evaluation features and progression, and the training median."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True, scaled=False)
    idx = np.random.default_rng(seed).permutation(len(x))
    te, tr = idx[:N_EVAL], idx[N_EVAL:]
    x, y = x.astype(np.float32), y.astype(np.float32)
    return x[tr], y[tr], x[te], y[te], float(np.median(y[tr]))


class Patients:
    """A torch-style dataset of ``(features, (progression, risk))``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, median: float) -> None:
        self.x, self.y, self.median = x, y, median

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        y = self.y[i]
        return self.x[i], (np.float32([y]), np.int64(y > self.median))


def make_datasets():  # type: ignore[no-untyped-def]
    """The recipe's data factory: (train, calibration, eval)."""
    xtr, ytr, xte, yte, median = load()
    train = Patients(xtr, ytr, median)
    calibration = Patients(xtr[:N_CALIBRATION], ytr[:N_CALIBRATION], median)
    return train, calibration, Patients(xte, yte, median)


def r2(outputs: dict[str, np.ndarray], targets: tuple[np.ndarray, np.ndarray]) -> float:
    """R² of the ``progression`` output (1 = perfect, 0 = no better than the mean)."""
    p = np.asarray(outputs["progression"], np.float64).reshape(-1)
    t = np.asarray(targets[0], np.float64).reshape(-1)
    return float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum())


def risk_accuracy(outputs: dict[str, np.ndarray], targets: tuple[np.ndarray, np.ndarray]) -> float:
    """How often ``risk`` puts a patient on the right side of the median."""
    return float((np.asarray(outputs["risk"]).argmax(1) == np.asarray(targets[1])).mean())
