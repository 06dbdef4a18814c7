"""Typed per-case results: what scoring one case produced, from :func:`bench.harness.score_case` to the store.

A :class:`CaseResult` is one row of the ``case_results`` table plus its :class:`LesionRow` rows, built in
one place (:meth:`CaseResult.scored` or :meth:`CaseResult.failed`) and consumed by
:meth:`bench.store.Store.record_case_result`. The app and the report read the same fields back from the
store. Lesion rows have one shape for reference lesions and predicted components alike.

Probability-derived values (issue 14). When the model returned a lesion probability map, the result also
carries where its ``uint8`` levels are stored (``probability_path``), the per-case values of
:data:`PROBABILITY_METRICS` (Brier score, ECE, the AUROC of voxel entropy for misclassified voxels),
the domain they were computed over, the source of the uncertainty (``uncertainty_source``, one of
:data:`bench.uncertainty.UNCERTAINTY_SOURCES`: ``"tta-variance"`` when the prediction carried its flip-TTA
variance, ``"entropy"`` for the predictive entropy of the probability map otherwise; rows stored before
sources were named by their map say ``"single"``, the same as ``"entropy"``), the case's
:class:`bench.calibration.ProbabilityHistogram` as a mapping (so reliability diagrams pool exactly), and
the mean uncertainty of that source's map over every predicted component (:attr:`LesionRow.uncertainty`).
Without a probability map every one of them is ``None``: "not available", never a stand-in number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

from bench.calibration import CALIBRATION_METRICS, MetricDefinition
from bench.constants import CASE_FAILED, CASE_OK
from bench.uncertainty import UNCERTAINTY_METRICS

LesionKind = Literal["ref", "pred"]

#: Per-case values computed from the stored probability map, one nullable column each, with the metadata
#: (direction, range, domain, pooling) the leaderboard reads. They are extra columns, never the ranking metric.
PROBABILITY_METRICS: Mapping[str, MetricDefinition] = MappingProxyType(
    {"brier": CALIBRATION_METRICS["brier"], "ece": CALIBRATION_METRICS["ece"],
     "uncertainty_error_auroc": UNCERTAINTY_METRICS["uncertainty_error_auroc"]}
)
#: Fields of a case result that exist only with a probability map (``None`` otherwise).
PROBABILITY_FIELDS: tuple[str, ...] = (
    "probability_path", *PROBABILITY_METRICS, "calibration_domain", "uncertainty_source", "calibration_histogram",
)


@dataclass(frozen=True)
class LesionRow:
    """One reference lesion (``kind="ref"``) or predicted component (``kind="pred"``) of a case.

    ``detected``: for a reference lesion, whether the prediction found it; for a predicted component,
    whether it matches a reference lesion (``False``: a false positive). ``centroid`` is the mean voxel
    index in array order (z, y, x).
    """

    kind: LesionKind
    lesion_id: int
    detected: bool
    voxels: int | None = None
    volume_ml: float | None = None
    centroid: tuple[float, float, float] | None = None
    #: The rule that decided ``detected`` (:data:`bench.lesionwise.MATCH_RULES`), the IoU with the
    #: matched lesion (the largest under a many-to-many rule) and the ids it was matched to.
    match_rule: str | None = None
    matched_iou: float | None = None
    matched_ids: tuple[int, ...] = ()
    #: Predicted components only: mean voxel uncertainty over the component, of the map its case's
    #: ``uncertainty_source`` names (bits for ``entropy``, p^2 in [0, 0.25] for the variance sources);
    #: ``None`` without a probability map and for reference lesions.
    uncertainty: float | None = None

    @classmethod
    def from_matches(cls, matches: Any) -> tuple["LesionRow", ...]:
        """Rows of a :class:`bench.metrics.LesionMatches` (reference lesions first, then components)."""
        rows = [cls("ref", r.lesion_id, bool(r.detected), r.voxels, r.volume_ml, tuple(r.centroid), *_match(r)) for r in matches.reference]
        rows += [cls("pred", c.component_id, not c.false_positive, c.voxels, c.volume_ml, tuple(c.centroid), *_match(c))
                 for c in matches.predicted]
        return tuple(rows)


def _match(lesion: Any) -> tuple[str | None, float | None, tuple[int, ...]]:
    return getattr(lesion, "match_rule", None), getattr(lesion, "matched_iou", None), tuple(getattr(lesion, "matched_ids", ()))


@dataclass(frozen=True)
class CaseResult:
    """The outcome of predicting and scoring one case of one run.

    ``metrics`` holds the keys of :data:`bench.metrics.METRICS` that were computed (infinite distances are
    kept; the store and the statistics apply the documented caps). ``prediction_path`` is absolute, so any
    process started from any folder finds the mask; ``probability_path`` likewise for the probability
    levels. The probability fields (:data:`PROBABILITY_FIELDS`) are ``None`` when the model gave no
    probability. ``extra`` carries values that have no column.
    """

    run_id: str
    case_id: str
    site: str = ""
    fold: str = ""
    status: str = CASE_OK
    error: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    lesions: tuple[LesionRow, ...] = ()
    prediction_path: str | None = None
    predict_s: float | None = None
    score_s: float | None = None
    empty: str | None = None
    probability_path: str | None = None
    brier: float | None = None
    ece: float | None = None
    uncertainty_error_auroc: float | None = None
    calibration_domain: str | None = None
    uncertainty_source: str | None = None
    calibration_histogram: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == CASE_OK

    @classmethod
    def failed(cls, run_id: str, case_id: str, error: str, *, site: str = "", fold: str = "", **fields: Any) -> "CaseResult":
        """A failed case: no metrics, the reason in ``error`` (scored as each metric's worst value)."""
        return cls(run_id=run_id, case_id=case_id, site=site, fold=fold, status=CASE_FAILED, error=error, **fields)

    def with_run(self, run_id: str, fold: str) -> "CaseResult":
        return replace(self, run_id=run_id, fold=fold)

    def with_probability(self, probability_path: str, scores: "ProbabilityScores") -> "CaseResult":
        """This result with its probability map's path and scores; predicted lesion rows get their uncertainty."""
        lesions = tuple(replace(row, uncertainty=scores.lesion_uncertainty.get(row.lesion_id)) if row.kind == "pred" else row
                        for row in self.lesions)
        return replace(self, lesions=lesions, probability_path=probability_path, brier=scores.brier, ece=scores.ece,
                       uncertainty_error_auroc=scores.uncertainty_error_auroc, calibration_domain=scores.calibration_domain,
                       uncertainty_source=scores.uncertainty_source, calibration_histogram=scores.histogram)

    def to_row(self) -> dict[str, Any]:
        """The flat mapping of the ``case_results`` columns (metrics inlined, NaN kept for the store to null)."""
        row: dict[str, Any] = {
            "run_id": self.run_id, "case_id": self.case_id, "site": self.site, "fold": self.fold,
            "status": self.status, "error": self.error, "prediction_path": self.prediction_path,
            "predict_s": self.predict_s, "score_s": self.score_s, "empty": self.empty,
            **{name: getattr(self, name) for name in PROBABILITY_FIELDS},
        }
        return row | dict(self.metrics) | dict(self.extra)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], lesions: tuple[LesionRow, ...] = ()) -> "CaseResult":
        """Back from a flat mapping (a stored row or a legacy harness dict); unknown keys go to ``extra``."""
        from bench.metrics import METRICS

        known = {"run_id", "case_id", "site", "fold", "status", "error", "prediction_path", "predict_s", "score_s", "empty", *PROBABILITY_FIELDS}
        metrics = {k: _float(v) for k, v in row.items() if k in METRICS}
        extra = {k: v for k, v in row.items() if k not in known and k not in METRICS}
        base = {k: row[k] for k in known if k in row and row[k] is not None}
        base.setdefault("run_id", "")
        base.setdefault("case_id", "")
        return cls(**base, metrics=metrics, lesions=lesions, extra=extra)


