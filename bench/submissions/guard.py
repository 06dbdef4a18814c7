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

* and, with a probability, optionally a voxel uncertainty of the same grid: ``"uncertainty": array`` (float,
  finite, ``>= 0`` and within its source's range, :data:`bench.uncertainty.MAP_RANGES`; or ``uint8`` levels
  over that range, :func:`bench.uncertainty.quantize_uncertainty`) and ``"uncertainty_source"``, one of
  :data:`bench.uncertainty.UNCERTAINTY_SOURCES` (default ``model-variance``: a variance of the lesion
  probability in [0, 0.25] the model computed itself). Network kinds with an ``uncertainty_channel``
  (exported MONAI folds with flip TTA) return their flip variance as ``tta-variance``.

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
OUTPUT_KEYS = ("mask", "probability", "uncertainty", "uncertainty_source")
_PROBABILITY_FIX = "return the lesion probability as a float array of the case's grid with values in [0, 1] (or leave it out)"
#: What a model-returned uncertainty is recorded as when the model does not name its source.
DEFAULT_UNCERTAINTY_SOURCE = "model-variance"
_UNCERTAINTY_FIX = ("return the voxel uncertainty as a float array of the case's grid, finite and within its source's range "
                    "([0, 0.25] for a variance, [0, 1] bits for entropy), with 'uncertainty_source' one of {sources} (or leave both out)")


@dataclass(frozen=True)
class Prediction:
    """One case's model output. After the guard: ``mask`` is ``bool`` and ``probability`` the ``uint8``
    levels ``round(255 p)`` on the same grid, or ``None`` when the model gives no probability.

    A model may return a ``Prediction`` itself (with a float probability); the guard validates it like
    a mapping.
    """

    mask: Any
    probability: Any = None
    #: A voxel uncertainty map on the same grid (after the guard: float32 in its source's range) or ``None``.
    uncertainty: Any = None
    #: Its source (:data:`bench.uncertainty.UNCERTAINTY_SOURCES`); ``None`` without an uncertainty.
    uncertainty_source: str | None = None

    @property
    def has_probability(self) -> bool:
        return self.probability is not None

    @property
    def voxel_uncertainty(self) -> Any:
        """The uncertainty as a :class:`bench.uncertainty.VoxelUncertainty` (what scoring takes), or ``None``."""
        if self.uncertainty is None:
            return None
        from bench.uncertainty import VoxelUncertainty

        return VoxelUncertainty(self.uncertainty, self.uncertainty_source or DEFAULT_UNCERTAINTY_SOURCE)


def _uncertainty_fix() -> str:
    from bench.uncertainty import LEGACY_SOURCES, UNCERTAINTY_SOURCES

    return _UNCERTAINTY_FIX.format(sources=", ".join(name for name in UNCERTAINTY_SOURCES if name not in LEGACY_SOURCES))


def split_prediction(result: Any, case_id: str, *, source: str = "the model") -> Prediction:
    """A raw model output (array, mapping or :class:`Prediction`) as an unchecked :class:`Prediction`; a
    mapping's keys are checked against :data:`OUTPUT_KEYS`."""
    if isinstance(result, Prediction):
        return result
    if isinstance(result, Mapping):
        unknown = sorted(str(key) for key in result if key not in OUTPUT_KEYS)
        if unknown or "mask" not in result:
            what = f"unknown key(s) {unknown}" if unknown else "no 'mask' key"
            raise InvalidPrediction(case_id, f"{source} returned a mapping with {what}",
                                    "return {'mask': mask, 'probability': probability} (probability optional; with it, optionally "
                                    "'uncertainty' and 'uncertainty_source'), or the mask alone")
        return Prediction(result["mask"], result.get("probability"), result.get("uncertainty"), result.get("uncertainty_source"))
    return Prediction(result)


def split_output(result: Any, case_id: str, *, source: str = "the model") -> tuple[Any, Any]:
    """``(mask, probability or None)`` of a raw model output (array, mapping or :class:`Prediction`), unchecked."""
    prediction = split_prediction(result, case_id, source=source)
    return prediction.mask, prediction.probability


