"""Calibration of lesion probability maps: Brier score, ECE and reliability diagrams.

Contract
--------
* Input: a lesion probability map ``p`` (float in [0, 1], or the stored ``uint8`` form, see below),
  the reference mask ``y`` on the same grid, and optionally a brain mask (or the ADC, from which the
  brain is ``ADC > 0``, as in the skull-stripped BONBID-HIE ``1ADC_ss`` maps).
* Everything is computed from the **quantized** probabilities ``q = round(255 p)`` (``uint8``), which
  is the form the harness stores. A float map is quantized first, so a metric computed during scoring
  and one recomputed later from the stored file are identical, bit for bit.
* The sufficient statistic of a case is a :class:`ProbabilityHistogram`: for each of the 256 levels,
  how many domain voxels have it and how many of those are lesion. Brier, ECE and the reliability
  diagram are exact functions of it, and histograms **add**: the diagram of a submission or of a site
  is the diagram of the summed histograms (every voxel counted once), not a mean of per-case means.
* Domain: the brain mask. Outside the head every model predicts ``p = 0`` for ``y = 0``; those
  voxels are perfectly (and trivially) calibrated, are 80-95 % of a neonatal DWI volume, and would
  push every model's ECE and Brier towards 0. Without a brain mask the domain falls back to
  ``ADC > 0``, then to the whole volume; the domain used is recorded in the histogram and results.
* Binning (ECE, diagram): 15 equal-width bins of the *lesion* probability over [0, 1], the number of
  bins Guo et al. (2017, "On calibration of modern neural networks") used. 15 also divides 255, so
  every bin holds exactly 17 quantization levels (the last one 18, with ``q = 255``): bins never split
  a level and no float rounding decides a bin. We bin the lesion probability (the binary "positive
  class" diagram) rather than Guo's top-label confidence, because "when the model says 30 %, is it
  lesion 30 % of the time?" is the statement a reader of a probability map needs.
* A missing probability map gives ``None`` for every value ("not available"), never a made-up number.

Quantization error: ``|q / 255 - p| <= 0.5 / 255`` (:data:`QUANTIZATION_ERROR_BOUND`, about 0.002) for
every ``p`` in [0, 1]; the Brier score of the quantized map differs from the float one by at most
``1 / 255`` (``|(p' - y)^2 - (p - y)^2| = |p' - p| |p' + p - 2y| <= 2 * 0.5 / 255``). ECE has no such
bound (a voxel near a bin edge may change bin), which is why it is *defined* on the quantized map.
Note that ``q / 255 > 0.5`` is not ``p > 0.5`` for ``p`` in [127.5/255, 0.5]: never re-threshold a
stored probability to get the mask; the mask is stored on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

import numpy as np

from bench.metrics import MetricInfo

__all__ = [
    "CALIBRATION_METRICS",
    "ECE_BINS",
    "LEVELS",
    "QUANTIZATION_ERROR_BOUND",
    "MetricDefinition",
    "ProbabilityHistogram",
    "ReliabilityDiagram",
    "calibration_domain",
    "calibration_metrics",
    "dequantize",
    "pool_histograms",
    "probability_histogram",
    "quantize",
]

Domain = Literal["brain_mask", "adc_positive", "whole_volume"]

#: Largest stored level: probabilities are stored as ``round(p * 255)`` in a ``uint8``.
LEVELS = 255
#: Largest absolute error of :func:`quantize` followed by :func:`dequantize`, for ``p`` in [0, 1].
QUANTIZATION_ERROR_BOUND = 0.5 / LEVELS
#: Number of equal-width bins of the lesion probability for ECE and the reliability diagram.
ECE_BINS = 15
#: Tolerance on the range check of float probabilities (float32 softmax may overshoot 1 by an ulp).
_RANGE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MetricDefinition:
    """A :class:`~bench.metrics.MetricInfo` plus what it is computed over and what it needs.

    ``computed_over``: the voxels or lesions of one case that enter the value. ``pooling``: how the
    per-submission / per-site figure is formed from cases. ``requires``: the inputs without which the
    value is ``None`` ("not available").
    """

    info: MetricInfo
    computed_over: str
    pooling: str
    requires: str


_BRAIN = "brain-mask voxels of one case (fallback ADC > 0, then the whole volume; the domain is recorded)"

#: Metadata of the calibration values returned by :func:`calibration_metrics`.
CALIBRATION_METRICS: Mapping[str, MetricDefinition] = MappingProxyType(
    {
        "brier": MetricDefinition(
            MetricInfo("brier", "Brier score", "", False, (0.0, 1.0),
                       "Mean squared difference (p - y)^2 between lesion probability and reference, p quantized to 1/255."),
            computed_over=_BRAIN,
            pooling="per-case values averaged like the other metrics; pooled diagrams sum the histograms",
            requires="a lesion probability map",
        ),
        "ece": MetricDefinition(
            MetricInfo("ece", "Expected calibration error", "", False, (0.0, 1.0),
                       "Sum over 15 equal-width bins of the lesion probability of (n_b / N) |mean p_b - lesion fraction_b|."),
            computed_over=_BRAIN,
            pooling="per-case values averaged; the pooled ECE of a submission or site comes from the summed histograms",
            requires="a lesion probability map",
        ),
    }
)


# ---------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------


def quantize(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as ``uint8`` levels ``round(255 p)`` (a ``uint8`` input is returned as is).

    Raises ``ValueError`` for NaN / infinite values or values outside [0, 1] (beyond 1e-6): a
    probability map is validated like a mask, not silently clipped.
    """
    array = np.asarray(probability)
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_ or array.dtype.kind not in "fiu":
        raise ValueError(f"probabilities must be a float array in [0, 1] (or uint8 levels), got dtype {array.dtype}")
    values = array.astype(np.float64, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise ValueError(f"probability map has {bad} NaN or infinite value(s)")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"probabilities must lie in [0, 1], found values in [{low:g}, {high:g}]")
    return np.rint(np.clip(values, 0.0, 1.0) * LEVELS).astype(np.uint8)