@dataclass(frozen=True)
class ProbabilityScores:
    """What one case's probability map adds to its result (see the module docstring).

    Computed from the ``uint8`` levels, exactly what is stored, so recomputing from the file gives the same
    numbers. ``lesion_uncertainty`` maps a predicted component's ``lesion_id`` to its mean uncertainty
    (of the ``uncertainty_source`` map).
    """

    brier: float | None
    ece: float | None
    uncertainty_error_auroc: float | None
    calibration_domain: str
    uncertainty_source: str
    histogram: Mapping[str, Any]
    lesion_uncertainty: Mapping[int, float]

    @classmethod
    def of(cls, levels: Any, mask: Any, reference: Any, *, adc: Any = None, lesions: tuple[LesionRow, ...] = (),
           uncertainty: Any = None) -> "ProbabilityScores":
        """Scores of one case: ``levels`` (uint8, or float in [0, 1]) and the model's ``mask`` against
        ``reference``, over the brain (``adc > 0``, ``adc`` being the skull-stripped channel 0; the whole
        volume without it). ``lesions`` are the case's rows; the false-positive flags of its predicted
        components are taken from them. ``uncertainty`` is the prediction's own voxel map
        (:class:`bench.uncertainty.VoxelUncertainty`, e.g. the flip-TTA variance); without one the
        uncertainty is the predictive entropy of ``levels``. The voxel AUROC and the lesion uncertainty
        come from that one map, and ``uncertainty_source`` names it (:func:`bench.uncertainty.case_uncertainty`)."""
        from bench.calibration import calibration_domain, probability_histogram, quantize
        from bench.uncertainty import case_uncertainty

        levels = quantize(levels)
        histogram = probability_histogram(levels, reference, adc=adc)
        domain, _ = calibration_domain(levels.shape, adc=adc)
        predicted = sorted((row for row in lesions if row.kind == "pred"), key=lambda row: row.lesion_id)
        scored = case_uncertainty(levels, mask, reference, domain, false_positive=[not row.detected for row in predicted],
                                  uncertainty=uncertainty)
        if [c.voxels for c in scored.lesions] != [row.voxels for row in predicted]:
            raise RuntimeError("predicted components are numbered differently from the lesion rows")
        return cls(brier=histogram.brier, ece=histogram.ece, uncertainty_error_auroc=scored.error_auroc,
                   calibration_domain=histogram.domain, uncertainty_source=scored.source, histogram=histogram.to_dict(),
                   lesion_uncertainty={row.lesion_id: c.mean_uncertainty for row, c in zip(predicted, scored.lesions)})


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def probability_path_for(prediction_path: str | Path) -> Path:
    """Where the probability levels of the mask at ``prediction_path`` are stored: the harness keeps masks
    in ``<run>/predictions/`` and probabilities in ``<run>/probabilities/`` under the same name; a mask
    anywhere else gets ``<case>.probability.nii.gz`` beside it."""
    path = Path(prediction_path)
    if path.parent.name == "predictions":
        return path.parent.with_name("probabilities") / path.name
    name = path.name.removesuffix(".nii.gz").removesuffix(".nii")
    return path.with_name(f"{name}.probability.nii.gz")
