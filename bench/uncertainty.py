"""Voxel and lesion uncertainty, and how well it flags the model's errors.

Contract
--------
* **Maps** (:func:`uncertainty_maps`) from a stack of lesion probability maps ``(T, z, y, x)``:
  flip test-time augmentation (one member per mirrored copy, :func:`flip_tta_probabilities`) or MC
  dropout samples (:func:`mc_dropout_probabilities`). Per voxel:

  - ``mean``: the averaged probability (what the mask is thresholded from);
  - ``variance``: population variance over the members, in [0, 0.25];
  - ``entropy``: predictive entropy ``H(mean)`` of the binary lesion / background distribution, in
    **bits** (so in [0, 1]: 1 bit is a 50 / 50 voxel);
  - ``mutual_information``: ``H(mean) - mean_t H(p_t)`` (BALD; the part of the entropy due to
    disagreement between samples, "epistemic"), in bits, given only for MC-dropout samples. For flip
    TTA it would measure disagreement between mirrored copies, not model uncertainty, so it is left out.

  A single probability map (``T = 1``) still has a predictive entropy; its variance is 0.
* **Lesion uncertainty** (:func:`lesion_uncertainty`): the mean voxel uncertainty over each predicted
  26-connected component, components numbered in raster order exactly as the ``lesion_*`` rows of
  :func:`bench.metrics.lesion_matches`, so the two join on ``component_id``; a component is a false
  positive exactly when its lesion row says so (the benchmark's matching rule, not a private one).
* **Does uncertainty flag errors?** (:func:`voxel_error_auroc`, :func:`lesion_fp_auroc`): the AUROC
  of voxel uncertainty for separating misclassified from correct voxels (inside the brain mask, for
  the reason given in :mod:`bench.calibration`), and of lesion uncertainty for separating
  false-positive components from true ones. 0.5 means uncertainty says nothing about errors, 1 that
  every error is more uncertain than every correct decision. AUROC is exact (Mann-Whitney with
  mid-ranks, ties count one half), no scikit-learn.
* Pooling over cases: voxel AUROC is poolable exactly through :class:`ErrorHistogram` (uncertainty
  quantized to 256 levels like the stored maps; error and correct counts per level add over cases);
  lesion AUROC pools the lesion rows of all cases and calls :func:`auroc`.
* ``None`` means "not available" (no uncertainty map, no error, or no correct voxel / lesion): never
  a made-up 0.5.
* **Which map a case's uncertainty is** (the ``uncertainty_source`` stored with its result):
  :data:`UNCERTAINTY_SOURCES` names each source by the map it is, not by how many maps there were —
  ``"entropy"`` (predictive entropy of the one stored probability map, which may itself be a flip-TTA
  mean), ``"tta-variance"`` (variance of the lesion probability over the flip-TTA copies the prediction
  already ran, from :class:`bench.inference.MirroredSoftmax` with ``with_variance=True``: no extra pass)
  and ``"mc-dropout"`` (variance over MC-dropout samples: ``n_samples`` more passes, opt-in through
  :class:`UncertaintySettings`, and only for a network that has dropout); ``"model-variance"`` is a
  variance map a submission returned itself (``{"mask", "probability", "uncertainty"}``) without naming
  how it was made. ``"single"`` is the legacy name of ``"entropy"`` (read in old rows, never written:
  :func:`recorded_source`). :class:`VoxelUncertainty` carries a map with its source, in native space like the
  probability; :func:`case_uncertainty` scores a case with it (or with the entropy when there is none).

Torch is imported inside the functions that run a network.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from bench.calibration import LEVELS, MetricDefinition
from bench.metrics import MetricInfo

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAP_RANGES",
    "UNCERTAINTY_METRICS",
    "UNCERTAINTY_SOURCES",
    "CaseUncertainty",
    "UncertaintySettings",
    "VoxelUncertainty",
    "case_uncertainty",
    "recorded_source",
    "source_kind",
    "ErrorHistogram",
    "LesionUncertainty",
    "UncertaintyMaps",
    "auroc",
    "binary_entropy",
    "dequantize_uncertainty",
    "dropout_enabled",
    "error_histogram",
    "flip_tta_probabilities",
    "label_components",
    "lesion_fp_auroc",
    "lesion_uncertainty",
    "mc_dropout_available",
    "mc_dropout_probabilities",
    "quantize_uncertainty",
    "uncertainty_maps",
    "voxel_error_auroc",
]

Source = Literal["single", "flip_tta", "mc_dropout"]

#: Largest value of each uncertainty map (for display scales and :func:`quantize_uncertainty`).
MAP_RANGES: Mapping[str, float] = MappingProxyType({"entropy": 1.0, "variance": 0.25, "mutual_information": 1.0})

#: The recorded ``uncertainty_source`` strings: source -> (map kind of :data:`MAP_RANGES`, what it is).
#: At most 16 characters (the store's column).
UNCERTAINTY_SOURCES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "entropy": ("entropy", "predictive entropy H(p) in bits of the case's stored lesion probability map"),
        "tta-variance": ("variance", "population variance of the lesion probability over the flip-TTA copies already run for the prediction"),
        "mc-dropout": ("variance", "population variance of the lesion probability over MC-dropout samples (opt-in, extra passes)"),
        "model-variance": ("variance", "a variance of the lesion probability that the submission computed itself (its own TTA, ensemble or samples)"),
        "single": ("entropy", "legacy name of 'entropy': predictive entropy of the one stored probability map"),
    }
)


#: Legacy source names and what a new row records instead.
LEGACY_SOURCES: Mapping[str, str] = MappingProxyType({"single": "entropy"})


def recorded_source(source: str) -> str:
    """The name a new row records for ``source`` (``single`` becomes ``entropy``); unknown names raise ``ValueError``."""
    source_kind(source)
    return LEGACY_SOURCES.get(source, source)


def source_kind(source: str) -> str:
    """The map kind (``entropy`` or ``variance``, a key of :data:`MAP_RANGES`) of a recorded source."""
    try:
        return UNCERTAINTY_SOURCES[source][0]
    except KeyError:
        raise ValueError(f"unknown uncertainty source {source!r}; known: {', '.join(UNCERTAINTY_SOURCES)}") from None


_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class UncertaintySettings:
    """Which voxel uncertainty a network prediction records.

    ``tta_variance``: when the model runs flip TTA, record the variance over the flipped copies (free:
    the passes are run anyway for the mean). ``mc_dropout``: run ``mc_samples`` more inferences with
    the dropout layers on and record their variance instead; off by default (it multiplies inference
    time), ignored for a network without dropout or a traced export (dropout frozen in the trace).
    :meth:`from_env` reads ``HIE_BENCH_UNCERTAINTY_TTA``, ``HIE_BENCH_MC_DROPOUT`` and ``HIE_BENCH_MC_SAMPLES``.
    """

    tta_variance: bool = True
    mc_dropout: bool = False
    mc_samples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mc_samples < 2:
            raise ValueError(f"MC dropout needs at least 2 samples, got {self.mc_samples}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "UncertaintySettings":
        env = os.environ if environ is None else environ
        return cls(
            tta_variance=env.get("HIE_BENCH_UNCERTAINTY_TTA", "1").strip().lower() in _TRUE,
            mc_dropout=env.get("HIE_BENCH_MC_DROPOUT", "0").strip().lower() in _TRUE,
            mc_samples=int(env.get("HIE_BENCH_MC_SAMPLES", "8")),
        )

    def source(self, *, mirrored: bool, has_dropout: bool = False) -> str:
        """The source a prediction gets: ``mc-dropout`` when asked for and the network has dropout, else
        ``tta-variance`` when flip TTA ran (and is wanted), else ``entropy``."""
        if self.mc_dropout and has_dropout:
            return "mc-dropout"
        if self.tta_variance and mirrored:
            return "tta-variance"
        return "entropy"


UNCERTAINTY_METRICS: Mapping[str, MetricDefinition] = MappingProxyType(
    {
        "uncertainty_error_auroc": MetricDefinition(
            MetricInfo("uncertainty_error_auroc", "Uncertainty flags voxel errors (AUROC)", "", True, (0.0, 1.0),
                       "AUROC of the case's voxel uncertainty (its uncertainty_source: predictive entropy, flip-TTA or MC-dropout variance) "
                       "for misclassified (FP or FN) versus correct voxels."),
            computed_over="brain-mask voxels of one case (fallback ADC > 0, then the whole volume)",
            pooling="per-case values averaged; the pooled figure sums ErrorHistogram counts over cases",
            requires="a voxel uncertainty map (probability map or TTA / MC-dropout stack) and a reference",
        ),
        "uncertainty_fp_auroc": MetricDefinition(
            MetricInfo("uncertainty_fp_auroc", "Uncertainty flags false-positive lesions (AUROC)", "", True, (0.0, 1.0),
                       "AUROC of mean lesion uncertainty (the case's uncertainty_source) for false-positive versus true predicted components."),
            computed_over="predicted 26-connected components of one case, or of all cases pooled",
            pooling="lesion rows of all cases pooled into one AUROC (a case rarely has both kinds)",
            requires="a voxel uncertainty map, a reference, and at least one true and one false-positive component",
        ),
        "lesion_uncertainty": MetricDefinition(
            MetricInfo("lesion_uncertainty", "Lesion uncertainty", "bits", None, (0.0, 1.0),
                       "Mean voxel uncertainty over one predicted component: bits for the entropy source, p^2 in [0, 0.25] for the variance sources."),
            computed_over="voxels of one predicted 26-connected component",
            pooling="none: one value per lesion row",
            requires="a voxel uncertainty map",
        ),
    }
)


# ---------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p), float32, 0 at p = 0 and p = 1, 1 at p = 0.5."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(np.where(p > 0, p * np.log2(p), 0.0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0))
    return np.clip(terms, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class UncertaintyMaps:
    """Per-voxel uncertainty from ``n_members`` probability maps (see the module docstring)."""

    mean: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray | None
    source: Source
    n_members: int


def uncertainty_maps(samples: np.ndarray, *, source: Source = "flip_tta") -> UncertaintyMaps:
    """Mean, variance, entropy (and for ``source="mc_dropout"`` mutual information) of ``(T, z, y, x)``.

    A 3-D array is one probability map (``T = 1``, ``source`` becomes ``"single"``).
    """
    stack = np.asarray(samples, dtype=np.float32)
    if stack.ndim == 3:
        stack, source = stack[None], "single"
    if stack.ndim != 4 or stack.shape[0] < 1:
        raise ValueError(f"expected a (T, z, y, x) stack of probability maps, got shape {stack.shape}")
    if not np.all(np.isfinite(stack)) or stack.min() < -1e-6 or stack.max() > 1 + 1e-6:
        raise ValueError("probability maps must be finite and lie in [0, 1]")
    mean = stack.mean(axis=0)
    entropy = binary_entropy(mean)
    mutual = None
    if source == "mc_dropout":
        expected = np.mean([binary_entropy(member) for member in stack], axis=0)
        mutual = np.clip(entropy - expected, 0.0, 1.0).astype(np.float32)
    return UncertaintyMaps(mean, stack.var(axis=0).astype(np.float32), entropy, mutual, source, int(stack.shape[0]))


def quantize_uncertainty(values: np.ndarray, kind: str = "entropy") -> np.ndarray:
    """An uncertainty map as ``uint8`` levels over its range (:data:`MAP_RANGES`), for storage.

    The error bound is half a level: ``0.5 / 255`` of the range (0.002 bits for entropy).
    """
    top = MAP_RANGES[kind]
    return np.rint(np.clip(np.asarray(values, dtype=np.float64) / top, 0.0, 1.0) * LEVELS).astype(np.uint8)


def dequantize_uncertainty(levels: np.ndarray, kind: str = "entropy") -> np.ndarray:
    """Stored ``uint8`` levels back to the map's units (float32)."""
    levels = np.asarray(levels)
    if levels.dtype != np.uint8:
        raise ValueError(f"quantized uncertainty must be uint8, got {levels.dtype}")
    return (levels.astype(np.float32) / np.float32(LEVELS) * np.float32(MAP_RANGES[kind])).astype(np.float32)