def dequantize(levels: np.ndarray) -> np.ndarray:
    """``uint8`` levels back to float32 probabilities ``q / 255`` (error at most 0.5 / 255)."""
    levels = np.asarray(levels)
    if levels.dtype != np.uint8:
        raise ValueError(f"quantized probabilities must be uint8, got {levels.dtype}")
    return levels.astype(np.float32) / np.float32(LEVELS)


# ---------------------------------------------------------------------------
# Domain
# ---------------------------------------------------------------------------


def calibration_domain(
    shape: Sequence[int], *, brain_mask: np.ndarray | None = None, adc: np.ndarray | None = None
) -> tuple[np.ndarray, Domain]:
    """The voxels calibration is computed over, and the name of that domain.

    ``brain_mask`` if given, else ``adc > 0`` if the ADC is given and has any positive voxel, else every
    voxel (``"whole_volume"``, recorded so a reader knows the value is flattered by the background).
    """
    shape = tuple(int(s) for s in shape)
    if brain_mask is not None:
        mask = np.asarray(brain_mask).astype(bool, copy=False)
        _same_shape(mask, shape, "brain_mask")
        return mask, "brain_mask"
    if adc is not None:
        positive = np.asarray(adc) > 0
        _same_shape(positive, shape, "adc")
        if positive.any():
            return positive, "adc_positive"
    return np.ones(shape, bool), "whole_volume"


