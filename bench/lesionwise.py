"""Lesion-wise scoring: matching rules, per-lesion rows, panoptic quality and size bins.

HIE lesions are small and multifocal, so a voxel Dice says little about whether each lesion was
found. This module compares the 26-connected components of the reference (*lesions*) with those of
the prediction (*components*) through their overlap table, and decides which pairs *match* under one
of three rules (:data:`MATCH_RULES`):

``one_to_one`` (the default, :data:`DEFAULT_MATCH_RULE`)
    Each lesion and each component belongs to at most one pair. Among the pairs with IoU >=
    :data:`MIN_MATCH_IOU`, the Hungarian algorithm picks the assignment with the largest summed IoU
    (panoptica's ``MaxBipartiteMatching``, with its cost matrix). A prediction broken into pieces over
    one lesion scores one true positive and a false positive per extra piece; one component that
    merges two lesions detects only one of them.
``min_iou``
    Many-to-many: a lesion is detected by every component with IoU >= :data:`MIN_MATCH_IOU`, and a
    component is a true positive when it has such a lesion. A touch is not enough, but pieces are
    not penalised as long as each is large enough.
``any_overlap``
    Many-to-many, one shared voxel is enough (the rule of HIE-Bench before this module; a speckle
    touching a lesion detects it, a fragmented prediction is not penalised).

Why ``one_to_one`` at IoU >= 0.1 is the default: it is the only rule that penalises fragmentation
and merging, both of which change the lesion count a clinician would read off the mask; with it the
lesion F1 equals the recognition quality RQ of the panoptic quality, so ``lesion_f1`` and
``lesion_pq`` describe the same matching. The threshold is low because HIE lesions are tiny: a
one-voxel shift of a 2 x 2 x 1 voxel lesion leaves an IoU of 1/3, and panoptica's threshold of 0.5
would call many visibly found punctate lesions missed. At 0.1 a component still has to be no more
than ten times the lesion's size (or cover a tenth of it), so a blob swallowing a tiny lesion does
not count as finding it.

Panoptic quality (Kirillov et al. 2019, as panoptica computes it) uses the one-to-one matching:
``SQ`` = mean IoU of the matched pairs, ``RQ`` = TP / (TP + FP/2 + FN/2), ``PQ`` = SQ x RQ. When both
masks are empty, HIE-Bench scores 1 (panoptica returns NaN), as for every other metric of
:mod:`bench.metrics`.

Size bins (:data:`LESION_SIZE_BINS_ML`) report lesion recall and false-positive components per
reference-lesion volume; each bin is stated in ml and in voxels of the reference grid.

Everything is a pure function of arrays; :mod:`bench.metrics` builds the overlap table once per call
and pandas is imported only by the table functions.
"""

from __future__ import annotations

from bench.constants import DEFAULT_LESION_RULE

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_MATCH_RULE",
    "LESION_SIZE_BINS_ML",
    "MATCH_RULES",
    "MATCH_RULE_INFO",
    "MIN_MATCH_IOU",
    "REFERENCE_VOXEL_ML",
    "LesionMatches",
    "LesionOverlaps",
    "Matching",
    "MatchRuleInfo",
    "PanopticQuality",
    "PredictedComponent",
    "ReferenceLesion",
    "SizeBin",
    "lesion_detection_by_size",
    "lesion_rows",
    "lesion_size_bins",
    "match",
    "panoptic_quality",
]

MatchRule: TypeAlias = Literal["one_to_one", "min_iou", "any_overlap"]
OneToOneMethod: TypeAlias = Literal["hungarian", "greedy"]

#: Smallest IoU of a matching pair under the ``min_iou`` and ``one_to_one`` rules (see module docs).
MIN_MATCH_IOU = 0.1
#: The lesion matching rule used when none is named.
DEFAULT_MATCH_RULE: MatchRule = DEFAULT_LESION_RULE  # type: ignore[assignment]  (defined once, in bench.constants)
#: Rules understood by :func:`match`; the first is the default.
MATCH_RULES: tuple[MatchRule, ...] = ("one_to_one", "min_iou", "any_overlap")

