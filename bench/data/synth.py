"""Synthetic neonatal HIE diffusion data that behaves like BONBID-HIE and differs from site to site.

The real cohorts cannot be redistributed, so the benchmark ships a generator instead. What it does, per
case (all of it deterministic for a given ``(seed, case index)``):

1. **Anatomy.** The MNI152 template shipped in the nilearn wheel (:mod:`bench.data.template`) is scaled to
   a neonatal brain (300-560 ml instead of 1.9 l), tilted like a baby's head in the coil and deformed by a
   smooth random field, so no two brains are the same. A second, finer random field is the *residual*
   anatomy that atlas registration would not capture.
2. **ADC.** Tissue-dependent diffusivity in 10^-6 mm^2/s, with neonatal contrast (unmyelinated white
   matter *higher* than grey matter): white matter about 1420, cortex 1180, deep grey 1060, PLIC 980,
   CSF 2900, each varying between babies, plus a smooth regional variation.
3. **Lesions** from the injury patterns of :mod:`bench.data.lesions`, with lesion ADC of 400-850 and a
   lesion volume drawn per site (lognormal; most patients under 1 % of the brain, some without lesion).
4. **Acquisition.** The slice profile blurs the volume across the (thick) slices; the result is sampled on
   the site's grid (in-plane spacing, slice thickness, matrix), multiplied by the site's intensity scale
   and a smooth coil bias field, and given field-strength dependent noise. Outside the brain the ADC is 0
   (skull-stripped), exactly like ``1ADC_ss``.
5. **Z-ADC**, computed as the BONBID-HIE maps are: the ADC is smoothed (2 mm FWHM, inside the brain) and
   compared voxel by voxel with a *normative atlas* (mean and standard deviation of smoothed ADC over
   lesion-free synthetic brains, :func:`build_normative_atlas`), then clipped to +-10; 0 outside the brain.
   Site intensity differences therefore shift the Z-ADC too, as they do when one hospital's data is
   compared with another hospital's atlas.

Sites (:data:`DEFAULT_SITES`) differ in spacing, slice thickness, field strength, noise, bias field,
intensity scale and in their mix of injury patterns and severities. Site D in particular has a lower
intensity scale, a strong bias field and mostly white-matter injury, so leave-one-site-out is measurably
harder than random folds.

Size presets (:data:`SIZE_PRESETS`): ``full`` has realistic grids (128-256 in-plane, 23-60 slices);
``small`` (64 x 64 x 16) is for the CPU demo and ``tiny`` (32 x 32 x 8) for unit tests; both enlarge
lesions so that they survive the coarse grid.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from bench.data.dataset import Dataset
from bench.data.layout import CaseRecord, DatasetWriter, write_case
from bench.data.lesions import LESION_ADC, PATTERNS, VOLUME_FACTOR, LesionContext, draw_lesions
from bench.data.template import AnatomicalTemplate, load_template
from bench.imageio import Geometry

SizeName = Literal["tiny", "small", "full"]

#: Z-ADC smoothing, as in the BONBID-HIE file names (``ADC_smooth2mm_clipped10``): Gaussian, 2 mm FWHM.
ZADC_SMOOTHING_FWHM_MM = 2.0
#: Z-ADC is clipped to +- this value, as in the BONBID-HIE maps.
ZADC_CLIP = 10.0
#: Z-ADC is stored in steps of 1/256 (exact in binary), which keeps the gzip files small.
ZADC_QUANTUM = 1.0 / 256.0
#: Number of lesion-free synthetic brains averaged into the normative atlas.
ATLAS_SUBJECTS = 16
#: Seed of the normative atlas: fixed, like a real atlas, whatever seed the dataset uses.
ATLAS_SEED = 20231
#: The normative cohort varies more than one site's patients (ages at scan, registration quality):
#: between-baby and residual-anatomy standard deviations are this much larger in the atlas.
ATLAS_SPREAD = 1.35


@dataclass(frozen=True)
class SizePreset:
    """Grid size of a generated dataset.

    ``matrix`` / ``n_slices`` = ``None`` keep each site's realistic acquisition grid; otherwise every site
    uses this matrix and slice count, with its field of view multiplied by ``fov_factor`` (cropped to the
    head) and its slices spread over ``coverage_mm``, so sites still differ in spacing.
    """

    name: str
    template_resolution_mm: int
    matrix: int | None = None
    n_slices: int | None = None
    fov_factor: float = 1.0
    coverage_mm: float = 0.0
    #: Linear lesion size factor: coarse grids need bigger lesions for the labels not to vanish.
    lesion_scale: float = 1.0
    atlas_subjects: int = ATLAS_SUBJECTS


SIZE_PRESETS: dict[str, SizePreset] = {
    "tiny": SizePreset("tiny", template_resolution_mm=4, matrix=32, n_slices=8, fov_factor=0.62, coverage_mm=96.0, lesion_scale=2.0, atlas_subjects=8),
    "small": SizePreset("small", template_resolution_mm=3, matrix=64, n_slices=16, fov_factor=0.7, coverage_mm=100.0, lesion_scale=1.4, atlas_subjects=12),
    "full": SizePreset("full", template_resolution_mm=2),
}


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital acquires and what its patients look like.

    Acquisition ranges are sampled per case: the matrix from ``matrix_choices``, in-plane field of view
    from ``fov_mm``, slice spacing from ``slice_mm`` and the slice count from ``n_slices`` (inclusive).
    """

    name: str
    scanner: str
    field_strength_t: float
    matrix_choices: tuple[int, ...]
    fov_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    n_slices: tuple[int, int]
    #: Relative standard deviation of the ADC noise (1.5 T is noisier than 3 T).
    noise: float
    #: Standard deviation of the log coil bias field.
    bias: float
    #: Multiplier of all ADC values (b-values, diffusion times and vendor calibration differ).
    intensity_scale: float
    #: Injury pattern probabilities (``none`` = no lesion); normalised when sampled.
    pattern_weights: Mapping[str, float]
    #: Median lesion volume as a fraction of the brain, and the lognormal spread around it.
    lesion_fraction_median: float
    lesion_fraction_sigma: float = 1.0
    #: Multiplier of lesion ADC: later scans (pseudo-normalisation) show milder lesions.
    lesion_contrast: float = 1.0


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="SiteA",
        scanner="synthetic 3T scanner, vendor A",
        field_strength_t=3.0,
        matrix_choices=(256,),
        fov_mm=(205.0, 225.0),
        slice_mm=(2.2, 2.5),
        n_slices=(48, 60),
        noise=0.05,
        bias=0.03,
        intensity_scale=1.0,
        pattern_weights={"none": 0.12, "bgt": 0.2, "watershed": 0.25, "plic": 0.08, "diffuse_wm": 0.12, "punctate": 0.23},
        lesion_fraction_median=0.008,
    ),
    SiteProfile(
        name="SiteB",
        scanner="synthetic 3T scanner, vendor B",
        field_strength_t=3.0,
        matrix_choices=(128,),
        fov_mm=(230.0, 256.0),
        slice_mm=(3.0, 3.0),
        n_slices=(23, 30),
        noise=0.05,
        bias=0.04,
        intensity_scale=1.04,
        pattern_weights={"none": 0.10, "bgt": 0.35, "watershed": 0.15, "plic": 0.15, "diffuse_wm": 0.10, "punctate": 0.15},
        lesion_fraction_median=0.012,
        lesion_contrast=0.95,
    ),
    SiteProfile(
        name="SiteC",
        scanner="synthetic 1.5T scanner, vendor A",
        field_strength_t=1.5,
        matrix_choices=(160, 192),
        fov_mm=(220.0, 240.0),
        slice_mm=(2.5, 3.0),
        n_slices=(30, 40),
        noise=0.10,
        bias=0.05,
        intensity_scale=0.97,
        pattern_weights={"none": 0.15, "bgt": 0.2, "watershed": 0.25, "plic": 0.1, "diffuse_wm": 0.1, "punctate": 0.2},
        lesion_fraction_median=0.008,
    ),
    SiteProfile(
        name="SiteD",
        scanner="synthetic 3T scanner, vendor C",
        field_strength_t=3.0,
        matrix_choices=(256,),
        fov_mm=(180.0, 190.0),
        slice_mm=(2.5, 3.0),
        n_slices=(36, 48),
        noise=0.07,
        bias=0.08,
        intensity_scale=0.93,
        pattern_weights={"none": 0.10, "bgt": 0.05, "watershed": 0.40, "plic": 0.05, "diffuse_wm": 0.25, "punctate": 0.15},
        lesion_fraction_median=0.011,
        lesion_contrast=1.15,
    ),
)