@dataclass(frozen=True)
class VoxelUncertainty:
    """A voxel uncertainty map of one case on its native grid (float32, in the source's
    :data:`MAP_RANGES`) and its recorded ``source`` (:data:`UNCERTAINTY_SOURCES`)."""

    values: np.ndarray
    source: str

    def __post_init__(self) -> None:
        kind = source_kind(self.source)
        values = np.asarray(self.values)
        if values.ndim != 3 or not np.all(np.isfinite(values)) or values.min(initial=0.0) < -1e-6 or values.max(initial=0.0) > MAP_RANGES[kind] + 1e-6:
            raise ValueError(f"a {self.source} map must be a finite (z, y, x) array in [0, {MAP_RANGES[kind]}]")

    @property
    def kind(self) -> str:
        return source_kind(self.source)

    def levels(self) -> np.ndarray:
        """``uint8`` levels for storage (:func:`quantize_uncertainty`); what is stored is what is scored."""
        return quantize_uncertainty(self.values, self.kind)

    @classmethod
    def from_levels(cls, levels: np.ndarray, source: str) -> "VoxelUncertainty":
        return cls(dequantize_uncertainty(levels, source_kind(source)), source)


@dataclass(frozen=True)
class CaseUncertainty:
    """What a case's voxel uncertainty gives its result: the voxel error AUROC over the domain, the mean
    uncertainty of each predicted component (raster order) and the recorded source."""

    error_auroc: float | None
    lesions: tuple[LesionUncertainty, ...]
    source: str


