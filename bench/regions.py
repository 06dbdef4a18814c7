"""Lesion volume, count and volume per anatomical region: the clinical read-out of one case.

Contract
--------
* **Template** (:class:`RegionTemplate`): an integer label image (0 = outside the brain, ``k`` =
  ``names[k - 1]``) with its :class:`~bench.imageio.Geometry`, like any case image. The built-in one,
  :func:`parametric_template`, is generated deterministically in code (no download, nothing stored)
  from the MNI ICBM152 2009a tissue maps that ship inside the nilearn wheel (the same anatomy the
  synthetic generator deforms, :mod:`bench.data.template`) plus ellipsoids in MNI millimetres: the
  deep-grey and watershed ellipsoids of :data:`bench.data.template.REGIONS`, and two more here for the
  brainstem and cerebellum. It is an **approximate, parametric** template of an adult brain scaled to
  the case, not a neonatal atlas: boundaries are good to a few millimetres at best. A real atlas in the
  same layout plugs in through :meth:`RegionTemplate.from_label_image` (a label NIfTI plus a lookup from
  its labels to :data:`REGION_NAMES`).
* **Regions** (:data:`REGION_NAMES`, a partition of the template brain, priority in this order):
  brainstem, cerebellum, PLIC (internal-capsule ellipsoid where white matter dominates), basal ganglia
  and thalami (thalamus, lentiform and caudate ellipsoids), then cortex (grey matter dominant) and white
  matter, each split into the anterior watershed zone (ACA / MCA border zone, with the front half of
  the parasagittal strip), the posterior watershed zone (MCA / PCA border zone, with the back half) and
  the rest. Template voxels outside the brain take the label of the nearest brain voxel, so every case
  brain voxel gets a region; lesion voxels outside the case's brain mask are ``outside_brain``.
* **Mapping** (:func:`fit_template`, :func:`map_regions`): an affine fit of the template's brain to the
  case's brain mask in physical (LPS) space: centroids matched, principal axes matched (to the nearest
  template axis; orientation comes from the image header, so there is no sign ambiguity) and scaled by
  the square root of the variance ratios. When the fitted rotation exceeds ``max_rotation_deg`` or two
  principal variances are within 5 % (axes ill-defined), the fit falls back to an axis-aligned one
  (same centroids, per-axis scale). When the brain mask touches the edge of the image along an axis
  (a slab that does not cover the whole brain), the scale along it is the geometric mean of the other
  scales and the template's moments are taken only over the part the fit places inside the image,
  iteratively; the fit records those axes (``truncated_axes``) and the read-out shows a warning.
* **Volumes** are voxel counts times the voxel volume ``prod(spacing) / 1000`` ml (as
  :attr:`bench.imageio.Geometry.voxel_volume_ml`); lesions are 26-connected components, as in
  :mod:`bench.metrics`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np

from bench.imageio import Geometry

__all__ = [
    "CaseReadout",
    "OUTSIDE_BRAIN",
    "REGION_NAMES",
    "REGION_TITLES",
    "RegionMap",
    "RegionReadout",
    "RegionTemplate",
    "TemplateFit",
    "case_readout",
    "fit_template",
    "index_to_world",
    "lesion_count",
    "map_regions",
    "parametric_template",
    "region_volumes",
    "total_volume_ml",
    "world_to_index",
]

REGION_NAMES: tuple[str, ...] = (
    "basal_ganglia_thalami",
    "plic",
    "cortex_watershed_anterior",
    "cortex_watershed_posterior",
    "cortex_other",
    "white_matter_watershed_anterior",
    "white_matter_watershed_posterior",
    "white_matter_other",
    "brainstem",
    "cerebellum",
)
#: Key of lesion volume outside the case's brain mask.
OUTSIDE_BRAIN = "outside_brain"
REGION_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "basal_ganglia_thalami": "Basal ganglia and thalami",
        "plic": "Posterior limb of the internal capsule",
        "cortex_watershed_anterior": "Cortex, anterior watershed zone",
        "cortex_watershed_posterior": "Cortex, posterior watershed zone",
        "cortex_other": "Cortex, elsewhere",
        "white_matter_watershed_anterior": "White matter, anterior watershed zone",
        "white_matter_watershed_posterior": "White matter, posterior watershed zone",
        "white_matter_other": "White matter, elsewhere (central, periventricular)",
        "brainstem": "Brainstem",
        "cerebellum": "Cerebellum",
        OUTSIDE_BRAIN: "Outside the brain mask",
    }
)

#: Ellipsoids (MNI mm, x = right, y = anterior, z = superior) for the structures that
#: :data:`bench.data.template.REGIONS` does not hold. Approximate, like the others.
_BRAINSTEM = ((0.0, -28.0, -32.0), (10.0, 13.0, 24.0))
_CEREBELLUM = ((24.0, -60.0, -38.0), (27.0, 22.0, 17.0))
#: Radius factor from the generator's watershed ellipsoids to the watershed zones.
_WATERSHED_GROWTH = 1.5
#: The parasagittal watershed strip is split into anterior / posterior halves at this MNI y (mm).
_PARASAGITTAL_SPLIT_Y = -15.0


# ---------------------------------------------------------------------------
# Geometry helpers: array index (z, y, x) <-> physical LPS (x, y, z) in mm
# ---------------------------------------------------------------------------


def _direction(geometry: Geometry) -> np.ndarray:
    return np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points @ matrix.T`` for ``(N, 3)`` points, by broadcasting (a BLAS call for a 3 x 3 matrix is
    slower, and much slower when the machine's cores are busy)."""
    return points[:, 0:1] * matrix[:, 0] + points[:, 1:2] * matrix[:, 1] + points[:, 2:3] * matrix[:, 2]