#: Cost panoptica's MaxBipartiteMatching gives a pair below the threshold: 1 + 1e-6, slightly worse
#: than any valid pair (cost 1 - IoU <= 1), so that among assignments of equal summed IoU the one
#: with more matches wins. Copied so that the Hungarian step solves the same problem.
_INVALID_PAIR_COST = 1.0 + 1e-6


@dataclass(frozen=True)
class MatchRuleInfo:
    """Metadata of one matching rule.

    Attributes:
        name: Key in :data:`MATCH_RULES`.
        one_to_one: Whether a lesion or component can be in at most one matched pair.
        min_iou: Smallest IoU of a matched pair (0: one shared voxel is enough).
        description: One-sentence definition.
    """

    name: MatchRule
    one_to_one: bool
    min_iou: float
    description: str


MATCH_RULE_INFO: Mapping[str, MatchRuleInfo] = MappingProxyType(
    {
        "one_to_one": MatchRuleInfo(
            "one_to_one", True, MIN_MATCH_IOU,
            f"Hungarian assignment maximising the summed IoU over pairs with IoU >= {MIN_MATCH_IOU:g}; "
            "each lesion and component in at most one pair (panoptica MaxBipartiteMatching).",
        ),
        "min_iou": MatchRuleInfo(
            "min_iou", False, MIN_MATCH_IOU,
            f"Many-to-many: a lesion and a component match when their IoU is >= {MIN_MATCH_IOU:g}.",
        ),
        "any_overlap": MatchRuleInfo(
            "any_overlap", False, 0.0,
            "Many-to-many: a lesion and a component match when they share at least one voxel.",
        ),
    }
)