def case_uncertainty(
    levels: np.ndarray,
    mask: np.ndarray,
    reference: np.ndarray | None,
    domain: np.ndarray,
    *,
    false_positive: Sequence[bool] | None = None,
    uncertainty: VoxelUncertainty | None = None,
) -> CaseUncertainty:
    """Score one case's uncertainty: ``uncertainty`` when the prediction brought one (flip-TTA or
    MC-dropout variance; scored from its ``uint8`` levels, as stored), else the predictive entropy of the
    probability ``levels`` (source ``entropy``). Same grid for all: the native one."""
    from bench.calibration import dequantize

    levels = np.asarray(levels)
    if uncertainty is None:
        # Per level, then looked up: the same float32 values as binary_entropy(dequantize(levels)).
        values, source = binary_entropy(dequantize(np.arange(256, dtype=np.uint8)))[levels], "entropy"
    else:
        if tuple(np.shape(uncertainty.values)) != tuple(levels.shape):
            raise ValueError(f"uncertainty map of shape {np.shape(uncertainty.values)} is not on the probability's grid {levels.shape}")
        values, source = dequantize_uncertainty(uncertainty.levels(), uncertainty.kind), recorded_source(uncertainty.source)
    lesions = lesion_uncertainty(mask, values, false_positive=false_positive)
    return CaseUncertainty(voxel_error_auroc(values, mask, reference, domain), lesions, source)