def index_to_world(geometry: Geometry, index_zyx: np.ndarray) -> np.ndarray:
    """Physical LPS points ``(N, 3)`` (x, y, z mm) of voxel indices ``(N, 3)`` in array order."""
    ijk = np.asarray(index_zyx, dtype=np.float64)[:, ::-1] * np.asarray(geometry.spacing, dtype=np.float64)[::-1]
    return np.asarray(geometry.origin, dtype=np.float64)[::-1] + _apply(_direction(geometry), ijk)


def world_to_index(geometry: Geometry, points_xyz: np.ndarray) -> np.ndarray:
    """Fractional voxel indices ``(N, 3)`` (array order) of physical LPS points ``(N, 3)``."""
    offset = np.asarray(points_xyz, dtype=np.float64) - np.asarray(geometry.origin, dtype=np.float64)[::-1]
    ijk = _apply(np.linalg.inv(_direction(geometry)), offset)
    return (ijk / np.asarray(geometry.spacing, dtype=np.float64)[::-1])[:, ::-1]


# ---------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionTemplate:
    """A region label image (0 outside the brain, ``k`` = ``names[k - 1]``) and its geometry."""

    labels: np.ndarray
    geometry: Geometry
    names: tuple[str, ...] = REGION_NAMES
    source: str = ""

    @functools.cached_property
    def filled(self) -> np.ndarray:
        """Labels with every non-brain voxel set to the label of the nearest brain voxel."""
        from scipy import ndimage

        outside = self.labels == 0
        if not outside.any():
            return self.labels
        nearest = ndimage.distance_transform_edt(outside, sampling=self.geometry.spacing, return_distances=False, return_indices=True)
        return self.labels[tuple(nearest)]

    @classmethod
    def from_label_image(cls, path: str | Path, lookup: Mapping[int, str], *, source: str = "") -> "RegionTemplate":
        """A real atlas: a label image whose labels ``lookup`` maps to :data:`REGION_NAMES` (others: 0).

        Labels not in ``lookup`` become outside-brain (0); pass ``lookup`` values from ``REGION_NAMES``
        so that read-outs of different templates share their rows.
        """
        from bench.imageio import read_image

        array, geometry = read_image(path)
        unknown = sorted(set(lookup.values()) - set(REGION_NAMES))
        if unknown:
            raise ValueError(f"{path}: lookup names {unknown} are not regions ({', '.join(REGION_NAMES)})")
        labels = np.zeros(array.shape, np.uint8)
        for value, name in lookup.items():
            labels[array == value] = REGION_NAMES.index(name) + 1
        return cls(labels, geometry, REGION_NAMES, source or str(path))