def check_rule(rule: str) -> MatchRule:
    """``rule`` if it is a known matching rule, else ``ValueError``."""
    if rule not in MATCH_RULE_INFO:
        raise ValueError(f"unknown lesion matching rule {rule!r}; choose one of {', '.join(MATCH_RULES)}")
    return rule  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# The overlap table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionOverlaps:
    """Sizes of the lesions and components, and the voxels each overlapping pair shares.

    Indices are 0-based (label - 1). Pairs are sorted by (lesion, component).

    Attributes:
        ref_voxels: ``(n_ref,)`` voxels per reference lesion.
        pred_voxels: ``(n_pred,)`` voxels per predicted component.
        pair_ref: ``(k,)`` lesion index of each overlapping pair.
        pair_pred: ``(k,)`` component index of each pair.
        pair_voxels: ``(k,)`` voxels the pair shares (>= 1).
    """

    ref_voxels: np.ndarray
    pred_voxels: np.ndarray
    pair_ref: np.ndarray
    pair_pred: np.ndarray
    pair_voxels: np.ndarray

    @classmethod
    def from_labels(
        cls, ref_labels: np.ndarray, pred_labels: np.ndarray, ref_voxels: np.ndarray, pred_voxels: np.ndarray
    ) -> LesionOverlaps:
        """From the (1-based) lesion and component labels of every voxel in both masks.

        Args:
            ref_labels, pred_labels: ``(m,)`` labels at the ``m`` voxels the masks share.
            ref_voxels, pred_voxels: voxels per lesion / component.
        """
        n_pred = len(pred_voxels)
        keys = ref_labels.astype(np.int64) * (n_pred + 1) + pred_labels.astype(np.int64)
        pairs, counts = np.unique(keys, return_counts=True)
        return cls(
            ref_voxels=np.asarray(ref_voxels, np.int64),
            pred_voxels=np.asarray(pred_voxels, np.int64),
            pair_ref=pairs // (n_pred + 1) - 1,
            pair_pred=pairs % (n_pred + 1) - 1,
            pair_voxels=counts.astype(np.int64),
        )

    @classmethod
    def of_label_images(cls, ref_labelled: np.ndarray, pred_labelled: np.ndarray) -> LesionOverlaps:
        """From two label images (0 background, 1..n instances, every label present)."""
        ref_labelled, pred_labelled = np.asarray(ref_labelled), np.asarray(pred_labelled)
        shared = (ref_labelled > 0) & (pred_labelled > 0)
        n_ref, n_pred = int(ref_labelled.max(initial=0)), int(pred_labelled.max(initial=0))
        return cls.from_labels(
            ref_labelled[shared],
            pred_labelled[shared],
            np.bincount(ref_labelled.ravel(), minlength=n_ref + 1)[1:],
            np.bincount(pred_labelled.ravel(), minlength=n_pred + 1)[1:],
        )

    @property
    def n_ref(self) -> int:
        return int(self.ref_voxels.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_voxels.size)

    @property
    def pair_iou(self) -> np.ndarray:
        """``(k,)`` IoU of each overlapping pair: shared / (|lesion| + |component| - shared)."""
        union = self.ref_voxels[self.pair_ref] + self.pred_voxels[self.pair_pred] - self.pair_voxels
        return self.pair_voxels / union


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Matching:
    """The matched pairs of one rule (0-based indices, sorted by lesion then component).

    Attributes:
        rule: The rule that matched them (or ``"one_to_one"`` for a standalone one-to-one matching).
        overlaps: The overlap table the pairs come from.
        pair_ref, pair_pred: Matched lesion and component indices.
        pair_iou: IoU of each matched pair.
    """

    rule: str
    overlaps: LesionOverlaps
    pair_ref: np.ndarray
    pair_pred: np.ndarray
    pair_iou: np.ndarray

    @property
    def ref_detected(self) -> np.ndarray:
        """``(n_ref,)`` whether each lesion is in a matched pair."""
        detected = np.zeros(self.overlaps.n_ref, bool)
        detected[self.pair_ref] = True
        return detected

    @property
    def pred_matched(self) -> np.ndarray:
        """``(n_pred,)`` whether each component is in a matched pair."""
        matched = np.zeros(self.overlaps.n_pred, bool)
        matched[self.pair_pred] = True
        return matched

    @property
    def counts(self) -> tuple[int, int, int]:
        """``(tp, fp, fn)``: detected lesions, unmatched components, missed lesions."""
        tp = int(np.count_nonzero(self.ref_detected))
        return tp, self.overlaps.n_pred - int(np.count_nonzero(self.pred_matched)), self.overlaps.n_ref - tp

    def best_iou(self, side: Literal["ref", "pred"]) -> np.ndarray:
        """Per lesion (``"ref"``) or component: the largest IoU among its matched pairs, 0 if none."""
        index, size = (self.pair_ref, self.overlaps.n_ref) if side == "ref" else (self.pair_pred, self.overlaps.n_pred)
        best = np.zeros(size, np.float64)
        np.maximum.at(best, index, self.pair_iou)
        return best

    def partners(self, side: Literal["ref", "pred"]) -> list[tuple[int, ...]]:
        """Per lesion (``"ref"``) or component: the 1-based labels of its matched partners."""
        own, other, size = (
            (self.pair_ref, self.pair_pred, self.overlaps.n_ref)
            if side == "ref"
            else (self.pair_pred, self.pair_ref, self.overlaps.n_pred)
        )
        result: list[list[int]] = [[] for _ in range(size)]
        for i, j in zip(own.tolist(), other.tolist()):
            result[i].append(j + 1)
        return [tuple(sorted(ids)) for ids in result]


def match(overlaps: LesionOverlaps, rule: MatchRule = DEFAULT_MATCH_RULE) -> Matching:
    """The pairs that match under ``rule`` (see the module docstring)."""
    info = MATCH_RULE_INFO[check_rule(rule)]
    if info.one_to_one:
        return one_to_one_matching(overlaps, info.min_iou, rule=info.name)
    iou = overlaps.pair_iou
    keep = iou >= info.min_iou  # every listed pair shares a voxel, so min_iou 0 keeps them all
    return Matching(info.name, overlaps, overlaps.pair_ref[keep], overlaps.pair_pred[keep], iou[keep])


