"""Typed per-case results: what scoring one case produced, from :func:`bench.harness.score_case` to the store.

A :class:`CaseResult` is one row of the ``case_results`` table plus its :class:`LesionRow` rows, built in
one place (:meth:`CaseResult.scored` or :meth:`CaseResult.failed`) and consumed by
:meth:`bench.store.Store.record_case_result`. The app and the report read the same fields back from the
store. Lesion rows have one shape for reference lesions and predicted components alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

from bench.constants import CASE_FAILED, CASE_OK

LesionKind = Literal["ref", "pred"]


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
    process started from any folder finds the mask. ``extra`` carries values that have no column.
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

    def to_row(self) -> dict[str, Any]:
        """The flat mapping of the ``case_results`` columns (metrics inlined, NaN kept for the store to null)."""
        row: dict[str, Any] = {
            "run_id": self.run_id, "case_id": self.case_id, "site": self.site, "fold": self.fold,
            "status": self.status, "error": self.error, "prediction_path": self.prediction_path,
            "predict_s": self.predict_s, "score_s": self.score_s, "empty": self.empty,
        }
        return row | dict(self.metrics) | dict(self.extra)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], lesions: tuple[LesionRow, ...] = ()) -> "CaseResult":
        """Back from a flat mapping (a stored row or a legacy harness dict); unknown keys go to ``extra``."""
        from bench.metrics import METRICS

        known = {"run_id", "case_id", "site", "fold", "status", "error", "prediction_path", "predict_s", "score_s", "empty"}
        metrics = {k: _float(v) for k, v in row.items() if k in METRICS}
        extra = {k: v for k, v in row.items() if k not in known and k not in METRICS}
        base = {k: row[k] for k in known if k in row and row[k] is not None}
        base.setdefault("run_id", "")
        base.setdefault("case_id", "")
        return cls(**base, metrics=metrics, lesions=lesions, extra=extra)


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