def _template_geometry(shape: Sequence[int], resolution_mm: float, origin_sar: Sequence[float]) -> Geometry:
    """Geometry of a template whose array axes are (S, A, R): LPS direction diag(-1, -1, 1)."""
    s0, a0, r0 = (float(v) for v in origin_sar)
    return Geometry(
        shape=tuple(int(n) for n in shape),
        spacing=(float(resolution_mm),) * 3,
        origin=(s0, -a0, -r0),
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )


def _ellipsoid(template, center_xyz, radii_xyz, *, bilateral: bool) -> np.ndarray:
    from bench.data.template import Region, region_weight

    return region_weight(template, Region(center_xyz, radii_xyz, bilateral=bilateral)) >= 0.5


def _zone(t, name: str) -> np.ndarray:
    """A watershed ellipsoid of :data:`bench.data.template.REGIONS` with its radii times
    :data:`_WATERSHED_GROWTH`: the generator's ellipsoids mark where border-zone lesions are centred;
    the zone itself (cortex and subcortical white matter of the border zone) is wider."""
    from bench.data.template import REGIONS

    region = REGIONS[name]
    radii = tuple(r * _WATERSHED_GROWTH for r in region.radii_xyz)
    return _ellipsoid(t, region.center_xyz, radii, bilateral=region.bilateral)


def _cortex(t, brain: np.ndarray) -> np.ndarray:
    """Grey-matter-dominant voxels; fluid voxels take the class of the nearest tissue voxel, so the
    ventricles join the periventricular white matter and sulcal fluid the cortex."""
    from scipy import ndimage

    fluid = brain & (t.csf > np.maximum(t.gm, t.wm))
    nearest = ndimage.distance_transform_edt(fluid, return_distances=False, return_indices=True)
    return (t.gm >= t.wm)[tuple(nearest)]


@functools.lru_cache(maxsize=2)
def parametric_template(resolution_mm: int = 2) -> RegionTemplate:
    """The built-in approximate template (see the module docstring), memoised per process (~1 s)."""
    from bench.data.template import load_template

    t = load_template(resolution_mm)
    inside = lambda name: t.region_weight(name) >= 0.5  # noqa: E731 - local shorthand
    brain = t.brain >= 0.5
    mni_y = t.origin_sar[1] + t.resolution_mm * np.arange(t.shape[1])[None, :, None]
    strip = _zone(t, "watershed_parasagittal")
    zones = {
        "anterior": _zone(t, "watershed_anterior") | (strip & (mni_y >= _PARASAGITTAL_SPLIT_Y)),
        "posterior": _zone(t, "watershed_posterior") | (strip & (mni_y < _PARASAGITTAL_SPLIT_Y)),
    }
    cortex = _cortex(t, brain)
    label_of = {name: REGION_NAMES.index(name) + 1 for name in REGION_NAMES}
    labels = np.where(cortex, label_of["cortex_other"], label_of["white_matter_other"]).astype(np.uint8)
    for zone in ("posterior", "anterior"):  # the anterior zone wins where the two ellipsoids touch
        labels[zones[zone] & cortex] = label_of[f"cortex_watershed_{zone}"]
        labels[zones[zone] & ~cortex] = label_of[f"white_matter_watershed_{zone}"]
    deep = inside("thalamus") | inside("lentiform") | inside("caudate")
    labels[deep] = label_of["basal_ganglia_thalami"]
    labels[inside("plic") & (t.wm > t.gm)] = label_of["plic"]
    labels[_ellipsoid(t, *_CEREBELLUM, bilateral=True)] = label_of["cerebellum"]
    labels[_ellipsoid(t, *_BRAINSTEM, bilateral=False)] = label_of["brainstem"]
    labels[~brain] = 0
    labels.setflags(write=False)
    return RegionTemplate(
        labels, _template_geometry(t.shape, t.resolution_mm, t.origin_sar), REGION_NAMES,
        source=f"parametric template on MNI ICBM152 2009a tissue maps ({resolution_mm} mm), ellipsoid regions",
    )