# ---------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (True = positive), exact, ties count 1/2.

    Mann-Whitney: ``(sum of positive mid-ranks - n+ (n+ + 1) / 2) / (n+ n-)``. ``None`` when either
    class is absent.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in size: {scores.size} and {labels.size}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores, method="average")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@dataclass(frozen=True)
class ErrorHistogram:
    """Per uncertainty level (0..255): misclassified and correct domain voxels; adds over cases."""

    errors: np.ndarray
    correct: np.ndarray

    def __add__(self, other: "ErrorHistogram") -> "ErrorHistogram":
        return ErrorHistogram(self.errors + other.errors, self.correct + other.correct)

    @property
    def auroc(self) -> float | None:
        """Exact AUROC of the quantized uncertainty for errors (ties within a level count 1/2)."""
        errors = np.asarray(self.errors, dtype=np.float64)
        correct = np.asarray(self.correct, dtype=np.float64)
        n_err, n_ok = errors.sum(), correct.sum()
        if n_err == 0 or n_ok == 0:
            return None
        below = np.concatenate([[0.0], np.cumsum(correct)[:-1]])  # correct voxels at lower levels
        return float(np.dot(errors, below + 0.5 * correct) / (n_err * n_ok))

    def to_dict(self) -> dict[str, list[int]]:
        return {"errors": np.asarray(self.errors).tolist(), "correct": np.asarray(self.correct).tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> "ErrorHistogram":
        return cls(np.asarray(data["errors"], np.int64), np.asarray(data["correct"], np.int64))


def error_histogram(
    uncertainty: np.ndarray, prediction: np.ndarray, reference: np.ndarray, domain: np.ndarray, *, kind: str = "entropy"
) -> ErrorHistogram:
    """The :class:`ErrorHistogram` of one case (``uncertainty`` float, or ``uint8`` levels as stored)."""
    levels = np.asarray(uncertainty) if np.asarray(uncertainty).dtype == np.uint8 else quantize_uncertainty(uncertainty, kind)
    wrong = np.asarray(prediction, bool) != np.asarray(reference, bool)
    inside = np.asarray(domain, bool)
    errors = np.bincount(levels[inside & wrong].ravel(), minlength=LEVELS + 1).astype(np.int64)
    correct = np.bincount(levels[inside & ~wrong].ravel(), minlength=LEVELS + 1).astype(np.int64)
    return ErrorHistogram(errors, correct)


def voxel_error_auroc(
    uncertainty: np.ndarray | None, prediction: np.ndarray, reference: np.ndarray | None, domain: np.ndarray
) -> float | None:
    """AUROC of voxel uncertainty for misclassified voxels within ``domain``; ``None`` when not available."""
    if uncertainty is None or reference is None:
        return None
    inside = np.asarray(domain, bool)
    wrong = np.asarray(prediction, bool) != np.asarray(reference, bool)
    return auroc(np.asarray(uncertainty)[inside], wrong[inside])


# ---------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components numbered 1..n in raster order (as :mod:`bench.metrics`), and n."""
    import cc3d

    labels, count = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=26, return_N=True)
    return labels.astype(np.int32, copy=False), int(count)