def one_to_one_matching(
    overlaps: LesionOverlaps, min_iou: float = MIN_MATCH_IOU, *, method: OneToOneMethod = "hungarian", rule: str = "one_to_one"
) -> Matching:
    """One-to-one matching of the pairs with IoU >= ``min_iou``.

    ``hungarian`` (the ``one_to_one`` rule): the assignment with the largest summed IoU, solved as
    panoptica's ``MaxBipartiteMatching`` does (same costs), but only over the lesions and components
    that have a candidate pair; a lesion or component without one can only stay unmatched, so the
    optimum is the same. ``greedy``: pairs by decreasing IoU, each taken when both sides are still
    free (panoptica's ``NaiveThresholdMatching``); at ``min_iou`` >= 0.5 both give the same pairs,
    because a lesion can then have only one candidate.
    """
    iou = overlaps.pair_iou
    candidates = np.flatnonzero(iou >= min_iou)
    ref, pred = overlaps.pair_ref[candidates], overlaps.pair_pred[candidates]
    if candidates.size and (np.unique(ref).size < ref.size or np.unique(pred).size < pred.size):
        if method == "greedy":
            chosen = _greedy(ref, pred, iou[candidates])
        elif method == "hungarian":
            chosen = _hungarian(ref, pred, iou[candidates])
        else:
            raise ValueError(f"unknown one-to-one method {method!r}; choose hungarian or greedy")
        candidates = candidates[chosen]
    # else: no lesion or component has two candidates, every candidate is matched
    order = np.lexsort((overlaps.pair_pred[candidates], overlaps.pair_ref[candidates]))
    candidates = candidates[order]
    return Matching(rule, overlaps, overlaps.pair_ref[candidates], overlaps.pair_pred[candidates], iou[candidates])