# ---------------------------------------------------------------------------
# Fitting the template to a case
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateFit:
    """Affine map of template physical points onto the case: ``p_case = linear @ (p_t - template_center) + case_center``.

    ``scales``: per template principal axis; ``rotation_deg``: angle of the rotation part;
    ``method``: ``"principal_axes"`` or ``"axis_aligned"``; ``truncated_axes``: array axes (0 z, 1 y,
    2 x) along which the case's brain mask touches the edge of the image.
    """

    linear: np.ndarray
    template_center: np.ndarray
    case_center: np.ndarray
    scales: tuple[float, float, float]
    rotation_deg: float
    method: str
    truncated_axes: tuple[int, ...]

    def case_to_template(self, points_xyz: np.ndarray) -> np.ndarray:
        """Case physical points ``(N, 3)`` to template physical points."""
        return _apply(np.linalg.inv(self.linear), np.asarray(points_xyz, dtype=np.float64) - self.case_center) + self.template_center


def _moments(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centre = points.mean(axis=0)
    return centre, np.cov((points - centre).T)


def _brain_points(mask: np.ndarray, geometry: Geometry, max_points: int = 400_000) -> np.ndarray:
    where = np.argwhere(mask)
    step = max(1, len(where) // max_points)
    return index_to_world(geometry, where[::step])


def _truncated_axes(mask: np.ndarray) -> tuple[int, ...]:
    """Array axes along which the mask has voxels on the first or last plane."""
    axes = []
    for axis in range(3):
        ends = np.take(mask, [0, mask.shape[axis] - 1], axis=axis)
        if mask.shape[axis] > 1 and ends.any():
            axes.append(axis)
    return tuple(axes)


def _matched_axes(template_axes: np.ndarray, case_axes: np.ndarray) -> tuple[int, ...]:
    """Permutation ``perm`` pairing template axis ``i`` with case axis ``perm[i]`` (largest total |cos|)."""
    cosines = np.abs(template_axes.T @ case_axes)
    return max(itertools.permutations(range(3)), key=lambda perm: sum(cosines[i, perm[i]] for i in range(3)))


@dataclass(frozen=True)
class _Moments:
    """Principal axes (columns of ``axes``, template side) matched to the case, with per-axis scales."""

    template_centre: np.ndarray
    axes: np.ndarray
    matched: np.ndarray
    scales: np.ndarray
    rotation_deg: float
    method: str

    @property
    def linear(self) -> np.ndarray:
        return self.matched @ np.diag(self.scales) @ self.axes.T

    def with_scales(self, scales: np.ndarray) -> "_Moments":
        return _Moments(self.template_centre, self.axes, self.matched, scales, self.rotation_deg, self.method)


def _moment_fit(template_points: np.ndarray, case_centre: np.ndarray, case_cov: np.ndarray, max_rotation_deg: float) -> _Moments:
    """Match the template's centroid and principal axes to the case's (see the module docstring)."""
    mu_t, cov_t = _moments(template_points)
    var_t, axes_t = np.linalg.eigh(cov_t)
    var_c, axes_c = np.linalg.eigh(case_cov)
    perm = _matched_axes(axes_t, axes_c)
    matched = axes_c[:, perm] * np.sign(np.sum(axes_c[:, perm] * axes_t, axis=0))
    rotation = matched @ axes_t.T
    angle = math.degrees(math.acos(float(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
    gaps = np.diff(np.sort(var_c)) / np.sort(var_c)[1:]
    if np.linalg.det(rotation) > 0 and angle <= max_rotation_deg and gaps.min() >= 0.05:
        return _Moments(mu_t, axes_t, matched, np.sqrt(var_c[list(perm)] / var_t), angle, "principal_axes")
    scales = np.sqrt(np.einsum("ji,jk,ki->i", axes_t, case_cov, axes_t) / var_t)
    return _Moments(mu_t, axes_t, axes_t, scales, 0.0, "axis_aligned")


def _untruncated_scales(fit: _Moments, geometry: Geometry, truncated: Sequence[int]) -> np.ndarray:
    """Scales with those of the axes cut by the image edge replaced by the mean of the others."""
    array_axis_world = _direction(geometry)[:, [2 - a for a in truncated]]  # column k: world direction of index axis k
    cut = {int(np.argmax(np.abs(fit.matched.T @ array_axis_world[:, k]))) for k in range(len(truncated))}
    whole = [i for i in range(3) if i not in cut]
    if not whole:
        return fit.scales
    scales = fit.scales.copy()
    scales[list(cut)] = float(np.exp(np.mean(np.log(fit.scales[whole]))))
    return scales


def fit_template(
    brain_mask: np.ndarray,
    geometry: Geometry,
    template: RegionTemplate | None = None,
    *,
    max_rotation_deg: float = 20.0,
    iterations: int = 10,
) -> TemplateFit:
    """Affine fit of the template brain onto ``brain_mask`` (see the module docstring).

    When the brain touches the edge of the image along some array axes (a slab that does not cover
    the whole brain), the scale along those axes is the geometric mean of the others, and the
    template's moments are taken, iteratively, only over the part of the template that the current
    fit places inside the image along those axes, so both sides are cut alike.
    """
    template = template or parametric_template()
    mask = np.asarray(brain_mask, bool)
    if mask.sum() < 10:
        raise ValueError(f"the brain mask has {int(mask.sum())} voxels; cannot fit the region template")
    template_points = _brain_points(template.labels > 0, template.geometry, max_points=60_000)
    mu_c, cov_c = _moments(_brain_points(mask, geometry, max_points=200_000))
    truncated = _truncated_axes(mask)
    fit = _moment_fit(template_points, mu_c, cov_c, max_rotation_deg)
    limit = np.asarray(mask.shape, dtype=np.float64)[list(truncated)] - 0.5
    for _ in range(iterations if truncated else 0):
        fit = fit.with_scales(_untruncated_scales(fit, geometry, truncated))
        index = world_to_index(geometry, _apply(fit.linear, template_points - fit.template_centre) + mu_c)[:, list(truncated)]
        keep = np.all((index >= -0.5) & (index <= limit), axis=1)
        if keep.sum() < 10:
            break
        fit = _moment_fit(template_points[keep], mu_c, cov_c, max_rotation_deg)
    if truncated:
        fit = fit.with_scales(_untruncated_scales(fit, geometry, truncated))
    return TemplateFit(fit.linear, fit.template_centre, mu_c, tuple(float(s) for s in fit.scales), fit.rotation_deg, fit.method, truncated)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RegionMap:
    """Region labels on a case's grid (0 outside its brain mask), with the template names and the fit."""

    labels: np.ndarray
    names: tuple[str, ...]
    spacing: tuple[float, float, float]
    fit: TemplateFit | None = None
    source: str = ""

    def mask(self, name: str) -> np.ndarray:
        return self.labels == self.names.index(name) + 1


def map_regions(
    brain_mask: np.ndarray, geometry: Geometry, template: RegionTemplate | None = None, *, max_rotation_deg: float = 20.0
) -> RegionMap:
    """Template regions on the case grid: each brain voxel takes the (nearest-filled) template label."""
    template = template or parametric_template()
    mask = np.asarray(brain_mask, bool)
    if tuple(mask.shape) != tuple(geometry.shape):
        raise ValueError(f"brain mask shape {mask.shape} differs from the geometry {tuple(geometry.shape)}")
    fit = fit_template(mask, geometry, template, max_rotation_deg=max_rotation_deg)
    where = np.argwhere(mask)
    index = np.rint(world_to_index(template.geometry, fit.case_to_template(index_to_world(geometry, where)))).astype(np.int64)
    index = np.clip(index, 0, np.asarray(template.labels.shape) - 1)
    labels = np.zeros(mask.shape, np.uint8)
    labels[tuple(where.T)] = template.filled[tuple(index.T)]
    return RegionMap(labels, template.names, tuple(float(s) for s in geometry.spacing), fit, template.source)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Volumes and the read-out record
# ---------------------------------------------------------------------------


def _voxel_ml(spacing: Sequence[float]) -> float:
    return float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0


def total_volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Lesion volume in ml: voxel count x voxel volume."""
    return int(np.count_nonzero(mask)) * _voxel_ml(spacing)


def lesion_count(mask: np.ndarray) -> int:
    """Number of 26-connected lesions (as the ``lesion_*`` metrics count them)."""
    from bench.uncertainty import label_components

    return label_components(np.asarray(mask, bool))[1]


def region_volumes(mask: np.ndarray, spacing: Sequence[float], regions: RegionMap) -> dict[str, float]:
    """Lesion volume (ml) per region, every region listed, plus :data:`OUTSIDE_BRAIN`; sums to the total."""
    mask = np.asarray(mask, bool)
    if mask.shape != regions.labels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the region map {regions.labels.shape}")
    counts = np.bincount(regions.labels[mask].ravel(), minlength=len(regions.names) + 1)
    voxel_ml = _voxel_ml(spacing)
    volumes = {name: int(counts[k + 1]) * voxel_ml for k, name in enumerate(regions.names)}
    volumes[OUTSIDE_BRAIN] = int(counts[0]) * voxel_ml
    return volumes


@dataclass(frozen=True)
class RegionReadout:
    """Predicted and reference lesion volume in one region; ``error_ml`` = predicted - reference."""

    region: str
    title: str
    predicted_ml: float
    reference_ml: float | None
    error_ml: float | None


@dataclass(frozen=True)
class CaseReadout:
    """The quantitative read-out of one case (reference fields ``None`` when there is no reference)."""

    case_id: str
    predicted_ml: float
    reference_ml: float | None
    error_ml: float | None
    predicted_count: int
    reference_count: int | None
    regions: tuple[RegionReadout, ...]
    involved_predicted: tuple[str, ...]
    involved_reference: tuple[str, ...] | None
    involvement_ml: float
    fit: TemplateFit | None
    template: str

    def rows(self) -> list[dict[str, object]]:
        """One flat mapping per region, for a store table or a CSV."""
        return [{"case_id": self.case_id, **{k: getattr(r, k) for k in ("region", "predicted_ml", "reference_ml", "error_ml")}} for r in self.regions]


def _involved(volumes: Mapping[str, float], threshold_ml: float) -> tuple[str, ...]:
    return tuple(name for name, ml in volumes.items() if ml >= threshold_ml and ml > 0)


def case_readout(
    case_id: str,
    prediction: np.ndarray,
    spacing: Sequence[float],
    regions: RegionMap | None,
    reference: np.ndarray | None = None,
    *,
    involvement_ml: float = 0.05,
) -> CaseReadout:
    """Volumes, counts and per-region volumes, predicted beside reference; a region with at least
    ``involvement_ml`` of lesion counts as involved (0.05 ml: a few voxels, above single-voxel noise).

    ``regions=None`` (no template could be mapped): totals and counts only, no region rows.
    """
    predicted = region_volumes(prediction, spacing, regions) if regions is not None else {}
    truth = region_volumes(reference, spacing, regions) if reference is not None and regions is not None else None
    rows = tuple(
        RegionReadout(name, REGION_TITLES.get(name, name), predicted[name],
                      None if truth is None else truth[name], None if truth is None else predicted[name] - truth[name])
        for name in predicted
    )
    pred_ml = total_volume_ml(prediction, spacing)
    ref_ml = None if reference is None else total_volume_ml(reference, spacing)
    return CaseReadout(
        case_id=case_id, predicted_ml=pred_ml, reference_ml=ref_ml, error_ml=None if ref_ml is None else pred_ml - ref_ml,
        predicted_count=lesion_count(prediction), reference_count=None if reference is None else lesion_count(reference),
        regions=rows, involved_predicted=_involved(predicted, involvement_ml),
        involved_reference=None if reference is None else _involved(truth or {}, involvement_ml),
        involvement_ml=float(involvement_ml), fit=None if regions is None else regions.fit,
        template="" if regions is None else regions.source,
    )