def _site_name(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return f"Site{letters}"


def site_profiles(n_sites: int, seed: int = 0) -> list[SiteProfile]:
    """The first ``n_sites`` sites: :data:`DEFAULT_SITES`, then random variations of them (seeded)."""
    if n_sites < 1:
        raise ValueError(f"need at least one site, got {n_sites}")
    profiles = list(DEFAULT_SITES[:n_sites])
    for index in range(len(profiles), n_sites):
        rng = np.random.default_rng([seed, 1, index])
        base = DEFAULT_SITES[index % len(DEFAULT_SITES)]
        weights = {name: float(w) for name, w in zip(PATTERNS, rng.dirichlet(np.full(len(PATTERNS), 2.0)))}
        profiles.append(
            replace(
                base,
                name=_site_name(index),
                scanner=f"synthetic {base.field_strength_t:g}T scanner, variant {index}",
                noise=float(base.noise * rng.uniform(0.8, 1.3)),
                bias=float(base.bias * rng.uniform(0.7, 1.5)),
                intensity_scale=float(rng.uniform(0.88, 1.08)),
                pattern_weights=weights,
                lesion_fraction_median=float(base.lesion_fraction_median * rng.uniform(0.7, 1.5)),
            )
        )
    return profiles


# --------------------------------------------------------------------------------------------------
# Smooth random fields


def _bspline_weights(n_out: int, n_control: int) -> np.ndarray:
    """``(n_out, n_control)`` cubic B-spline interpolation matrix spanning the inner control points."""
    position = np.linspace(1.0, n_control - 3.0 - 1e-9, n_out) if n_out > 1 else np.array([1.0])
    base = np.floor(position).astype(int)
    t = position - base
    weights = np.zeros((n_out, n_control))
    rows = np.arange(n_out)
    for offset, w in enumerate(((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)):
        weights[rows, base - 1 + offset] = w
    return weights


def smooth_random_field(
    rng: np.random.Generator, shape: Sequence[int], control_spacing_vox: Sequence[float], n_fields: int = 1
) -> np.ndarray:
    """``n_fields`` smooth Gaussian random fields of unit standard deviation on a grid of ``shape``.

    Random values on a coarse grid (one control point every ``control_spacing_vox`` voxels per axis) are
    interpolated with cubic B-splines. The interpolation is separable, so it costs three small matrix
    products instead of a 3-D filter; each row of the interpolation matrices is divided by its own gain,
    so the standard deviation is one at every voxel. Returns ``(n_fields, *shape)`` float32.
    """
    matrices = []
    for n, spacing in zip(shape, control_spacing_vox):
        n_control = int(np.ceil((n - 1) / max(float(spacing), 1e-6))) + 4
        weights = _bspline_weights(int(n), n_control)
        matrices.append((weights / np.sqrt((weights**2).sum(axis=1, keepdims=True))).astype(np.float32))
    wz, wy, wx = matrices
    control = rng.standard_normal((n_fields, wz.shape[1], wy.shape[1], wx.shape[1])).astype(np.float32)
    # One axis at a time, with plain matrix products: x, then y, then z.
    fields = np.matmul(np.matmul(wy, control @ wx.T).reshape(n_fields, wz.shape[1], -1).transpose(0, 2, 1), wz.T)
    return np.ascontiguousarray(fields.transpose(0, 2, 1)).reshape(n_fields, *(int(n) for n in shape))


class TrilinearSampler:
    """Linear interpolation of several template volumes at one set of (fractional) template indices.

    Weights and corner indices are computed once; every volume is then a weighted sum of eight 1-D
    gathers, about twice as fast as one ``scipy.ndimage.map_coordinates`` call per
    volume. Indices outside the grid are clamped to the edge (the template has an empty margin,
    so brain and lesion maps are 0 there and the ADC map holds fluid).
    """

    def __init__(self, coords: np.ndarray, grid_shape: Sequence[int]):
        self.out_shape = tuple(coords.shape[1:])
        self.grid_shape = tuple(int(n) for n in grid_shape)
        flat = coords.reshape(3, -1)
        base = np.zeros(flat.shape[1], np.int32)
        self.fractions = []
        for axis, n in enumerate(self.grid_shape):
            clamped = np.clip(flat[axis], 0.0, n - 1.0)
            lower = np.minimum(clamped.astype(np.int32), n - 2)
            self.fractions.append((clamped - lower).astype(np.float32))
            base *= n
            base += lower
        self.base = base
        ny, nx = self.grid_shape[1], self.grid_shape[2]
        self.strides = (ny * nx, nx, 1)

    def sample(self, *volumes: np.ndarray) -> list[np.ndarray]:
        """Interpolated values of each volume (all on ``grid_shape``), each shaped like the coordinates."""
        flats = [np.asarray(v, np.float32).ravel() for v in volumes]
        results = [np.zeros(self.base.size, np.float32) for _ in volumes]
        gathered = np.empty(self.base.size, np.float32)
        weight = np.empty(self.base.size, np.float32)
        index = np.empty_like(self.base)
        fz, fy, fx = self.fractions
        for dz in (0, 1):
            wz = fz if dz else 1.0 - fz
            for dy in (0, 1):
                wzy = wz * (fy if dy else 1.0 - fy)
                for dx in (0, 1):
                    np.multiply(wzy, fx if dx else 1.0 - fx, out=weight)
                    np.add(self.base, dz * self.strides[0] + dy * self.strides[1] + dx, out=index)
                    # 1-D takes into a reused buffer are the fastest gather numpy offers.
                    for flat, result in zip(flats, results):
                        np.take(flat, index, out=gathered)
                        gathered *= weight
                        result += gathered
        return [result.reshape(self.out_shape) for result in results]


# --------------------------------------------------------------------------------------------------
# Tissue model and normative atlas


@dataclass(frozen=True)
class TissueADC:
    """Mean diffusivity of each tissue of one baby, 10^-6 mm^2/s (before the site's scale)."""

    white_matter: float
    cortex: float
    deep_grey: float
    plic: float
    csf: float

    @classmethod
    def sample(cls, rng: np.random.Generator, spread: float = 1.0) -> "TissueADC":
        """One baby's values; ``spread`` scales the between-baby standard deviations."""
        # Normal term neonates: unmyelinated white matter diffuses more than grey matter.
        return cls(
            white_matter=float(rng.normal(1420.0, 70.0 * spread)),
            cortex=float(rng.normal(1180.0, 50.0 * spread)),
            deep_grey=float(rng.normal(1060.0, 45.0 * spread)),
            plic=float(rng.normal(980.0, 40.0 * spread)),
            csf=float(rng.normal(2900.0, 150.0 * spread)),
        )


def tissue_adc_map(template: AnatomicalTemplate, tissue: TissueADC, rng: np.random.Generator) -> np.ndarray:
    """Lesion-free ADC on the template grid; the background holds CSF diffusivity (extra-axial fluid),
    so that interpolation at the brain surface mixes tissue with fluid, never with zero."""
    grey = tissue.cortex * (1.0 - template.deep_gm) + tissue.deep_grey * template.deep_gm
    white = tissue.white_matter * (1.0 - template.plic) + tissue.plic * template.plic
    # deep_gm covers the whole nucleus (grey and white parts), so the deep value applies to both.
    white = white * (1.0 - template.deep_gm) + tissue.deep_grey * template.deep_gm
    parenchyma = template.gm * grey + template.wm * white
    adc = parenchyma + (1.0 - template.gm - template.wm) * tissue.csf
    # Regional variation (e.g. frontal vs occipital white matter) of a few percent.
    spacing = 40.0 / template.resolution_mm
    regional = smooth_random_field(rng, template.shape, (spacing,) * 3)[0]
    return (adc * (1.0 + 0.03 * regional)).astype(np.float32)


def _slice_profile_sigma(template: AnatomicalTemplate, neonatal_scale: float, acquired_spacing: Sequence[float]) -> tuple[float, ...]:
    """Gaussian sigma (template voxels) of the acquisition's point spread: one slice thickness across
    slices, one acquired pixel in-plane (full width at half maximum)."""
    return tuple(float(f) / 2.3548 / neonatal_scale / template.resolution_mm for f in acquired_spacing)


def _masked_smooth(values: np.ndarray, mask: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Gaussian smoothing inside ``mask`` only (normalised convolution), so the background does not bleed in."""
    from scipy import ndimage

    weights = ndimage.gaussian_filter(mask.astype(np.float32), sigma, mode="constant")
    smoothed = ndimage.gaussian_filter(np.where(mask, values, 0.0).astype(np.float32), sigma, mode="constant")
    return smoothed / np.maximum(weights, 1e-3)


@dataclass(frozen=True)
class NormativeAtlas:
    """Per-voxel mean and standard deviation of smoothed ADC in healthy (synthetic) neonates, template grid."""

    mean: np.ndarray
    std: np.ndarray
    n_subjects: int


@dataclass(frozen=True)
class _Anatomy:
    """Per-brain sampled anatomy: scale to neonate, head pose and random deformation amplitudes."""

    neonatal_scale: float
    axis_scale: np.ndarray
    rotation: np.ndarray


def _residual_displacement(rng: np.random.Generator, shape: Sequence[int], spacing_vox: Sequence[float], amplitude_vox: float) -> np.ndarray:
    return smooth_random_field(rng, shape, spacing_vox, n_fields=3) * amplitude_vox


#: Residual (unregistered) anatomical variation: about 1.5 neonatal mm, correlation length 12 mm.
RESIDUAL_AMPLITUDE_MM = 1.5
RESIDUAL_SPACING_MM = 12.0
#: Large-scale shape variation beyond the affine part: about 3 neonatal mm over 30 mm.
SHAPE_AMPLITUDE_MM = 3.0
SHAPE_SPACING_MM = 30.0
NOMINAL_NEONATAL_SCALE = 0.6
#: In-plane resolution at which DWI is acquired before the scanner interpolates it to the stored matrix.
ACQUIRED_INPLANE_MM = 1.6


def _atlas_subject(resolution_mm: int, n_subjects: int, subject: int) -> np.ndarray:
    """Smoothed ADC of one lesion-free synthetic brain on the template grid (one atlas contributor)."""
    from scipy import ndimage

    template = load_template(resolution_mm)
    rng = np.random.default_rng([ATLAS_SEED, resolution_mm, n_subjects, subject])
    to_vox = 1.0 / (NOMINAL_NEONATAL_SCALE * template.resolution_mm)
    adc = tissue_adc_map(template, TissueADC.sample(rng, spread=ATLAS_SPREAD), rng)
    adc = ndimage.gaussian_filter(adc, _slice_profile_sigma(template, NOMINAL_NEONATAL_SCALE, (2.5, 1.6, 1.6)))
    amplitude = ATLAS_SPREAD * RESIDUAL_AMPLITUDE_MM * to_vox
    warp = _residual_displacement(rng, template.shape, (RESIDUAL_SPACING_MM * to_vox,) * 3, amplitude)
    warp += np.indices(template.shape, dtype=np.float32)
    (adc,) = TrilinearSampler(warp, template.shape).sample(adc)
    adc *= 1.0 + 0.06 * rng.standard_normal(template.shape, dtype=np.float32)
    return _masked_smooth(adc, template.brain > 0.5, (ZADC_SMOOTHING_FWHM_MM / 2.3548 * to_vox,) * 3)


#: Memo of :func:`build_normative_atlas` (a pure function of its arguments, costly to rebuild).
_ATLAS_MEMO: dict[tuple[int, int], NormativeAtlas] = {}


def build_normative_atlas(resolution_mm: int, n_subjects: int = ATLAS_SUBJECTS, *, workers: int = 1) -> NormativeAtlas:
    """Normative ADC atlas on the template grid, from ``n_subjects`` lesion-free synthetic brains.

    Each brain has its own tissue diffusivities, regional variation, residual anatomy (a small random
    warp) and noise; its ADC is smoothed like the Z-ADC input (2 mm FWHM inside the brain). The standard
    deviation is floored at 4 % of the mean so a small cohort never gives near-zero denominators. The atlas
    has a fixed seed (it plays the role of a published atlas), does not depend on ``workers``, and is
    memoised per process.
    """
    from scipy import ndimage

    key = (int(resolution_mm), int(n_subjects))
    if key in _ATLAS_MEMO:
        return _ATLAS_MEMO[key]
    template = load_template(resolution_mm)
    if workers > 1:
        with _process_pool(workers) as pool:
            subjects = list(pool.map(_atlas_subject, [key[0]] * n_subjects, [key[1]] * n_subjects, range(n_subjects)))
    else:
        subjects = [_atlas_subject(key[0], key[1], j) for j in range(n_subjects)]
    stack = np.stack(subjects).astype(np.float64)
    mean = stack.mean(axis=0)
    std = stack.std(axis=0, ddof=1) if n_subjects > 1 else np.zeros_like(mean)
    std = ndimage.gaussian_filter(std, 1.0)
    # Outside the atlas brain (where a subject's brain may still reach), use the nearest brain voxel's values.
    valid = ndimage.binary_dilation(template.brain > 0.5, iterations=2) & (mean > 0)
    nearest = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    mean, std = mean[tuple(nearest)], std[tuple(nearest)]
    std = np.maximum(std, 0.04 * mean)
    atlas = NormativeAtlas(mean=mean.astype(np.float32), std=std.astype(np.float32), n_subjects=n_subjects)
    atlas.mean.setflags(write=False)
    atlas.std.setflags(write=False)
    _ATLAS_MEMO[key] = atlas
    return atlas


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes forked from this one, so they inherit the loaded template and atlas for free."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init)


# --------------------------------------------------------------------------------------------------
# One case


@dataclass(frozen=True)
class CaseSpec:
    """Everything needed to generate one case; picklable, so it can travel to a worker process."""

    case_id: str
    index: int
    seed: int
    site: SiteProfile
    preset: SizePreset


@dataclass
class SyntheticCase:
    """A generated case in native space, before it is written."""

    case_id: str
    site: str
    adc: np.ndarray
    zadc: np.ndarray
    label: np.ndarray
    geometry: Geometry
    metadata: dict[str, object] = field(default_factory=dict)


def _unit_product(factors: np.ndarray) -> np.ndarray:
    """Per-axis factors rescaled to a product of one: they change the head's shape, not its volume."""
    return factors / np.prod(factors) ** (1 / 3)


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix in (S, A, R) axes from angles about S (yaw), A (roll) and R (pitch)."""
    a, b, c = np.deg2rad(angles_deg)
    about_s = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    about_a = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    about_r = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return about_s @ about_a @ about_r


def _acquisition_grid(site: SiteProfile, preset: SizePreset, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Shape and spacing (z, y, x) of one acquisition."""
    fov = rng.uniform(*site.fov_mm)
    thickness = float(np.round(rng.uniform(*site.slice_mm), 1))
    if preset.matrix is None:
        matrix = int(site.matrix_choices[int(rng.integers(len(site.matrix_choices)))])
        n_slices = int(rng.integers(site.n_slices[0], site.n_slices[1] + 1))
    else:
        matrix, n_slices = preset.matrix, int(preset.n_slices or 8)
        fov *= preset.fov_factor
        thickness = preset.coverage_mm / n_slices * thickness / 2.6
    inplane = round(fov / matrix, 4)
    return (n_slices, matrix, matrix), (round(thickness, 4), inplane, inplane)


def _native_to_template(anatomy: _Anatomy, template: AnatomicalTemplate) -> tuple[np.ndarray, np.ndarray]:
    """Affine part of the native -> template mapping: ``index_t = M @ (p - head_center) + b``.

    ``p`` is a native physical point in array order (z, y, x) with identity direction, i.e. (superior,
    posterior, left) in LPS; the template axes are (superior, anterior, right), hence the sign flip.
    """
    flip = np.diag([1.0, -1.0, -1.0])
    linear = anatomy.rotation @ np.diag(1.0 / (anatomy.neonatal_scale * anatomy.axis_scale)) @ flip
    matrix = linear / template.resolution_mm
    offset = template.mm_to_index(template.brain_center_sar)
    return matrix, offset


def synthesize_case(spec: CaseSpec) -> SyntheticCase:
    """Generate one case (anatomy, lesions, acquisition, Z-ADC) in memory."""
    from scipy import ndimage

    preset, site = spec.preset, spec.site
    template = load_template(preset.template_resolution_mm)
    atlas = build_normative_atlas(preset.template_resolution_mm, preset.atlas_subjects)
    rng = np.random.default_rng([spec.seed, 0, spec.index])

    # --- anatomy and pose
    brain_ml = float(np.clip(rng.normal(420.0, 55.0), 300.0, 560.0))
    anatomy = _Anatomy(
        neonatal_scale=(brain_ml / template.brain_volume_ml) ** (1 / 3),
        axis_scale=_unit_product(np.clip(1.0 + rng.normal(0.0, 0.04, size=3), 0.9, 1.1)),
        rotation=_rotation(rng.normal(0.0, (6.0, 4.0, 8.0))),
    )
    shape, spacing = _acquisition_grid(site, preset, rng)
    spacing_arr = np.asarray(spacing)
    origin = -(np.asarray(shape) - 1) / 2.0 * spacing_arr
    head_center = rng.normal(0.0, (3.0, 4.0, 4.0))

    # --- tissue and lesions on the template grid
    tissue = TissueADC.sample(rng)
    adc_t = tissue_adc_map(template, tissue, rng)
    weights = {k: v for k, v in site.pattern_weights.items() if v > 0}
    names = sorted(weights)
    probabilities = np.array([weights[n] for n in names])
    pattern = names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]
    fraction = float(np.clip(site.lesion_fraction_median * VOLUME_FACTOR.get(pattern, 1.0) * np.exp(rng.normal(0.0, site.lesion_fraction_sigma)), 3e-4, 0.2))
    context = LesionContext(template, anatomy.neonatal_scale, size_scale=preset.lesion_scale)
    lesion_t = draw_lesions(pattern, context, rng, target_ml=fraction * brain_ml)
    if pattern != "none":
        lesion_adc = rng.uniform(*LESION_ADC[pattern]) * site.lesion_contrast
        texture = smooth_random_field(rng, template.shape, (3.0,) * 3)[0]
        adc_t = adc_t * (1.0 - lesion_t) + lesion_t * lesion_adc * (1.0 + 0.05 * texture)
    # DWI is acquired on a coarser in-plane grid than it is reconstructed on (e.g. 128 -> 256 matrix).
    factor = max(1, int(round(ACQUIRED_INPLANE_MM / spacing[1]))) if preset.matrix is None else 1
    acquired_spacing = spacing_arr * (1, factor, factor)
    profile = _slice_profile_sigma(template, anatomy.neonatal_scale, acquired_spacing)
    adc_t = ndimage.gaussian_filter(adc_t, profile)
    lesion_t = ndimage.gaussian_filter(lesion_t, profile) if pattern != "none" else lesion_t

    # --- sample the template on the acquisition grid, inside the box that can contain brain
    matrix, offset = _native_to_template(anatomy, template)
    lower, upper = _brain_box(anatomy, template, matrix, offset, head_center, shape, spacing_arr, origin)
    box_shape = tuple(int(v) for v in upper - lower)
    acquired_shape = (box_shape[0], -(-box_shape[1] // factor), -(-box_shape[2] // factor))
    # Physical position (relative to the head centre) of each acquired sample, per axis; acquired
    # pixel j covers reconstructed pixels j*factor .. j*factor + factor - 1.
    steps = (1, factor, factor)
    axes = [
        origin[a] + spacing_arr[a] * (lower[a] + steps[a] * np.arange(acquired_shape[a]) + (steps[a] - 1) / 2.0) - head_center[a]
        for a in range(3)
    ]
    coords = np.empty((3, *acquired_shape), np.float32)
    for i in range(3):
        coords[i] = (
            matrix[i, 0] * axes[0][:, None, None] + matrix[i, 1] * axes[1][None, :, None] + matrix[i, 2] * axes[2][None, None, :] + offset[i]
        )
    to_vox = 1.0 / (anatomy.neonatal_scale * template.resolution_mm)
    coords += _residual_displacement(rng, acquired_shape, SHAPE_SPACING_MM / acquired_spacing, SHAPE_AMPLITUDE_MM * to_vox)
    atlas_mean, atlas_std = TrilinearSampler(coords, template.shape).sample(atlas.mean, atlas.std)
    coords += _residual_displacement(rng, acquired_shape, RESIDUAL_SPACING_MM / acquired_spacing, RESIDUAL_AMPLITUDE_MM * to_vox)
    brain_p, adc_clean, lesion = TrilinearSampler(coords, template.shape).sample(template.brain, adc_t, lesion_t)
    del coords

    # --- acquisition: site scale, coil bias and noise on the acquired grid, then reconstruction
    bias = np.exp(site.bias * smooth_random_field(rng, acquired_shape, 80.0 / acquired_spacing)[0])
    noise = rng.standard_normal(acquired_shape, dtype=np.float32)
    adc = adc_clean * (site.intensity_scale * bias * (1.0 + site.noise * noise))
    upsample = _InplaneUpsampler(box_shape, factor)
    adc, brain_p, lesion, atlas_mean, atlas_std = (upsample(v) for v in (adc, brain_p, lesion, atlas_mean, atlas_std))
    brain = brain_p > 0.5
    adc = np.where(brain, np.clip(np.round(adc), 1.0, 4000.0), 0.0).astype(np.float32)

    # --- Z-ADC against the normative atlas
    smoothed = _masked_smooth(adc, brain, ZADC_SMOOTHING_FWHM_MM / 2.3548 / spacing_arr)
    zadc = (smoothed - atlas_mean) / atlas_std
    zadc = np.where(brain, np.clip(zadc, -ZADC_CLIP, ZADC_CLIP), 0.0)
    zadc = (np.round(zadc / ZADC_QUANTUM) * ZADC_QUANTUM).astype(np.float32)

    label = (lesion > 0.5) & brain
    if pattern != "none" and not label.any() and (lesion * brain).max() > 0:
        # A lesion smaller than the grid can resolve: keep its most lesion-like voxels so that a case
        # drawn with a pattern never ends up unlabeled (only matters on the coarse test presets).
        label = (lesion >= 0.5 * (lesion * brain).max()) & brain

    def embed(box: np.ndarray, dtype: type) -> np.ndarray:
        full = np.zeros(shape, dtype)
        full[tuple(slice(int(lo), int(hi)) for lo, hi in zip(lower, upper))] = box
        return full

    geometry = Geometry(shape=shape, spacing=spacing, origin=tuple(float(v) for v in np.round(origin, 4)))
    return SyntheticCase(
        case_id=spec.case_id,
        site=site.name,
        adc=embed(adc, np.float32),
        zadc=embed(zadc, np.float32),
        label=embed(label, np.uint8),
        geometry=geometry,
        metadata={
            "scanner": site.scanner,
            "field_strength_t": site.field_strength_t,
            "pattern": pattern if label.any() else "none",
        },
    )


def _brain_box(
    anatomy: _Anatomy,
    template: AnatomicalTemplate,
    matrix: np.ndarray,
    offset: np.ndarray,
    head_center: np.ndarray,
    shape: Sequence[int],
    spacing: np.ndarray,
    origin: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Index range (lower, upper) of the native grid that can contain brain: the template's brain
    bounding box, grown by the largest plausible deformation, mapped through the inverse affine."""
    margin = 3 * (SHAPE_AMPLITUDE_MM + RESIDUAL_AMPLITUDE_MM) / (anatomy.neonatal_scale * template.resolution_mm)
    low, high = (template.mm_to_index(b) for b in template.brain_bounds_sar)
    corners = np.array([np.where(np.array(bits) == 0, low - margin, high + margin) for bits in np.ndindex(2, 2, 2)])
    native = (corners - offset) @ np.linalg.inv(matrix).T + head_center
    index = (native - origin) / spacing
    shape_arr = np.asarray(shape)
    lower = np.clip(np.floor(index.min(axis=0)).astype(int), 0, shape_arr)
    upper = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, shape_arr)
    if np.any(upper <= lower):
        raise RuntimeError("the brain falls outside the field of view")
    return lower, upper


class _InplaneUpsampler:
    """Linear interpolation from the acquired in-plane grid (every ``factor``-th pixel) to the
    reconstructed one (what the scanner's zero-filled reconstruction approximates)."""

    def __init__(self, box_shape: Sequence[int], factor: int):
        self.factor = factor
        self.axes = [_linear_interpolation_weights(int(n), factor) for n in box_shape[1:]]

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        if self.factor == 1:
            return volume
        for axis, (lower, fraction) in zip((1, 2), self.axes):
            shape = [1, 1, 1]
            shape[axis] = -1
            weight = fraction.reshape(shape)
            volume = np.take(volume, lower, axis=axis) * (1.0 - weight) + np.take(volume, lower + 1, axis=axis) * weight
        return volume.astype(np.float32, copy=False)


def _linear_interpolation_weights(n_out: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n_out`` pixels, the acquired pixel below it and the interpolation fraction, acquired
    pixel ``j`` being centred on reconstructed pixel ``j*factor + (factor-1)/2`` (edges clamped)."""
    n_in = -(-n_out // factor)
    position = np.clip((np.arange(n_out) - (factor - 1) / 2.0) / factor, 0.0, max(n_in - 1.0, 0.0))
    if n_in == 1:
        return np.zeros(n_out, int), np.zeros(n_out, np.float32)
    lower = np.minimum(np.floor(position).astype(int), n_in - 2)
    return lower, (position - lower).astype(np.float32)


def _generate_and_write(spec: CaseSpec, root: Path) -> CaseRecord:
    case = synthesize_case(spec)
    return write_case(root, case.case_id, case.site, (case.adc, case.zadc), case.label, case.geometry, case.metadata)


def _worker_init() -> None:
    # One process per core: keep ITK from starting its own thread pool in every worker.
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def plan_cases(cases: int, sites: int, seed: int, size: SizeName | str) -> list[CaseSpec]:
    """The cases a call will generate: ``cases`` split as evenly as possible over ``sites`` sites."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZE_PRESETS)}")
    if cases < sites:
        raise ValueError(f"need at least one case per site: {cases} cases for {sites} sites")
    profiles = site_profiles(sites, seed)
    preset = SIZE_PRESETS[size]
    specs: list[CaseSpec] = []
    for site_index, profile in enumerate(profiles):
        count = cases // sites + (1 if site_index < cases % sites else 0)
        for number in range(1, count + 1):
            specs.append(CaseSpec(f"{profile.name}_{number:03d}", len(specs), seed, profile, preset))
    return specs


def generate_synthetic_dataset(
    out: str | Path,
    *,
    cases: int = 60,
    sites: int = 4,
    seed: int = 0,
    size: SizeName | str = "full",
    workers: int | None = None,
    overwrite: bool = False,
    folds: int = 5,
    split_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Generate a synthetic HIE dataset at ``out`` (written atomically) and return it.

    Args:
        out: dataset folder to create (its name is the dataset name).
        cases: number of cases, split evenly over the sites.
        sites: number of sites (the first four are :data:`DEFAULT_SITES`).
        seed: generation seed; the same seed gives byte-identical images whatever ``workers`` is.
        size: ``"tiny"``, ``"small"`` or ``"full"`` (see :data:`SIZE_PRESETS`).
        workers: processes to use (default: one per CPU core, at most 8; 1 generates in this process).
        overwrite: replace an existing dataset at ``out``.
        folds: number of k-fold splits stored in ``splits.json``.
        split_seed: seed of the stored k-fold splits.
        progress: called as ``progress(done, total)`` after each case.
    """
    specs = plan_cases(cases, sites, seed, size)
    preset = SIZE_PRESETS[size]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(specs)))
    # Build the shared template and atlas once here; forked or inline workers reuse the memoised copy.
    load_template(preset.template_resolution_mm)
    build_normative_atlas(preset.template_resolution_mm, preset.atlas_subjects, workers=workers)
    description = (
        f"Synthetic neonatal HIE diffusion MRI (ADC, Z-ADC) generated by HIE-Bench: {cases} cases, {sites} sites, "
        f"seed {seed}, size {size}."
    )
    generator = {"name": "hie-bench synth", "cases": cases, "sites": sites, "seed": seed, "size": size}
    with DatasetWriter(out, channel_names=("ADC", "Z-ADC"), description=description, overwrite=overwrite, extra={"generator": generator}) as writer:
        if workers == 1:
            for done, spec in enumerate(specs, start=1):
                writer.add(_generate_and_write(spec, writer.root))
                if progress:
                    progress(done, len(specs))
        else:
            with _process_pool(workers) as pool:
                futures = [pool.submit(_generate_and_write, spec, writer.root) for spec in specs]
                for done, future in enumerate(futures, start=1):
                    writer.add(future.result())
                    if progress:
                        progress(done, len(specs))
        return writer.commit(folds=folds, split_seed=split_seed)


def timed_generation(out: str | Path, **kwargs) -> tuple[Dataset, float]:
    """:func:`generate_synthetic_dataset` plus its wall-clock time in seconds."""
    start = time.perf_counter()
    dataset = generate_synthetic_dataset(out, **kwargs)
    return dataset, time.perf_counter() - start
