"""The guard every prediction passes: blind the case, run the model, check the mask and the probability.

:func:`guarded_predict` is the one place these rules live. :class:`~bench.submissions.predictors.SubmissionPredictor`
(every submission kind, run in a sandboxed worker process with a time limit) and :class:`FittedPredictor`
(a trained fold that has no exported form, run in this process) both call it, so a fitted trainable is
blinded and validated exactly like an uploaded model.

The output contract (docs/submissions.md, "Probabilities"). A model returns either

* a mask: a numpy array of the case's grid, boolean or exactly 0/1; or
* a mask *and* a lesion probability map: a mapping ``{"mask": array, "probability": array}`` or a
  :class:`Prediction`. The probability is a float array of the same grid with every value finite and in
  [0, 1] (1e-6 of slack for float rounding), or ``uint8`` levels ``round(255 p)``, the form the benchmark
  stores (:func:`bench.calibration.quantize`). ``"probability": None`` means "none".

The guard returns a :class:`Prediction` whose ``probability`` is always the ``uint8`` levels (or ``None``):
every calibration number is defined on those levels, so the value scored and the file stored agree.
A probability that is NaN, out of range, of the wrong shape or type is refused with
:class:`~bench.submissions.core.InvalidPrediction`, never clipped or dropped silently. The mask is never
derived from the probability here: the model's own threshold decides it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from bench.submissions.core import InvalidPrediction, PredictionCrash, PredictionError, validate_mask

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case

#: Keys a model's output mapping may have; anything else is a typo the model should hear about.
OUTPUT_KEYS = ("mask", "probability")
_PROBABILITY_FIX = "return the lesion probability as a float array of the case's grid with values in [0, 1] (or leave it out)"


@dataclass(frozen=True)
class Prediction:
    """One case's model output. After the guard: ``mask`` is ``bool`` and ``probability`` the ``uint8``
    levels ``round(255 p)`` on the same grid, or ``None`` when the model gives no probability.

    A model may return a ``Prediction`` itself (with a float probability); the guard validates it like
    a mapping.
    """

    mask: Any
    probability: Any = None

    @property
    def has_probability(self) -> bool:
        return self.probability is not None


def split_output(result: Any, case_id: str, *, source: str = "the model") -> tuple[Any, Any]:
    """``(mask, probability or None)`` of a raw model output (array, mapping or :class:`Prediction`), unchecked."""
    if isinstance(result, Prediction):
        return result.mask, result.probability
    if isinstance(result, Mapping):
        unknown = sorted(str(key) for key in result if key not in OUTPUT_KEYS)
        if unknown or "mask" not in result:
            what = f"unknown key(s) {unknown}" if unknown else "no 'mask' key"
            raise InvalidPrediction(case_id, f"{source} returned a mapping with {what}",
                                    "return {'mask': mask, 'probability': probability} (probability optional), or the mask alone")
        return result["mask"], result.get("probability")
    return result, None


def probability_levels(array: Any, case_id: str, *, source: str = "the model") -> np.ndarray:
    """A probability map as ``uint8`` levels (float in [0, 1], or levels already); :class:`InvalidPrediction` otherwise.

    No shape check (the worker, which calls this before saving, does not know the case's grid; the
    guard checks it with :func:`validate_probability`).
    """
    from bench.calibration import quantize

    if not isinstance(array, np.ndarray):
        raise InvalidPrediction(case_id, f"{source} returned a probability of type {type(array).__name__}, expected a numpy array",
                                "convert tensors with .cpu().numpy(); " + _PROBABILITY_FIX)
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise InvalidPrediction(case_id, f"{source} returned a probability of dtype {array.dtype}, expected float (or uint8 levels)",
                                _PROBABILITY_FIX)
    try:
        return quantize(array)
    except ValueError as exc:  # NaN, infinities, values outside [0, 1]
        raise InvalidPrediction(case_id, f"{source} returned an invalid probability map: {exc}", _PROBABILITY_FIX) from None


def validate_probability(array: Any, expected_shape: tuple[int, ...], case_id: str, *, source: str = "the model") -> np.ndarray:
    """:func:`probability_levels` of a map that must lie on the case's grid (``expected_shape``)."""
    levels = probability_levels(array, case_id, source=source)
    expected = tuple(int(s) for s in expected_shape)
    if tuple(levels.shape) != expected:
        raise InvalidPrediction(case_id, f"{source} returned a probability of shape {tuple(levels.shape)}, the mask's grid is {expected}",
                                "return the probability on the same grid as the mask, array order (z, y, x)")
    return levels


def validate_output(result: Any, expected_shape: tuple[int, ...], case_id: str, *, source: str = "the model") -> Prediction:
    """The guard's check of one output: a bool mask and, if given, the probability levels on ``expected_shape``."""
    mask, probability = split_output(result, case_id, source=source)
    mask = validate_mask(mask, expected_shape, case_id, source=source)
    if probability is None:
        return Prediction(mask)
    return Prediction(mask, validate_probability(probability, expected_shape, case_id, source=source))


def blind_case(case: "Case") -> "Case":
    """The case as a model may see it: no reference label, no metadata table (it holds lesion volumes)."""
    return dataclasses.replace(case, label_path=None, metadata={})


def guarded_predict(predict: Callable[["Case"], Any], case: "Case") -> Prediction:
    """``predict`` on the blinded case, its output checked to lie on the case's native grid (see the module docstring).

    Errors of the model become :class:`PredictionCrash`; a wrong output :class:`InvalidPrediction`.
    """
    expected_shape = case.geometry.shape
    try:
        result = predict(blind_case(case))
    except PredictionError:
        raise
    except Exception as exc:
        from bench.submissions.predictors import describe_exception

        raise PredictionCrash(case.case_id, describe_exception(exc), "run the model on this case locally and fix the error shown") from exc
    return validate_output(result, expected_shape, case.case_id)


def model_output(model: Any, case: "Case") -> Any:
    """A loaded model's raw output for ``case``: mask and probability from one forward pass when the model
    offers ``predict_with_probability`` (network kinds, nnU-Net, exported folds), else ``predict``."""
    both = getattr(model, "predict_with_probability", None)
    return both(case) if callable(both) else model.predict(case)


class FittedPredictor:
    """A fitted trainable's in-process predictor behind the guard (for trainers with no exported form)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def predict_with_probability(self, case: "Case") -> Prediction:
        return guarded_predict(lambda blinded: model_output(self.inner, blinded), case)

    def predict(self, case: "Case") -> np.ndarray:
        return self.predict_with_probability(case).mask

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()