def _same_shape(array: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(array.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {shape}")


# ---------------------------------------------------------------------------
# The sufficient statistic
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbabilityHistogram:
    """Per quantization level (0..255): domain voxels (``total``) and lesion voxels among them (``positive``).

    Integer counts, so adding histograms of cases is exact. ``domain`` is the domain of the cases
    (``"mixed"`` after pooling cases with different domains).
    """

    total: np.ndarray
    positive: np.ndarray
    domain: str = "brain_mask"

    def __post_init__(self) -> None:
        for name in ("total", "positive"):
            values = np.asarray(getattr(self, name), dtype=np.int64)
            if values.shape != (LEVELS + 1,):
                raise ValueError(f"{name} must have {LEVELS + 1} counts, got shape {values.shape}")
            object.__setattr__(self, name, values)
        if np.any(self.positive > self.total) or np.any(self.positive < 0):
            raise ValueError("positive counts must lie between 0 and the total count of each level")

    @property
    def n_voxels(self) -> int:
        return int(self.total.sum())

    def __add__(self, other: "ProbabilityHistogram") -> "ProbabilityHistogram":
        domain = self.domain if self.domain == other.domain else "mixed"
        return ProbabilityHistogram(self.total + other.total, self.positive + other.positive, domain)

    @property
    def brier(self) -> float | None:
        """Mean (p - y)^2 over the domain, exact from the counts; ``None`` for an empty domain."""
        n = self.n_voxels
        if n == 0:
            return None
        p = np.arange(LEVELS + 1, dtype=np.float64) / LEVELS
        # sum over voxels of p^2 - 2 p y + y, grouped by level
        total = float(np.dot(self.total, p * p) - 2.0 * np.dot(self.positive, p) + self.positive.sum())
        return max(total / n, 0.0)

    @property
    def ece(self) -> float | None:
        """Expected calibration error over :data:`ECE_BINS` bins; ``None`` for an empty domain."""
        return self.reliability().ece

    def reliability(self, n_bins: int = ECE_BINS) -> "ReliabilityDiagram":
        """Per-bin counts, mean probability and lesion fraction (bins group whole levels)."""
        return ReliabilityDiagram.from_histogram(self, n_bins)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (for a store column or a sidecar file); :meth:`from_dict` reads it back."""
        return {"domain": self.domain, "total": self.total.tolist(), "positive": self.positive.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> "ProbabilityHistogram":
        return cls(np.asarray(data["total"]), np.asarray(data["positive"]), str(data.get("domain", "brain_mask")))


def probability_histogram(
    probability: np.ndarray,
    reference: np.ndarray,
    *,
    brain_mask: np.ndarray | None = None,
    adc: np.ndarray | None = None,
) -> ProbabilityHistogram:
    """The :class:`ProbabilityHistogram` of one case (``probability`` float in [0, 1] or ``uint8`` levels)."""
    levels = quantize(probability)
    ref = np.asarray(reference).astype(bool, copy=False)
    _same_shape(ref, tuple(levels.shape), "reference")
    domain, name = calibration_domain(levels.shape, brain_mask=brain_mask, adc=adc)
    inside = levels[domain]
    total = np.bincount(inside.ravel(), minlength=LEVELS + 1)
    positive = np.bincount(levels[domain & ref].ravel(), minlength=LEVELS + 1)
    return ProbabilityHistogram(total, positive, name)


def pool_histograms(histograms: Sequence[ProbabilityHistogram]) -> ProbabilityHistogram | None:
    """Sum of the histograms (a submission's or a site's cases); ``None`` when there are none."""
    pooled: ProbabilityHistogram | None = None
    for histogram in histograms:
        pooled = histogram if pooled is None else pooled + histogram
    return pooled


# ---------------------------------------------------------------------------
# Reliability diagram
# ---------------------------------------------------------------------------


def _bin_of_level(n_bins: int) -> np.ndarray:
    """Bin index of each level: bin ``b`` covers probabilities [b / n, (b + 1) / n), the last bin closed.

    Computed with integers (``floor(q * n / 255)``), so no float rounding moves a level across an edge.
    """
    levels = np.arange(LEVELS + 1, dtype=np.int64)
    return np.minimum(levels * n_bins // LEVELS, n_bins - 1)


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Reliability-diagram data: per bin, voxel count, mean lesion probability and observed lesion fraction.

    ``confidence`` and ``accuracy`` are NaN for empty bins (plot only bins with ``count > 0``).
    """

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    domain: str = "brain_mask"
    n_voxels: int = field(default=0)

    @classmethod
    def from_histogram(cls, histogram: ProbabilityHistogram, n_bins: int = ECE_BINS) -> "ReliabilityDiagram":
        if n_bins < 1:
            raise ValueError(f"n_bins must be at least 1, got {n_bins}")
        bins = _bin_of_level(n_bins)
        p = np.arange(LEVELS + 1, dtype=np.float64) / LEVELS
        count = np.bincount(bins, weights=histogram.total, minlength=n_bins).astype(np.int64)
        p_sum = np.bincount(bins, weights=histogram.total * p, minlength=n_bins)
        positives = np.bincount(bins, weights=histogram.positive, minlength=n_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(count > 0, p_sum / count, np.nan)
            accuracy = np.where(count > 0, positives / count, np.nan)
        return cls(np.linspace(0.0, 1.0, n_bins + 1), count, confidence, accuracy, histogram.domain, histogram.n_voxels)

    @property
    def ece(self) -> float | None:
        """Sum over non-empty bins of (count / N) |confidence - accuracy|; ``None`` without voxels."""
        if self.n_voxels == 0:
            return None
        used = self.count > 0
        gaps = np.abs(self.confidence[used] - self.accuracy[used])
        return float(np.dot(self.count[used], gaps) / self.n_voxels)

    def rows(self) -> list[dict[str, float | int]]:
        """One mapping per bin (``low``, ``high``, ``count``, ``confidence``, ``accuracy``) for tables and plots."""
        return [
            {"low": float(self.edges[b]), "high": float(self.edges[b + 1]), "count": int(self.count[b]),
             "confidence": float(self.confidence[b]), "accuracy": float(self.accuracy[b])}
            for b in range(len(self.count))
        ]


# ---------------------------------------------------------------------------
# The per-case entry point
# ---------------------------------------------------------------------------


def calibration_metrics(
    probability: np.ndarray | None,
    reference: np.ndarray,
    *,
    brain_mask: np.ndarray | None = None,
    adc: np.ndarray | None = None,
) -> dict[str, float | str | None]:
    """``{"brier", "ece", "calibration_domain"}`` of one case; values ``None`` without a probability map.

    Example:
        >>> p = np.array([[[0.0, 0.2], [0.8, 1.0]]]); y = p > 0.5
        >>> m = calibration_metrics(p, y)
        >>> round(m["brier"], 4), round(m["ece"], 4), m["calibration_domain"]
        (0.02, 0.1, 'whole_volume')
    """
    if probability is None:
        return {"brier": None, "ece": None, "calibration_domain": None}
    histogram = probability_histogram(probability, reference, brain_mask=brain_mask, adc=adc)
    return {"brier": histogram.brier, "ece": histogram.ece, "calibration_domain": histogram.domain}