def uncertainty_source_name(name: Any, case_id: str, *, source: str = "the model") -> str:
    """The recorded name of a model's ``uncertainty_source`` (``None``: :data:`DEFAULT_UNCERTAINTY_SOURCE`;
    the legacy ``single`` becomes ``entropy``); :class:`InvalidPrediction` for anything not in
    :data:`bench.uncertainty.UNCERTAINTY_SOURCES`."""
    from bench.uncertainty import UNCERTAINTY_SOURCES, recorded_source

    if name is None:
        return DEFAULT_UNCERTAINTY_SOURCE
    if not isinstance(name, str) or name not in UNCERTAINTY_SOURCES:
        shown = repr(name)[:40] if isinstance(name, str) else type(name).__name__
        raise InvalidPrediction(case_id, f"{source} returned an uncertainty_source {shown}, which is not a known source",
                                _uncertainty_fix())
    return recorded_source(name)


def uncertainty_values(array: Any, name: str, case_id: str, *, source: str = "the model") -> np.ndarray:
    """A voxel uncertainty of source ``name`` as float32 in ``[0, MAP_RANGES[kind]]`` (float, or ``uint8``
    levels over that range); :class:`InvalidPrediction` for a non-array, a non-float dtype, NaN, infinities,
    negative values or values above the range (1e-6 of slack, then clipped to the range). No shape check
    (:func:`validate_uncertainty` has it)."""
    from bench.uncertainty import MAP_RANGES, dequantize_uncertainty, source_kind

    fix = _uncertainty_fix()
    kind = source_kind(name)
    if not isinstance(array, np.ndarray):
        raise InvalidPrediction(case_id, f"{source} returned an uncertainty of type {type(array).__name__}, expected a numpy array", fix)
    if array.dtype == np.uint8:
        return dequantize_uncertainty(array, kind)
    if array.dtype.kind != "f":
        raise InvalidPrediction(case_id, f"{source} returned an uncertainty of dtype {array.dtype}, expected float (or uint8 levels)", fix)
    values = np.asarray(array, dtype=np.float32)
    top = MAP_RANGES[kind]
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise InvalidPrediction(case_id, f"{source} returned an invalid uncertainty map: {bad} NaN or infinite value(s)", fix)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < -1e-6 or high > top + 1e-6:
        raise InvalidPrediction(case_id, f"{source} returned an invalid uncertainty map: values in [{low:.6g}, {high:.6g}], "
                                         f"outside [0, {top:g}] of a {name} map", fix)
    return np.clip(values, 0.0, top)


def uncertainty_levels(array: Any, name: str, case_id: str, *, source: str = "the model") -> np.ndarray:
    """:func:`uncertainty_values` as ``uint8`` levels over the source's range (what the worker sends back)."""
    from bench.uncertainty import quantize_uncertainty, source_kind

    if isinstance(array, np.ndarray) and array.dtype == np.uint8:
        return array
    return quantize_uncertainty(uncertainty_values(array, name, case_id, source=source), source_kind(name))


def validate_uncertainty(array: Any, name: Any, expected_shape: tuple[int, ...], case_id: str, *,
                         source: str = "the model") -> tuple[np.ndarray, str]:
    """``(float32 map, recorded source)`` of a model's uncertainty on the case's grid (``expected_shape``)."""
    recorded = uncertainty_source_name(name, case_id, source=source)
    values = uncertainty_values(array, recorded, case_id, source=source)
    expected = tuple(int(s) for s in expected_shape)
    if tuple(values.shape) != expected:
        raise InvalidPrediction(case_id, f"{source} returned an uncertainty of shape {tuple(values.shape)}, the mask's grid is {expected}",
                                "return the uncertainty on the same grid as the mask, array order (z, y, x)")
    return values, recorded


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
    """The guard's check of one output: a bool mask and, if given, the probability levels on ``expected_shape``
    and the uncertainty (float32, with its recorded source) on the same grid."""
    raw = split_prediction(result, case_id, source=source)
    mask = validate_mask(raw.mask, expected_shape, case_id, source=source)
    if raw.probability is None:
        if raw.uncertainty is not None:
            raise InvalidPrediction(case_id, f"{source} returned an uncertainty without a probability map",
                                    "return the lesion probability with it: the uncertainty is scored with the probability's map")
        return Prediction(mask)
    probability = validate_probability(raw.probability, expected_shape, case_id, source=source)
    if raw.uncertainty is None:
        return Prediction(mask, probability)
    values, recorded = validate_uncertainty(raw.uncertainty, raw.uncertainty_source, expected_shape, case_id, source=source)
    return Prediction(mask, probability, values, recorded)


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