def _hungarian(ref: np.ndarray, pred: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices (into the candidate arrays) of the maximum-summed-IoU one-to-one assignment."""
    from scipy.optimize import linear_sum_assignment  # only for cases with competing candidates

    rows, row_of = np.unique(ref, return_inverse=True)
    cols, col_of = np.unique(pred, return_inverse=True)
    cost = np.full((rows.size, cols.size), _INVALID_PAIR_COST)
    cost[row_of, col_of] = 1.0 - iou
    candidate_at = np.full((rows.size, cols.size), -1, np.int64)
    candidate_at[row_of, col_of] = np.arange(iou.size)
    assigned_rows, assigned_cols = linear_sum_assignment(cost)
    chosen = candidate_at[assigned_rows, assigned_cols]
    return np.sort(chosen[chosen >= 0])


def _greedy(ref: np.ndarray, pred: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Indices of the greedy one-to-one matching: by decreasing IoU, ties in (lesion, component) order."""
    used_ref: set[int] = set()
    used_pred: set[int] = set()
    chosen = []
    for index in np.argsort(-iou, kind="stable").tolist():
        r, p = int(ref[index]), int(pred[index])
        if r not in used_ref and p not in used_pred:
            used_ref.add(r)
            used_pred.add(p)
            chosen.append(index)
    return np.sort(np.asarray(chosen, np.int64))


# ---------------------------------------------------------------------------
# Panoptic quality
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PanopticQuality:
    """Panoptic quality of a one-to-one matching (Kirillov et al. 2019; panoptica's ``pq``).

    Attributes:
        pq: SQ x RQ = sum of matched IoUs / (TP + FP/2 + FN/2).
        sq: Segmentation quality, mean IoU of the matched pairs (0 without a match).
        rq: Recognition quality, TP / (TP + FP/2 + FN/2), the F1 score of the matching.
        tp, fp, fn: Matched pairs, unmatched components, unmatched lesions.
        min_iou: IoU threshold of the matching.
    """

    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    min_iou: float

    @classmethod
    def of(cls, matching: Matching, min_iou: float) -> PanopticQuality:
        overlaps = matching.overlaps
        tp = int(matching.pair_ref.size)
        fp, fn = overlaps.n_pred - tp, overlaps.n_ref - tp
        if overlaps.n_ref + overlaps.n_pred == 0:
            # Nothing to find and nothing found: a perfect score, as everywhere in bench.metrics
            # (panoptica returns NaN here, which a mean would silently drop).
            return cls(1.0, 1.0, 1.0, 0, 0, 0, min_iou)
        if tp == 0:
            return cls(0.0, 0.0, 0.0, 0, fp, fn, min_iou)
        sq = float(np.sum(matching.pair_iou) / tp)
        rq = tp / (tp + 0.5 * fp + 0.5 * fn)
        return cls(sq * rq, sq, rq, tp, fp, fn, min_iou)

    def as_metrics(self) -> dict[str, float]:
        """The ``lesion_pq``, ``lesion_sq`` and ``lesion_rq`` keys of :func:`bench.metrics.compute_metrics`."""
        return {"lesion_pq": self.pq, "lesion_sq": self.sq, "lesion_rq": self.rq}


def panoptic_quality(
    overlaps: LesionOverlaps, min_iou: float = MIN_MATCH_IOU, *, method: OneToOneMethod = "hungarian"
) -> PanopticQuality:
    """PQ, SQ and RQ of the one-to-one matching at ``min_iou``.

    ``min_iou=0.5`` gives the PQ of Kirillov et al. and panoptica's default evaluator (there, greedy
    and Hungarian matching coincide); the default, :data:`MIN_MATCH_IOU`, is the threshold of the
    ``one_to_one`` rule, so that RQ equals the lesion F1 of that rule.
    """
    return PanopticQuality.of(one_to_one_matching(overlaps, min_iou, method=method), min_iou)


# ---------------------------------------------------------------------------
# Per-lesion rows
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceLesion:
    """One reference lesion (26-connected component of the reference mask).

    Attributes:
        lesion_id: 1-based label, numbered in raster order (first voxel in C order).
        voxels: Number of voxels.
        volume_ml: Volume in ml.
        centroid: Mean voxel index (array-axis order) in the full image.
        detected: Whether a predicted component matches it under ``match_rule``.
        match_rule: The rule that decided ``detected`` (see :data:`MATCH_RULES`).
        matched_iou: IoU with the matched component (the largest one under a many-to-many rule);
            0 when missed.
        matched_ids: ``component_id`` of every component matched to it.
    """

    lesion_id: int
    voxels: int
    volume_ml: float
    centroid: tuple[float, float, float]
    detected: bool
    match_rule: str = "any_overlap"
    matched_iou: float = 0.0
    matched_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PredictedComponent:
    """One 26-connected component of the predicted mask.

    Attributes:
        component_id: 1-based label, numbered in raster order.
        voxels: Number of voxels.
        volume_ml: Volume in ml.
        centroid: Mean voxel index (array-axis order) in the full image.
        false_positive: ``True`` when it matches no reference lesion under ``match_rule``.
        match_rule: The rule that decided ``false_positive``.
        matched_iou: IoU with the matched lesion (the largest under a many-to-many rule); 0 if none.
        matched_ids: ``lesion_id`` of every lesion matched to it.
    """

    component_id: int
    voxels: int
    volume_ml: float
    centroid: tuple[float, float, float]
    false_positive: bool
    match_rule: str = "any_overlap"
    matched_iou: float = 0.0
    matched_ids: tuple[int, ...] = ()


def _lesion_f1(tp: int, fp: int, fn: int) -> float:
    """2 TP / (2 TP + FP + FN); 1 when there is nothing to find and nothing was found."""
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


@dataclass(frozen=True)
class LesionMatches:
    """Lesion-wise comparison of a prediction with the reference under one matching rule.

    A reference lesion is detected, and a predicted component is a true positive, when it is in a
    pair that ``rule`` matches (see :data:`MATCH_RULES`).

    Attributes:
        reference: One row per reference lesion.
        predicted: One row per predicted component.
        rule: The matching rule of the rows.
    """

    reference: tuple[ReferenceLesion, ...]
    predicted: tuple[PredictedComponent, ...]
    rule: str = "any_overlap"

    @property
    def tp(self) -> int:
        """Number of detected reference lesions."""
        return sum(lesion.detected for lesion in self.reference)

    @property
    def fn(self) -> int:
        """Number of missed reference lesions."""
        return len(self.reference) - self.tp

    @property
    def fp(self) -> int:
        """Number of false-positive predicted components."""
        return sum(component.false_positive for component in self.predicted)

    @property
    def f1(self) -> float:
        """Lesion-wise F1, 2 TP / (2 TP + FP + FN); 1 when both masks are empty."""
        return _lesion_f1(self.tp, self.fp, self.fn)


# ---------------------------------------------------------------------------
# Size bins
# ---------------------------------------------------------------------------

#: Edges (ml) of the reference-lesion volume bins, half-open [low, high). Decades, because HIE lesion
#: volumes span four of them: punctate white-matter foci of 1-3 mm (< 0.01 ml, a handful of voxels),
#: small focal lesions such as a PLIC or a single cortical focus (0.01-0.1 ml), focal lesions of a
#: few mm to 1 cm (0.1-1 ml), basal-ganglia/thalamus and watershed injury (1-10 ml) and extensive
#: injury (>= 10 ml). Detection is hardest, and most variable between models, in the two smallest bins.
LESION_SIZE_BINS_ML: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0, 10.0, math.inf)
#: Voxel volume (ml) used to state the bins in voxels: 0.9 x 0.9 x 2.0 mm, the neonatal diffusion grid
#: of bench.metrics.NEONATAL_FOV_DIAGONAL_MM (0.01 ml = 6.2 voxels, 0.1 ml = 62, 1 ml = 617, 10 ml = 6173).
REFERENCE_VOXEL_ML = 0.9 * 0.9 * 2.0 / 1000.0