@dataclass(frozen=True)
class LesionUncertainty:
    """Uncertainty of one predicted component; ``false_positive`` is ``None`` without a reference."""

    component_id: int
    voxels: int
    mean_uncertainty: float
    max_uncertainty: float
    false_positive: bool | None


def _false_positives(prediction: np.ndarray, reference: np.ndarray, voxels: np.ndarray) -> list[bool]:
    """False-positive flags of the predicted components exactly as the benchmark's lesion rows have them
    (:func:`bench.metrics.lesion_matches` with its default matching rule), checked to be the same components."""
    from bench.metrics import lesion_matches

    rows = lesion_matches(np.asarray(prediction, bool), np.asarray(reference, bool), (1.0, 1.0, 1.0)).predicted
    if [row.voxels for row in rows] != voxels.tolist():
        raise RuntimeError("predicted components are numbered differently from bench.metrics.lesion_matches")
    return [bool(row.false_positive) for row in rows]


def lesion_uncertainty(
    prediction: np.ndarray,
    uncertainty: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    false_positive: Sequence[bool] | None = None,
) -> tuple[LesionUncertainty, ...]:
    """Mean and max voxel uncertainty over each predicted component, and whether it is a false positive.

    The false-positive flags are ``false_positive`` if given (one per component, raster order, e.g.
    from stored lesion rows), else computed from ``reference`` with the benchmark's lesion matching,
    else ``None``.
    """
    labels, count = label_components(prediction)
    if count == 0:
        return ()
    flat, values = labels.ravel(), np.asarray(uncertainty, dtype=np.float64).ravel()
    inside = flat > 0
    voxels = np.bincount(flat[inside], minlength=count + 1)[1:]
    sums = np.bincount(flat[inside], weights=values[inside], minlength=count + 1)[1:]
    peaks = np.full(count + 1, -np.inf)
    np.maximum.at(peaks, flat[inside], values[inside])
    if false_positive is None and reference is not None:
        false_positive = _false_positives(prediction, reference, voxels)
    if false_positive is not None and len(false_positive) != count:
        raise ValueError(f"{len(false_positive)} false-positive flags for {count} predicted components")
    return tuple(
        LesionUncertainty(i + 1, int(voxels[i]), float(sums[i] / voxels[i]), float(peaks[i + 1]),
                          None if false_positive is None else bool(false_positive[i]))
        for i in range(count)
    )


