"""The one check that an array is a binary lesion mask on a given grid: :func:`check_mask`.

Every stage that receives a mask from outside (a submission's prediction, a predicted mask file in
``bench evaluate``, a reference label) passes it through :func:`check_mask`, which returns it as
``bool`` or raises :class:`MaskError` with a message and a fix. The submission guard turns that error
into an :class:`~bench.submissions.core.InvalidPrediction`; ``bench evaluate`` into a failed row.
:mod:`bench.metrics` keeps only the minimal checks its pure functions need.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class MaskError(ValueError):
    """An array is not a binary mask of the expected shape; ``fix`` says what to do."""

    def __init__(self, message: str, fix: str):
        self.message = message
        self.fix = fix
        super().__init__(f"{message} (fix: {fix})")


def check_mask(array: Any, expected_shape: tuple[int, ...], *, source: str = "the model") -> np.ndarray:
    """``array`` as a ``bool`` mask of ``expected_shape``; :class:`MaskError` otherwise.

    Accepts bool, integer or float arrays whose values are exactly 0 and 1 (NaN, Inf and soft values
    such as 0.5 are refused: a probability map is not a mask).
    """
    if not isinstance(array, np.ndarray):
        raise MaskError(f"{source} returned {type(array).__name__}, expected a numpy array",
                        "return a numpy array (e.g. mask.astype(bool)), not a list or tensor")
    expected = tuple(int(s) for s in expected_shape)
    if tuple(array.shape) != expected:
        raise MaskError(f"{source} has shape {tuple(array.shape)}, expected {expected}", _shape_fix(tuple(array.shape), expected))
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MaskError(f"{source} has dtype {array.dtype}, expected bool or 0/1 numbers", "return mask.astype(bool)")
    if array.dtype.kind == "f":
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        if n_bad:
            raise MaskError(f"{source} has {n_bad} NaN or infinite value(s)", "write a mask of 0 and 1 only")
    ones = array == 1
    if not np.all(ones | (array == 0)):
        values = np.unique(array[~ones & (array != 0)])
        shown = ", ".join(f"{v:g}" for v in values[:5].tolist()) + (" ..." if values.size > 5 else "")
        raise MaskError(f"{source} has values other than 0 and 1: {shown}",
                        "threshold probabilities (e.g. prob > 0.5) and map every lesion label to 1")
    return ones


def _shape_fix(shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    if shape == expected[::-1]:
        return "the axes look reversed (x, y, z): use SimpleITK's array order (z, y, x), e.g. array.transpose(2, 1, 0)"
    if len(shape) == len(expected) + 1 and shape[1:] == expected:
        return "drop the leading channel/batch axis (return mask[0] or the lesion channel only)"
    return "return one value per voxel of the case's grid, array order (z, y, x)"