@dataclass(frozen=True)
class SizeBin:
    """One lesion-volume bin, [low, high), in ml and in voxels of a given voxel volume."""

    label: str
    low_ml: float
    high_ml: float
    low_voxels: float
    high_voxels: float


def lesion_size_bins(bins_ml: Sequence[float] = LESION_SIZE_BINS_ML, voxel_ml: float = REFERENCE_VOXEL_ML) -> tuple[SizeBin, ...]:
    """The bins of ``bins_ml`` with their bounds in ml and in voxels of ``voxel_ml``.

    Labels read ``"< 0.01 ml (< 6.17 vx)"``, ``"0.01-0.1 ml (6.17-61.7 vx)"``, ``">= 10 ml (>= 6173 vx)"``.
    """
    edges = [float(edge) for edge in bins_ml]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"bins_ml must be at least two increasing non-negative edges, got {bins_ml!r}")
    if not (voxel_ml > 0 and math.isfinite(voxel_ml)):
        raise ValueError(f"voxel_ml must be a positive number, got {voxel_ml!r}")
    result = []
    for low, high in zip(edges, edges[1:]):
        low_vx, high_vx = low / voxel_ml, high / voxel_ml
        if low == 0:
            label = f"< {high:g} ml (< {_voxels(high_vx)} vx)"
        elif math.isinf(high):
            label = f">= {low:g} ml (>= {_voxels(low_vx)} vx)"
        else:
            label = f"{low:g}-{high:g} ml ({_voxels(low_vx)}-{_voxels(high_vx)} vx)"
        result.append(SizeBin(label, low, high, low_vx, high_vx))
    return tuple(result)


def _voxels(count: float) -> str:
    """Three significant digits, whole numbers from 1000 on: 6.17, 61.7, 617, 6173."""
    return f"{count:.0f}" if count >= 1000 else f"{count:.3g}"


def lesion_rows(matches: LesionMatches | Iterable[LesionMatches], **columns: object) -> pd.DataFrame:
    """Per-lesion rows as a DataFrame in the layout of ``Store.lesion_frame``.

    Columns: ``kind`` (``"ref"`` / ``"pred"``), ``lesion_id``, ``detected`` (components: matched a
    lesion), ``voxels``, ``volume_ml``, ``match_rule``, ``matched_iou``, plus ``columns`` given as
    keyword arguments (e.g. ``submission="a"``), repeated on every row.
    """
    import pandas as pd

    many = [matches] if isinstance(matches, LesionMatches) else list(matches)
    records = []
    for item in many:
        records += [
            {"kind": "ref", "lesion_id": r.lesion_id, "detected": r.detected, "voxels": r.voxels, "volume_ml": r.volume_ml,
             "match_rule": r.match_rule, "matched_iou": r.matched_iou}
            for r in item.reference
        ]
        records += [
            {"kind": "pred", "lesion_id": c.component_id, "detected": not c.false_positive, "voxels": c.voxels,
             "volume_ml": c.volume_ml, "match_rule": c.match_rule, "matched_iou": c.matched_iou}
            for c in item.predicted
        ]
    names = ["kind", "lesion_id", "detected", "voxels", "volume_ml", "match_rule", "matched_iou"]
    frame = pd.DataFrame.from_records(records, columns=names)
    return frame.assign(**columns) if columns else frame


