"""Injury patterns of neonatal hypoxic-ischemic encephalopathy, drawn on the anatomical template.

Each pattern draws a *soft* lesion map (float32 in [0, 1], the fraction of a template voxel that is
lesion) on the template grid, so that lesions follow the anatomy through the same deformation as the
brain. The native label is that map, blurred by the slice profile and resampled to the acquisition
grid, as one of the site's raters outlines it (:func:`annotate`, below): lesions thinner than a slice
fade, as they do on real thick-slice DWI.

Patterns (the ``pattern`` column of ``cases.csv``):

``bgt``
    basal ganglia / thalamus: bilateral, fairly symmetric lesions in thalamus and lentiform nucleus
    (sometimes caudate), often extending into the posterior limb of the internal capsule.
``watershed``
    cortical and subcortical white-matter lesions in the arterial border zones (anterior, posterior
    and parasagittal), multifocal, of varied size.
``plic``
    posterior limb of the internal capsule: thin, elongated (superior-inferior) lesions, uni- or bilateral.
``diffuse_wm``
    diffuse central / periventricular white-matter injury: large, irregular, moderately low ADC.
``punctate``
    punctate white-matter lesions: a scatter of 1-3 mm foci.
``none``
    no lesion (the case is in the dataset as a true negative).

Sizes are given in *neonatal* millimetres and converted with the case's template-to-neonate scale.

**Raters** (:class:`RaterHabit`, :func:`annotate`). A label is a person's outline, not the truth: each
site has one or more raters with their own habits, and one of them labels each case. A rater draws the
outline where the (blurred, partial-volume) lesion fraction crosses their threshold, which drifts a
little from case to case; the outline wobbles by about a voxel where the lesion edge is shallow (a
smooth random offset of the fraction, correlated over a few millimetres); and lesions smaller than the
rater's attention span are missed with the rater's probability, so a model that finds them is scored as
a false positive, as on real data. The most conspicuous (largest) lesion is never missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bench.data.template import REGIONS, AnatomicalTemplate, Region

#: Pattern names in the order used for documentation and tables.
PATTERNS: tuple[str, ...] = ("none", "bgt", "watershed", "plic", "diffuse_wm", "punctate")

#: Typical lesion ADC (10^-6 mm^2/s, before the site's intensity scale) per pattern: (low, high).
#: Acute HIE lesions sit around 400-800 against 1100-1600 in normal neonatal white matter; diffuse
#: white-matter injury is milder.
LESION_ADC: dict[str, tuple[float, float]] = {
    "bgt": (430.0, 720.0),
    "watershed": (480.0, 800.0),
    "plic": (450.0, 720.0),
    "diffuse_wm": (650.0, 850.0),
    "punctate": (480.0, 800.0),
}

#: Lesion-volume multiplier per pattern, relative to the site's median lesion fraction: punctate and
#: PLIC lesions are small by nature, diffuse white-matter injury and basal ganglia lesions large.
VOLUME_FACTOR: dict[str, float] = {
    "bgt": 1.6,
    "watershed": 1.2,
    "plic": 0.25,
    "diffuse_wm": 2.0,
    "punctate": 0.15,
}


@dataclass(frozen=True)
class LesionContext:
    """What a pattern needs to know about the case it draws into."""

    template: AnatomicalTemplate
    #: Neonatal millimetres per template millimetre (about 0.6): converts lesion sizes.
    neonatal_scale: float
    #: Extra linear size factor (the coarse test presets enlarge lesions so they survive their grid).
    size_scale: float = 1.0

    @property
    def voxel_ml(self) -> float:
        """Neonatal volume of one template voxel in millilitres."""
        return (self.template.resolution_mm * self.neonatal_scale) ** 3 / 1000.0

    def mm_to_voxels(self, neonatal_mm: np.ndarray | float) -> np.ndarray:
        return np.asarray(neonatal_mm, dtype=np.float64) * self.size_scale / (self.neonatal_scale * self.template.resolution_mm)


def _parenchyma(template: AnatomicalTemplate) -> np.ndarray:
    return np.clip(template.gm + template.wm, 0.0, 1.0)


def _sample_in_region(
    region: Region, template: AnatomicalTemplate, rng: np.random.Generator, allowed: np.ndarray, *, side: int | None = None
) -> np.ndarray | None:
    """A random template index inside ``region`` where ``allowed`` > 0.5 (``None`` after 30 misses)."""
    centers = region.centers_sar()
    for _ in range(30):
        center = centers[side if side is not None else int(rng.integers(len(centers)))]
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) + 1e-12
        point = center + direction * region.radii_sar * rng.random() ** (1 / 3)
        index = np.round(template.mm_to_index(point)).astype(int)
        if np.all(index >= 0) and np.all(index < template.shape) and allowed[tuple(index)] > 0.5:
            return index
    return None


def add_blob(
    weight: np.ndarray,
    center: np.ndarray,
    radii_vox: np.ndarray,
    rng: np.random.Generator,
    allowed: np.ndarray,
    *,
    roughness: float = 0.3,
) -> None:
    """Add an irregular ellipsoidal lesion to ``weight`` in place (maximum with what is there).

    The surface is an ellipsoid whose radius is modulated by a few random spherical harmonics-like
    terms (``roughness`` = relative amplitude), with a one-voxel linear ramp so that the lesion is
    anti-aliased; voxels are weighted by ``allowed`` (the tissue where this lesion can exist).
    """
    radii = np.maximum(np.asarray(radii_vox, dtype=np.float64), 0.35)
    half = np.ceil(radii * (1 + roughness) + 1.5).astype(int)
    lower = np.maximum(center - half, 0)
    upper = np.minimum(center + half + 1, weight.shape)
    if np.any(upper <= lower):
        return
    axes = [(np.arange(lower[a], upper[a]) - center[a]) / radii[a] for a in range(3)]
    dz, dy, dx = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    distance = np.sqrt(dz**2 + dy**2 + dx**2)
    # Bumpy surface: a random combination of low-order angular terms (cheap, smooth, reproducible).
    direction_terms = (dz, dy, dx, dz * dy, dy * dx, dz * dx)
    bump = sum(c * term for c, term in zip(rng.normal(scale=roughness, size=6), direction_terms))
    radial = distance - bump / np.maximum(distance, 1e-6) * 0.5
    mean_radius = float(np.mean(radii))
    local = np.clip((1.0 - radial) * mean_radius + 0.5, 0.0, 1.0)
    box = tuple(slice(int(lower[a]), int(upper[a])) for a in range(3))
    local *= np.clip(allowed[box] * 1.5, 0.0, 1.0)
    np.maximum(weight[box], local.astype(np.float32), out=weight[box])


def _blobs_until(
    weight: np.ndarray,
    ctx: LesionContext,
    rng: np.random.Generator,
    target_ml: float,
    *,
    sample_center: Callable[[], np.ndarray | None],
    radius_mm: tuple[float, float],
    allowed: np.ndarray,
    max_blobs: int,
    elongation: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> None:
    """Add blobs from ``sample_center`` until the lesion volume reaches ``target_ml`` or ``max_blobs``."""
    low, high = radius_mm
    for _ in range(max_blobs):
        if float(weight.sum()) * ctx.voxel_ml >= target_ml:
            break
        center = sample_center()
        if center is None:
            continue
        remaining_ml = max(target_ml - float(weight.sum()) * ctx.voxel_ml, 1e-3)
        # Radius of a ball holding what is left, kept within the pattern's plausible range.
        wanted = (remaining_ml * 1000.0 * 3 / (4 * np.pi)) ** (1 / 3)
        radius = float(np.clip(wanted * rng.uniform(0.5, 1.0), low, high))
        jitter = rng.uniform(0.8, 1.25, size=3)
        add_blob(weight, center, ctx.mm_to_voxels(radius * np.asarray(elongation) * jitter), rng, allowed)


def draw_bgt(ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """Basal ganglia / thalamus: bilateral, roughly mirror-symmetric lesions, sometimes with PLIC involvement."""
    template = ctx.template
    weight = np.zeros(template.shape, np.float32)
    # Confined to the deep grey nuclei and the internal capsule between them.
    allowed = np.clip(template.deep_gm * 1.5 + template.plic, 0.0, 1.0)
    structures = [name for name, p in (("thalamus", 0.9), ("lentiform", 0.7), ("caudate", 0.25)) if rng.random() < p]
    structures = structures or ["thalamus"]

    def pair_center() -> np.ndarray | None:
        region = REGIONS[structures[int(rng.integers(len(structures)))]]
        return _sample_in_region(region, template, rng, allowed)

    def mirrored(index: np.ndarray) -> np.ndarray:
        # Mirror across the template's mid-sagittal plane (x = 0 mm) with a little asymmetry.
        mm = template.index_to_mm(index)
        mm[2] = -mm[2] + rng.normal(scale=2.0)
        return np.clip(np.round(template.mm_to_index(mm)).astype(int), 0, np.array(template.shape) - 1)

    pending: list[np.ndarray] = []

    def next_center() -> np.ndarray | None:
        if pending:
            return pending.pop()
        center = pair_center()
        if center is not None and rng.random() < 0.85:
            pending.append(mirrored(center))
        return center

    _blobs_until(weight, ctx, rng, target_ml, sample_center=next_center, radius_mm=(2.5, 8.0), allowed=allowed, max_blobs=14)
    if rng.random() < 0.5:
        _add_plic(weight, ctx, rng, bilateral=rng.random() < 0.7)
    return weight


def _add_plic(weight: np.ndarray, ctx: LesionContext, rng: np.random.Generator, *, bilateral: bool) -> None:
    template = ctx.template
    allowed = _parenchyma(template)
    sides = [0, 1] if bilateral else [int(rng.integers(2))]
    for side in sides:
        center = _sample_in_region(REGIONS["plic"], template, rng, template.plic + 0.3 * allowed, side=side)
        if center is None:
            continue
        # Elongated along the fibres (superior-inferior), thin across (left-right).
        radii_mm = np.array([rng.uniform(5.0, 9.0), rng.uniform(2.5, 4.0), rng.uniform(1.5, 2.5)])
        add_blob(weight, center, ctx.mm_to_voxels(radii_mm), rng, allowed, roughness=0.15)


def draw_plic(ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """Posterior limb of the internal capsule: thin elongated lesions, one or both sides."""
    weight = np.zeros(ctx.template.shape, np.float32)
    _add_plic(weight, ctx, rng, bilateral=rng.random() < 0.6)
    return weight


def draw_watershed(ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """Border-zone lesions in cortex and subcortical white matter, multifocal."""
    template = ctx.template
    weight = np.zeros(template.shape, np.float32)
    allowed = _parenchyma(template) * (1.0 - template.deep_gm)
    zones = [REGIONS[name] for name in ("watershed_anterior", "watershed_posterior", "watershed_parasagittal")]
    # Most patients have one or two affected border zones, not all of them.
    chosen = [zone for zone in zones if rng.random() < 0.55] or [zones[int(rng.integers(len(zones)))]]

    def center() -> np.ndarray | None:
        return _sample_in_region(chosen[int(rng.integers(len(chosen)))], template, rng, allowed)

    _blobs_until(weight, ctx, rng, target_ml, sample_center=center, radius_mm=(1.5, 6.0), allowed=allowed, max_blobs=24)
    if rng.random() < 0.3:
        _add_punctate(weight, ctx, rng, count=int(rng.integers(2, 6)))
    return weight


def _add_punctate(weight: np.ndarray, ctx: LesionContext, rng: np.random.Generator, *, count: int) -> None:
    template = ctx.template
    allowed = template.wm
    for _ in range(count):
        center = _sample_in_region(REGIONS["central_wm"], template, rng, allowed)
        if center is not None:
            add_blob(weight, center, ctx.mm_to_voxels(rng.uniform(0.8, 1.8, size=3)), rng, allowed, roughness=0.1)


def draw_punctate(ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """A scatter of small white-matter foci; their number grows with the target volume."""
    weight = np.zeros(ctx.template.shape, np.float32)
    typical_ml = 4 / 3 * np.pi * (1.3 * ctx.size_scale) ** 3 / 1000.0
    count = int(np.clip(target_ml / typical_ml, 3, 30))
    _add_punctate(weight, ctx, rng, count=count)
    return weight


def draw_diffuse_wm(ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """Diffuse central white-matter injury: a thresholded smooth random field inside the white matter."""
    from scipy import ndimage

    template = ctx.template
    region = template.region_weight("central_wm", edge_mm=8.0) * np.clip((template.wm - 0.3) / 0.4, 0.0, 1.0)
    region *= 1.0 - template.plic
    sigma = float(ctx.mm_to_voxels(4.0))
    field = ndimage.gaussian_filter(rng.standard_normal(template.shape).astype(np.float32), sigma)
    field /= float(field.std()) + 1e-6
    score = np.where(region > 0.2, field + 1.5 * region, -np.inf)
    target_voxels = max(target_ml / ctx.voxel_ml, 8.0)
    candidates = score[np.isfinite(score)]
    if candidates.size == 0:
        return np.zeros(template.shape, np.float32)
    rank = min(int(target_voxels), candidates.size - 1)
    threshold = np.partition(candidates, candidates.size - 1 - rank)[candidates.size - 1 - rank]
    weight = np.clip((score - threshold) * 2.0 + 0.5, 0.0, 1.0) * np.clip(region * 2.0, 0.0, 1.0)
    return weight.astype(np.float32)


def draw_none(ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """No lesion."""
    return np.zeros(ctx.template.shape, np.float32)


#: Pattern name -> drawing function ``(context, rng, target_ml) -> soft lesion map``.
PATTERN_DRAWERS: dict[str, Callable[[LesionContext, np.random.Generator, float], np.ndarray]] = {
    "none": draw_none,
    "bgt": draw_bgt,
    "watershed": draw_watershed,
    "plic": draw_plic,
    "diffuse_wm": draw_diffuse_wm,
    "punctate": draw_punctate,
}


def draw_lesions(pattern: str, ctx: LesionContext, rng: np.random.Generator, target_ml: float) -> np.ndarray:
    """Soft lesion map of ``pattern`` aiming at about ``target_ml`` of neonatal lesion volume."""
    try:
        drawer = PATTERN_DRAWERS[pattern]
    except KeyError:
        raise ValueError(f"unknown injury pattern {pattern!r}; known: {', '.join(PATTERNS)}") from None
    return drawer(ctx, rng, target_ml)


# --------------------------------------------------------------------------------------------------
# Raters


@dataclass(frozen=True)
class RaterHabit:
    """How one annotator outlines lesions (see the module docstring)."""

    name: str
    #: Lesion fraction (after the acquisition blur) from which a voxel is outlined: below 0.5 a generous
    #: rater includes the partial-volume rim, above it a conservative one keeps the core.
    threshold: float = 0.5
    #: Case-to-case drift of the threshold (standard deviation).
    threshold_sd: float = 0.05
    #: Amplitude of the boundary wobble, in lesion-fraction units, and its correlation length (mm).
    jitter: float = 0.12
    jitter_mm: float = 4.0
    #: Lesions (26-connected label components) under this volume are missed with this probability each.
    miss_below_ml: float = 0.05
    miss_probability: float = 0.0


#: Partial-volume fraction under which no rater draws, whatever the wobble (far from any lesion).
RATER_FLOOR = 0.05


def annotate(lesion: np.ndarray, brain: np.ndarray, habit: RaterHabit, rng: np.random.Generator, spacing: Sequence[float]) -> tuple[np.ndarray, int]:
    """``(label, missed)``: the rater's outline of the partial-volume lesion map on the native grid and
    the number of lesions they missed (``spacing`` in array order, mm)."""
    from bench.data.acquisition import smooth_random_field

    threshold = float(np.clip(habit.threshold + rng.normal(0.0, habit.threshold_sd), 0.2, 0.8))
    candidate = (lesion > RATER_FLOOR) & brain
    if not candidate.any():
        return np.zeros(lesion.shape, bool), 0
    box = _box(candidate, margin=1)
    local = lesion[box]
    wobble = smooth_random_field(rng, local.shape, tuple(habit.jitter_mm / float(s) for s in spacing))[0] * habit.jitter if habit.jitter > 0 else 0.0
    label = np.zeros(lesion.shape, bool)
    label[box] = ((local + wobble) > threshold) & candidate[box]
    if not label.any():
        # The lesion is fainter than the outline threshold everywhere: a rater who sees it outlines
        # its most lesion-like voxels (matters on the coarse test grids only).
        label = (lesion >= 0.5 * float((lesion * brain).max())) & brain
    label, missed = _miss_small(label, habit, rng, spacing)
    return label, missed


def _miss_small(label: np.ndarray, habit: RaterHabit, rng: np.random.Generator, spacing: Sequence[float]) -> tuple[np.ndarray, int]:
    """Drop small lesions with the rater's miss probability; the largest lesion is always kept."""
    import cc3d

    if habit.miss_probability <= 0 or not label.any():
        return label, 0
    components, n = cc3d.connected_components(label.astype(np.uint8), connectivity=26, return_N=True)
    if n < 2:
        return label, 0
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[0] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    small = sizes * voxel_ml < habit.miss_below_ml
    small[int(np.argmax(sizes))] = False
    dropped = small & (rng.random(n + 1) < habit.miss_probability)
    dropped[0] = False
    if not dropped.any():
        return label, 0
    return label & ~dropped[components], int(dropped.sum())


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels (``mask`` must not be empty)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + margin + 1))
    return tuple(box)