def lesion_fp_auroc(lesions: Sequence[LesionUncertainty]) -> float | None:
    """AUROC of lesion uncertainty for false-positive components (pool the lesions of many cases)."""
    known = [lesion for lesion in lesions if lesion.false_positive is not None]
    if not known:
        return None
    return auroc(np.array([l.mean_uncertainty for l in known]), np.array([l.false_positive for l in known]))


# ---------------------------------------------------------------------------
# Producing the stacks: flip TTA and MC dropout (torch imported inside)
# ---------------------------------------------------------------------------


def _dropout_modules(net: "torch.nn.Module") -> list["torch.nn.Module"]:
    from torch import nn

    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0]


def mc_dropout_available(net: "torch.nn.Module") -> bool:
    """Whether ``net`` has at least one dropout layer with ``p > 0`` (MC dropout is then meaningful)."""
    return bool(_dropout_modules(net))


@contextmanager
def dropout_enabled(net: "torch.nn.Module") -> Iterator["torch.nn.Module"]:
    """``net`` in eval mode with only its dropout layers in train mode; modes are restored afterwards.

    Normalisation layers stay in eval mode (running statistics unchanged, no batch dependence).
    """
    modes = {module: module.training for module in net.modules()}
    net.eval()
    for module in _dropout_modules(net):
        module.train()
    try:
        yield net
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _predict_lesion(net: Any, inputs: "torch.Tensor", patch_size: Sequence[int] | None, overlap: float) -> np.ndarray:
    """Lesion-class probability ``(z, y, x)`` of ``net`` (logits ``(1, 2, z, y, x)``) on ``inputs``."""
    import torch

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(net(x).float(), dim=1)

    with torch.no_grad():
        if patch_size is None:
            output = forward(inputs)
        else:
            from monai.inferers import sliding_window_inference

            output = sliding_window_inference(inputs, tuple(int(s) for s in patch_size), 1, forward, overlap=overlap,
                                              mode="gaussian", padding_mode="constant", cval=0.0)
    return output[0, 1].float().cpu().numpy()


def mc_dropout_probabilities(
    net: "torch.nn.Module",
    image: np.ndarray,
    *,
    n_samples: int = 8,
    seed: int = 0,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
) -> np.ndarray | None:
    """``(n_samples, z, y, x)`` lesion probabilities with dropout active; ``None`` if ``net`` has no dropout.

    ``image`` is ``(C, z, y, x)`` on the network's (preprocessed) grid; with ``patch_size`` the volume
    is run in Gaussian-weighted sliding windows (each sample draws its own dropout masks).
    """
    import torch

    if n_samples < 2:
        raise ValueError(f"MC dropout needs at least 2 samples, got {n_samples}")
    if not mc_dropout_available(net):
        return None
    device = next(net.parameters()).device
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with dropout_enabled(net):
            samples = [_predict_lesion(net, inputs, patch_size, overlap) for _ in range(n_samples)]
    finally:
        torch.random.set_rng_state(generator_state)
    return np.stack(samples).astype(np.float32)


def flip_tta_probabilities(
    net: "torch.nn.Module",
    image: np.ndarray,
    mirror_axes: Sequence[int],
    *,
    patch_size: Sequence[int] | None = None,
    overlap: float = 0.5,
) -> np.ndarray:
    """One lesion probability map per mirrored copy (identity first), ``(1 + 2^n - 1, z, y, x)``.

    The members are those :class:`bench.inference.MirroredSoftmax` averages, kept apart; their
    mean is its output (up to sliding-window blending, which here runs per member).
    """
    import torch

    from bench.inference import mirror_combinations

    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(next(net.parameters()).device)
    was_training = net.training
    net.eval()
    try:
        members = [_predict_lesion(net, inputs, patch_size, overlap)]
        for dims in mirror_combinations(mirror_axes):
            spatial = tuple(d - 2 for d in dims)
            flipped = torch.flip(inputs, dims)
            members.append(np.flip(_predict_lesion(net, flipped, patch_size, overlap), spatial))
    finally:
        net.train(was_training)
    return np.ascontiguousarray(np.stack(members), dtype=np.float32)