def lesion_detection_by_size(
    lesions: pd.DataFrame,
    *,
    bins_ml: Sequence[float] = LESION_SIZE_BINS_ML,
    voxel_ml: float = REFERENCE_VOXEL_ML,
    by: Sequence[str] = ("submission",),
) -> pd.DataFrame:
    """Lesion recall and false-positive components per lesion-volume bin.

    Args:
        lesions: Per-lesion rows (:meth:`bench.store.Store.lesion_frame` or :func:`lesion_rows`):
            ``kind``, ``detected``, ``volume_ml``, optionally ``voxels`` and the ``by`` columns.
            Reference lesions are binned by their volume, false-positive components by their own.
        bins_ml: Bin edges in ml, half-open [low, high) (the convention of panoptica's
            ``recall_by_volume``).
        voxel_ml: Voxel volume that states the bins in voxels (``low_voxels``, ``high_voxels``).
        by: Grouping columns that exist in ``lesions`` (missing ones are ignored).

    Returns:
        One row per group and bin, every bin present: the ``by`` columns, ``size_bin`` (label),
        ``low_ml``, ``high_ml``, ``low_voxels``, ``high_voxels``, ``n_lesions``, ``n_detected``,
        ``n_missed``, ``recall`` (NaN for a bin without lesions), ``n_false_positive``, and
        ``min_voxels`` / ``max_voxels`` of the reference lesions seen in the bin (the bin in voxels
        of the data, whatever its grid; NaN when empty).
    """
    import pandas as pd

    bins = lesion_size_bins(bins_ml, voxel_ml)
    keys = [column for column in by if column in lesions.columns]
    columns = [*keys, "size_bin", "low_ml", "high_ml", "low_voxels", "high_voxels", "n_lesions", "n_detected",
               "n_missed", "recall", "n_false_positive", "min_voxels", "max_voxels"]
    edges = np.asarray([b.low_ml for b in bins] + [bins[-1].high_ml])
    volume = lesions["volume_ml"].to_numpy(dtype=float, na_value=np.nan)
    position = np.searchsorted(edges, volume, side="right") - 1  # [low, high): a volume on an edge goes up
    is_ref = (lesions["kind"] == "ref").to_numpy()
    detected = lesions["detected"].astype(bool).to_numpy()
    voxels = lesions["voxels"].to_numpy(dtype=float, na_value=np.nan) if "voxels" in lesions.columns else np.full(volume.size, np.nan)
    table = pd.DataFrame(
        {
            **{key: lesions[key].to_numpy() for key in keys},
            "bin": position,
            "ref": is_ref.astype(int),
            "hit": (is_ref & detected).astype(int),
            "fp": (~is_ref & ~detected).astype(int),
            "ref_voxels": np.where(is_ref, voxels, np.nan),
        }
    )
    table = table[(table["bin"] >= 0) & (table["bin"] < len(bins))]  # NaN volumes fall outside
    sums = table.groupby([*keys, "bin"]).agg(
        n_lesions=("ref", "sum"), n_detected=("hit", "sum"), n_false_positive=("fp", "sum"),
        min_voxels=("ref_voxels", "min"), max_voxels=("ref_voxels", "max"),
    )
    # Every group gets every bin, empty ones included, so tables line up across submissions.
    groups = sorted(set(map(tuple, lesions[keys].drop_duplicates().to_numpy().tolist()))) if keys else [()]
    rows = []
    for group in groups:
        for index, size_bin in enumerate(bins):
            key = (*group, index) if keys else index
            found = sums.loc[key] if key in sums.index else None
            n_lesions = int(found["n_lesions"]) if found is not None else 0
            n_detected = int(found["n_detected"]) if found is not None else 0
            rows.append(
                {
                    **dict(zip(keys, group)),
                    "size_bin": size_bin.label,
                    "low_ml": size_bin.low_ml,
                    "high_ml": size_bin.high_ml,
                    "low_voxels": size_bin.low_voxels,
                    "high_voxels": size_bin.high_voxels,
                    "n_lesions": n_lesions,
                    "n_detected": n_detected,
                    "n_missed": n_lesions - n_detected,
                    "recall": n_detected / n_lesions if n_lesions else math.nan,
                    "n_false_positive": int(found["n_false_positive"]) if found is not None else 0,
                    "min_voxels": float(found["min_voxels"]) if n_lesions else math.nan,
                    "max_voxels": float(found["max_voxels"]) if n_lesions else math.nan,
                }
            )
    return pd.DataFrame(rows, columns=columns)
