"""The one digits loader of the reproductions: scikit-learn's 8x8 digits, fixed splits.

``digits(seed)`` returns stratified train / validation / test splits that depend
only on ``seed`` (and the split fractions): the same seed gives the same rows on
every machine and in every experiment, so per-seed results of two methods are
paired. Pixels are scaled to ``[0, 1]`` (float32), labels are int32.
Hyperparameters are chosen on ``val``; ``test`` is read once, at the chosen values.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from subjax._core.checks import static_int, unit_interval


@dataclasses.dataclass(frozen=True)
class Split:
    x: np.ndarray  # (n, 64) float32 in [0, 1]
    y: np.ndarray  # (n,) int32 in 0..9

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def classes(self, labels) -> Split:
        """The rows whose label is in ``labels``."""
        keep = np.isin(self.y, np.asarray(labels))
        return Split(self.x[keep], self.y[keep])

    @property
    def images(self) -> np.ndarray:
        """``x`` as ``(n, 8, 8)`` images."""
        return self.x.reshape(-1, 8, 8)


@dataclasses.dataclass(frozen=True)
class Digits:
    train: Split
    val: Split
    test: Split


@functools.lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    x.setflags(write=False)
    y = d.target.astype(np.int32)
    y.setflags(write=False)
    return x, y


def digits(seed: int = 0, *, val: float = 0.2, test: float = 0.3) -> Digits:
    """Stratified splits of the 1797 digits: ``test`` of all rows, then ``val`` of the rest."""
    from sklearn.model_selection import train_test_split

    seed = static_int(seed, "seed", minimum=0)
    unit_interval(val, "val")
    unit_interval(test, "test")
    x, y = _raw()
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test, random_state=seed, stratify=y)
    xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=val, random_state=seed,
                                          stratify=ytr)
    return Digits(Split(xtr, ytr), Split(xva, yva), Split(xte, yte))
