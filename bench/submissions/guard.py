"""The guard every prediction passes: blind the case, run the model, check the mask.

:func:`guarded_predict` is the one place these rules live. :class:`~bench.submissions.predictors.SubmissionPredictor`
(every submission kind, run in a sandboxed worker process with a time limit) and :class:`FittedPredictor`
(a trained fold that has no exported form, run in this process) both call it, so a fitted trainable is
blinded and validated exactly like an uploaded model.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from bench.submissions.core import PredictionCrash, PredictionError, validate_mask

if TYPE_CHECKING:  # pragma: no cover
    from bench.data.dataset import Case


def blind_case(case: "Case") -> "Case":
    """The case as a model may see it: no reference label, no metadata table (it holds lesion volumes)."""
    return dataclasses.replace(case, label_path=None, metadata={})


def guarded_predict(predict: Callable[["Case"], Any], case: "Case") -> np.ndarray:
    """``predict`` on the blinded case, its result checked to be a binary mask on the case's native grid.

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
    return validate_mask(result, expected_shape, case.case_id)


class FittedPredictor:
    """A fitted trainable's in-process predictor behind the guard (for trainers with no exported form)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def predict(self, case: "Case") -> np.ndarray:
        return guarded_predict(self.inner.predict, case)

    def close(self) -> None:
        getattr(self.inner, "close", lambda: None)()
