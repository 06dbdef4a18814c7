"""The two protocols that connect submissions, models and the harness.

Every submission kind yields a :class:`Predictor`; a ``trainable`` submission yields a
:class:`Trainable` that the harness fits once per fold. Keeping the protocols in this small module lets
:mod:`bench.submissions`, :mod:`bench.models` and :mod:`bench.harness` depend on it without depending
on each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from bench.data.dataset import Case


@runtime_checkable
class Predictor(Protocol):
    """Predicts a lesion mask for one case, in the case's native voxel grid."""

    def predict(self, case: "Case") -> np.ndarray:
        """Return a boolean array with the shape of ``case.geometry.shape`` (array-axis order)."""
        ...


@runtime_checkable
class Trainable(Protocol):
    """Trains a predictor on some cases; the harness calls it once per cross-validation fold."""

    def fit(self, train_cases: Sequence["Case"], val_cases: Sequence["Case"], run_dir: Path) -> Predictor:
        """Train on ``train_cases`` (``val_cases`` for early stopping / model selection) writing into ``run_dir``.

        Must be resumable: if ``run_dir`` holds a finished model, load it instead of training again; if
        it holds a checkpoint, continue from it.
        """
        ...
