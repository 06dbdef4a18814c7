"""Synthetic neonatal HIE diffusion data that behaves like BONBID-HIE and differs from site to site.

The real cohorts cannot be redistributed, so the benchmark ships a generator instead. What it does, per
case (all of it deterministic for a given ``(seed, case index)``, whatever the number of workers):

1. **Anatomy.** The MNI152 template shipped in the nilearn wheel (:mod:`bench.data.template`) is scaled to
   a neonatal brain (300-560 ml instead of 1.9 l), tilted like a baby's head in the coil and deformed by a
   smooth random field, so no two brains are the same. A second, finer random field is the *residual*
   anatomy that atlas registration would not capture.
2. **Tissue.** Tissue-dependent diffusivity in 10^-6 mm^2/s, with neonatal contrast (unmyelinated white
   matter *higher* than grey matter), each value varying between babies, plus a smooth regional
   variation; and the T2-weighted b = 0 signal of each tissue (:data:`TISSUE_S0`).
3. **Lesions** from the injury patterns of :mod:`bench.data.lesions`, with lesion ADC of 400-850 (milder
   on later scans: pseudo-normalisation) and a lesion volume drawn per site (lognormal; most patients
   under 1 % of the brain, some without lesion).
4. **Acquisition** in the signal domain (:mod:`bench.data.acquisition`): the b = 0 and b = 1000 signals
   are mixed within voxels (partial volume acts on signals, not on ADC), blurred by the slice profile,
   sampled on the site's acquisition grid (about 1.6 mm in-plane, interpolated to the stored matrix as
   scanners do), moved by the site's EPI distortion and slice-wise motion, given Rician magnitude noise
   on every image, and turned into ``ADC = ln(S0 / S_b) / b``. The site's b-value calibration and
   gradient non-linearity scale the apparent ADC. Outside the brain the ADC is 0 (skull-stripped),
   exactly like ``1ADC_ss``.
5. **Z-ADC**, computed as the BONBID-HIE maps are: the ADC is smoothed (2 mm FWHM, inside the brain) and
   compared voxel by voxel with a *normative atlas* built from a **separate normative population**
   (:func:`build_normative_atlas`: lesion-free synthetic babies with their own anatomy, tissue values
   and noise, averaged in template space), which is **registered imperfectly** to each case (a small
   random affine error, only part of the case's non-linear shape recovered, none of its distortion or
   motion), then clipped to +-10; 0 outside the brain. Z-ADC therefore has false positives where
   tissue boundaries and CSF do not line up, and a site whose intensity differs from the atlas
   population has shifted Z-ADC, as when one hospital's data is compared with another hospital's atlas.
6. **Labels** are a rater's outline (:func:`bench.data.lesions.annotate`): the site's raters differ in
   threshold, their outlines wobble, and they miss some small lesions.
7. **Headers.** Each case is stored in one of its site's orientations (LPS, RAS, LAS or an oblique grid,
   :func:`bench.data.acquisition.store_oriented`), written into the image headers.

Sites (:data:`DEFAULT_SITES`) differ in spacing, slice thickness, field strength (SNR), bias, intensity
scale and tissue contrast, EPI artefacts, orientation, raters, and their mix of injury patterns and
severities. Site D in particular has a lower intensity scale, a different tissue contrast, the
strongest bias field, milder (later, pseudo-normalising) lesions and mostly watershed / white-matter
injury, so leave-one-site-out is measurably harder than random folds (see ``docs/datasets.md``).

Cohort presets (:data:`COHORT_PRESETS`): ``bonbid2023`` is one hospital shaped like BONBID-HIE 2023
(85 training and 44 test cases, the test cases stored as the holdout split).

Size presets (:data:`SIZE_PRESETS`): ``full`` has realistic grids (128-256 in-plane, 16-64 slices);
``small`` (64 x 64 x 16) is for the CPU demo and ``tiny`` (32 x 32 x 8) for unit tests; both enlarge
lesions so that they survive the coarse grid.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

from bench.data.acquisition import (
    ADC_STORED_RANGE,
    DISTORTION_SCALE_MM,
    EpiArtefacts,
    SignalProtocol,
    acquire_adc,
    choose,
    diffusion_weighted,
    slice_motion_mm,
    smooth_random_field,  # also re-exported: callers and tests used to find it here
    store_oriented,
)
from bench.data.dataset import Dataset
from bench.data.layout import CaseRecord, DatasetWriter, write_case
from bench.data.lesions import LESION_ADC, PATTERNS, VOLUME_FACTOR, LesionContext, RaterHabit, annotate, draw_lesions
from bench.data.template import AnatomicalTemplate, load_template
from bench.imageio import Geometry

SizeName = Literal["tiny", "small", "full"]

#: Z-ADC smoothing, as in the BONBID-HIE file names (``ADC_smooth2mm_clipped10``): Gaussian, 2 mm FWHM.
ZADC_SMOOTHING_FWHM_MM = 2.0
#: Z-ADC is clipped to +- this value, as in the BONBID-HIE maps.
ZADC_CLIP = 10.0
#: Z-ADC is stored in steps of 1/256 (exact in binary), which keeps the gzip files small.
ZADC_QUANTUM = 1.0 / 256.0
#: Licence note written into ``dataset.json`` of generated datasets.
SYNTHETIC_LICENCE = (
    "Synthetic data generated by HIE-Bench (no patient data). Anatomy derived from the MNI ICBM152 2009a "
    "template as distributed with nilearn (copyright McConnell Brain Imaging Centre, permissive licence)."
)
#: Number of lesion-free synthetic brains averaged into the normative atlas (full size).
ATLAS_SUBJECTS = 20
#: Seed of the normative population: its own stream, fixed like a published atlas, whatever the dataset seed.
ATLAS_SEED = 20231
#: The normative cohort varies more than one site's patients (ages at scan): between-baby standard
#: deviations of tissue diffusivity are this much larger in the atlas population.
ATLAS_SPREAD = 1.0
#: b = 0 SNR of white matter in the normative cohort's acquisitions (a 3 T research protocol).
ATLAS_SNR_B0 = 30.0
#: Acquired voxel of the normative cohort (slice, in-plane, in-plane; neonatal mm): sets its blur and noise.
ATLAS_VOXEL_MM = (2.5, 1.6, 1.6)
#: Share of a patient's large-scale (non-affine) anatomical variation that the registration of the
#: atlas into the case recovers; the rest, and all of the fine residual anatomy, stays misaligned.
#: Thick-slice, noisy ADC with lesions has little reliable structure to register on.
REGISTRATION_CAPTURE = 0.4
#: The atlas itself is built by group-wise deformable registration of good normal scans: it recovers
#: most of each normal baby's large-scale shape and part of its fine residual anatomy. Its standard
#: deviation is therefore smaller at tissue boundaries than a patient's misalignment there.
ATLAS_BUILD_CAPTURE = 0.7
ATLAS_RESIDUAL_FRACTION = 0.8
#: Affine registration error of the atlas in each case: rotation (degrees), translation (mm) and
#: per-axis scale (relative) standard deviations.
REGISTRATION_ROTATION_SD_DEG = 2.0
REGISTRATION_SHIFT_SD_MM = 1.5
REGISTRATION_SCALE_SD = 0.015
#: T2-weighted b = 0 signal of each tissue relative to white matter (TE ~ 90 ms, long TR): neonatal
#: unmyelinated white matter has a long T2 (~250-300 ms), grey matter shorter (~150-180 ms), the
#: myelinating PLIC shorter still; CSF (T2 > 1 s) is brightest. Only noise and partial-volume mixing
#: depend on it: S0 cancels in the ADC ratio.
TISSUE_S0 = {"white_matter": 1.0, "cortex": 0.8, "deep_grey": 0.72, "plic": 0.66, "csf": 1.35}
#: Acute HIE lesions have a mildly prolonged T2 (oedema): their S0 relative to the tissue they replace.
LESION_S0_FACTOR = 1.1
#: Water self-diffusion falls by about 2.4 % per degree Celsius near body temperature; a baby scanned
#: during therapeutic hypothermia (33.5 C, 3.5 C below normal) has every ADC about 8 % lower than the
#: normothermic normative population -- a brain-wide negative Z-ADC shift.
ADC_TEMPERATURE_COEFFICIENT = 0.024
HYPOTHERMIA_DELTA_C = 3.5
#: Coil receive sensitivity: standard deviation of its log over the head (it scales S0 and S_b alike,
#: so it cancels in the ADC but shapes the local SNR) and its correlation length (mm).
RECEIVE_FIELD_SD = 0.15
RECEIVE_FIELD_MM = 60.0
#: Room (mm) left around the brain box for EPI distortion and motion: the same for every site, so that a
#: site with and without artefacts samples the same box (and draws the same anatomy).
ARTEFACT_MARGIN_MM = 8.0
#: Correlation length (mm) of the gradient non-linearity / b-value error field (the site's ``bias``).
BIAS_FIELD_MM = 80.0


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
    "tiny": SizePreset("tiny", template_resolution_mm=4, matrix=32, n_slices=8, fov_factor=0.68, coverage_mm=96.0, lesion_scale=2.0, atlas_subjects=8),
    "small": SizePreset("small", template_resolution_mm=3, matrix=64, n_slices=16, fov_factor=0.75, coverage_mm=100.0, lesion_scale=1.4, atlas_subjects=12),
    "full": SizePreset("full", template_resolution_mm=2),
}


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital acquires, annotates, and what its patients look like.

    Acquisition ranges are sampled per case: the matrix from ``matrix_choices`` (repeat an entry to make
    it likelier), the in-plane field of view from ``fov_mm``, the slice spacing from ``slice_choices``
    when given (else uniformly from ``slice_mm``), and the slice count from ``coverage_mm`` divided by
    the slice spacing when given (else uniformly from ``n_slices``), always within ``n_slices``.
    """

    name: str
    scanner: str
    field_strength_t: float
    matrix_choices: tuple[int, ...]
    fov_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    n_slices: tuple[int, int]
    #: b = 0 SNR of white matter on one acquired voxel (field strength, coil, voxel size, averages).
    snr_b0: float
    #: Standard deviation of the log of the smooth multiplicative field on the apparent ADC (gradient
    #: non-linearity and eddy currents change the effective b-value; coil receive bias cancels in ADC).
    bias: float
    #: Multiplier of all apparent ADC values (b-values, diffusion times and vendor calibration differ).
    intensity_scale: float
    #: Injury pattern probabilities (``none`` = no lesion); normalised when sampled.
    pattern_weights: Mapping[str, float]
    #: Median lesion volume as a fraction of the brain, and the lognormal spread around it.
    lesion_fraction_median: float
    lesion_fraction_sigma: float = 1.0
    #: Multiplier of lesion ADC (later scans, pseudo-normalisation: milder lesions) and its
    #: case-to-case spread (log standard deviation: the day of the scan varies).
    lesion_contrast: float = 1.0
    lesion_contrast_sd: float = 0.15
    #: Per-tissue multipliers (white_matter, cortex, deep_grey, plic, csf) on top of ``intensity_scale``:
    #: b-value and diffusion time change tissue contrast, not only the overall level.
    tissue_contrast: Mapping[str, float] = field(default_factory=dict)
    #: The site's annotators; each case is labelled by one of them, drawn at random.
    raters: tuple[RaterHabit, ...] = (RaterHabit("rater1"),)
    #: EPI distortion, blur, eddy currents and motion of the site's DWI.
    artefacts: EpiArtefacts = field(default_factory=EpiArtefacts)
    #: Storage orientations of the site's files (see :data:`bench.data.acquisition.ORIENTATIONS`), weighted.
    orientations: Mapping[str, float] = field(default_factory=lambda: {"LPS": 1.0})
    #: Share of babies scanned during therapeutic hypothermia rather than after rewarming.
    cooled_fraction: float = 0.1
    slice_choices: tuple[float, ...] = ()
    coverage_mm: tuple[float, float] | None = None

    @property
    def protocol(self) -> SignalProtocol:
        return SignalProtocol(snr_b0=self.snr_b0, artefacts=self.artefacts)


DEFAULT_SITES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="SiteA",
        scanner="synthetic 3T scanner, vendor A",
        field_strength_t=3.0,
        matrix_choices=(256,),
        fov_mm=(205.0, 225.0),
        slice_mm=(2.2, 2.5),
        n_slices=(48, 60),
        snr_b0=34.0,
        bias=0.03,
        intensity_scale=1.0,
        pattern_weights={"none": 0.12, "bgt": 0.3, "watershed": 0.2, "plic": 0.1, "diffuse_wm": 0.14, "punctate": 0.14},
        lesion_fraction_median=0.012,
        # Field-map corrected EPI; two raters who sometimes skip a tiny focus.
        raters=(RaterHabit("A1", 0.5, miss_probability=0.2), RaterHabit("A2", 0.45, miss_probability=0.35)),
        artefacts=EpiArtefacts(distortion_mm=0.7, eddy_px=0.2),
        orientations={"LPS": 0.6, "oblique": 0.4},
    ),
    SiteProfile(
        name="SiteB",
        scanner="synthetic 3T scanner, vendor B",
        field_strength_t=3.0,
        matrix_choices=(128,),
        fov_mm=(230.0, 256.0),
        slice_mm=(3.0, 3.0),
        n_slices=(23, 30),
        snr_b0=30.0,
        bias=0.04,
        intensity_scale=1.04,
        pattern_weights={"none": 0.10, "bgt": 0.4, "watershed": 0.1, "plic": 0.15, "diffuse_wm": 0.12, "punctate": 0.13},
        lesion_fraction_median=0.016,
        # Scanned earlier after birth: darker lesions; a conservative rater outlines the core only and
        # leaves small foci out; babies scanned without sedation move between slices.
        lesion_contrast=0.9,
        tissue_contrast={"csf": 1.05, "cortex": 0.97},
        raters=(RaterHabit("B1", 0.6, jitter=0.08, miss_probability=0.4),),
        artefacts=EpiArtefacts(distortion_mm=1.0, eddy_px=0.3, motion_fraction=0.2, motion_mm=1.5),
        orientations={"RAS": 1.0},
    ),
    SiteProfile(
        name="SiteC",
        scanner="synthetic 1.5T scanner, vendor A",
        field_strength_t=1.5,
        matrix_choices=(160, 192),
        fov_mm=(220.0, 240.0),
        slice_mm=(2.5, 3.0),
        n_slices=(30, 40),
        snr_b0=18.0,
        bias=0.05,
        intensity_scale=0.97,
        pattern_weights={"none": 0.15, "bgt": 0.3, "watershed": 0.18, "plic": 0.1, "diffuse_wm": 0.13, "punctate": 0.14},
        lesion_fraction_median=0.012,
        tissue_contrast={"white_matter": 1.04},
        # Older 1.5 T EPI without distortion correction: shifted and blurred along phase-encode.
        raters=(RaterHabit("C1", 0.45, miss_probability=0.25),),
        artefacts=EpiArtefacts(distortion_mm=2.5, blur_px=0.8, eddy_px=0.4),
        orientations={"LPS": 0.5, "LAS": 0.5},
    ),
    SiteProfile(
        name="SiteD",
        scanner="synthetic 3T scanner, vendor C",
        field_strength_t=3.0,
        matrix_choices=(256,),
        fov_mm=(180.0, 190.0),
        slice_mm=(2.5, 3.0),
        n_slices=(36, 48),
        snr_b0=26.0,
        bias=0.1,
        intensity_scale=0.9,
        pattern_weights={"none": 0.10, "bgt": 0.03, "watershed": 0.5, "plic": 0.02, "diffuse_wm": 0.25, "punctate": 0.1},
        lesion_fraction_median=0.014,
        # Scanned later (pseudo-normalisation): milder lesions; generous raters include the rim.
        lesion_contrast=1.2,
        tissue_contrast={"csf": 0.85, "white_matter": 0.97, "cortex": 1.05, "deep_grey": 1.08},
        raters=(RaterHabit("D1", 0.35, jitter=0.15, miss_probability=0.1), RaterHabit("D2", 0.4, jitter=0.15, miss_probability=0.2)),
        artefacts=EpiArtefacts(distortion_mm=1.5, eddy_px=0.3, motion_fraction=0.1, motion_mm=1.0),
        orientations={"oblique": 0.7, "RAS": 0.3},
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
                snr_b0=float(base.snr_b0 / rng.uniform(0.8, 1.3)),
                bias=float(base.bias * rng.uniform(0.7, 1.5)),
                intensity_scale=float(rng.uniform(0.88, 1.08)),
                pattern_weights=weights,
                lesion_fraction_median=float(base.lesion_fraction_median * rng.uniform(0.7, 1.5)),
            )
        )
    return profiles


#: One hospital shaped like BONBID-HIE 2023 (MGH): see docs/datasets.md for the published facts used.
#: Mostly 256 matrices over a 22-25 cm field of view (0.86-0.98 mm pixels), a quarter 128 (1.7-2.0 mm);
#: 2-6 mm slices covering 100-130 mm, 16-64 of them; lesion burden lognormal around 0.6 % of the
#: brain with a long tail (over half of the patients under 1 %), about one in ten lesion-free.
BONBID2023_SITE = SiteProfile(
    name="SynMGH",
    scanner="synthetic, BONBID-HIE 2023-like protocol mix",
    field_strength_t=float("nan"),  # not published by BONBID-HIE
    matrix_choices=(256, 256, 256, 128),
    fov_mm=(220.0, 250.0),
    slice_mm=(2.0, 6.0),
    slice_choices=(2.0, 2.5, 3.0, 3.0, 3.0, 4.0, 5.0, 5.0, 6.0),
    coverage_mm=(100.0, 130.0),
    n_slices=(16, 64),
    snr_b0=24.0,
    bias=0.05,
    intensity_scale=1.0,
    pattern_weights={"none": 0.11, "bgt": 0.27, "watershed": 0.25, "plic": 0.07, "diffuse_wm": 0.14, "punctate": 0.16},
    lesion_fraction_median=0.016,
    lesion_fraction_sigma=1.3,
    lesion_contrast=1.05,
    lesion_contrast_sd=0.12,
    raters=(RaterHabit("MGH1", 0.45, miss_probability=0.3), RaterHabit("MGH2", 0.55, jitter=0.1, miss_probability=0.15)),
    artefacts=EpiArtefacts(distortion_mm=1.5, blur_px=0.5, eddy_px=0.3, motion_fraction=0.08, motion_mm=1.0),
    orientations={"LPS": 0.5, "oblique": 0.3, "RAS": 0.2},
)


@dataclass(frozen=True)
class CohortPreset:
    """A named cohort: its sites, its size and, like a challenge, its own training / test partition."""

    name: str
    description: str
    sites: tuple[SiteProfile, ...]
    train_cases: int
    test_cases: int

    @property
    def cases(self) -> int:
        return self.train_cases + self.test_cases


COHORT_PRESETS: dict[str, CohortPreset] = {
    "bonbid2023": CohortPreset(
        name="bonbid2023",
        description="one hospital shaped like BONBID-HIE 2023, 85 training and 44 test cases stored as the holdout split",
        sites=(BONBID2023_SITE,),
        train_cases=85,
        test_cases=44,
    ),
}


def preset_test_cases(specs: Sequence["CaseSpec"], preset: CohortPreset, seed: int) -> tuple[str, ...]:
    """The preset's test cases: a seeded random draw of ``preset.test_cases`` of the planned ids, as a
    challenge draws its hidden test set from one cohort."""
    rng = np.random.default_rng([seed, 2])
    ids = [spec.case_id for spec in specs]
    chosen = rng.choice(len(ids), size=preset.test_cases, replace=False)
    return tuple(sorted(ids[int(i)] for i in chosen))


# --------------------------------------------------------------------------------------------------
# Sampling template volumes


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
# Tissue model


@dataclass(frozen=True)
class TissueValues:
    """One number per tissue: a baby's mean diffusivity (10^-6 mm^2/s, before the site's scale) or a
    relative signal such as :data:`TISSUE_S0`."""

    white_matter: float
    cortex: float
    deep_grey: float
    plic: float
    csf: float

    @classmethod
    def sample_adc(cls, rng: np.random.Generator, spread: float = 1.0) -> "TissueValues":
        """One baby's diffusivities; ``spread`` scales the between-baby standard deviations."""
        # Normal term neonates: unmyelinated white matter diffuses more than grey matter.
        return cls(
            white_matter=float(rng.normal(1420.0, 70.0 * spread)),
            cortex=float(rng.normal(1180.0, 50.0 * spread)),
            deep_grey=float(rng.normal(1060.0, 45.0 * spread)),
            plic=float(rng.normal(980.0, 40.0 * spread)),
            csf=float(rng.normal(2900.0, 150.0 * spread)),
        )

    def scaled(self, factors: Mapping[str, float]) -> "TissueValues":
        """A copy with some tissues multiplied (unknown tissue names raise ``ValueError``)."""
        unknown = set(factors) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tissues {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}")
        return replace(self, **{name: getattr(self, name) * float(f) for name, f in factors.items()})


#: Earlier name of :class:`TissueValues` (the generator's tissue diffusivities).
TissueADC = TissueValues


def tissue_mix(template: AnatomicalTemplate, values: TissueValues) -> np.ndarray:
    """Per-voxel mixture of the tissue values by the template's tissue fractions; the background holds
    the CSF value (extra-axial fluid), so interpolation at the brain surface mixes tissue with fluid."""
    grey = values.cortex * (1.0 - template.deep_gm) + values.deep_grey * template.deep_gm
    # deep_gm covers the whole nucleus (grey and white parts), so the deep value applies to both;
    # the internal capsule that runs between the nuclei is set last.
    white = values.white_matter * (1.0 - template.deep_gm) + values.deep_grey * template.deep_gm
    white = white * (1.0 - template.plic) + values.plic * template.plic
    parenchyma = template.gm * grey + template.wm * white
    return (parenchyma + (1.0 - template.gm - template.wm) * values.csf).astype(np.float32)


def tissue_adc_map(template: AnatomicalTemplate, tissue: TissueValues, rng: np.random.Generator) -> np.ndarray:
    """Lesion-free ADC on the template grid, with a few percent of regional variation (e.g. frontal vs
    occipital white matter)."""
    spacing = 40.0 / template.resolution_mm
    regional = smooth_random_field(rng, template.shape, (spacing,) * 3)[0]
    return (tissue_mix(template, tissue) * (1.0 + 0.03 * regional)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _tissue_s0(resolution_mm: int) -> np.ndarray:
    """:data:`TISSUE_S0` on the template grid (read-only, memoised: it has no random part)."""
    s0 = tissue_mix(load_template(resolution_mm), TissueValues(**TISSUE_S0))
    s0.setflags(write=False)
    return s0


def template_signals(
    template: AnatomicalTemplate, adc: np.ndarray, lesion: np.ndarray | None = None, *, profile: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free ``(S0, S_b)`` on the template grid for an ADC map, lesions with their T2 prolongation,
    blurred by the acquisition's point spread ``profile`` (template voxels). Partial volume is mixed in
    the signals, as the scanner mixes it: a voxel half tissue, half CSF has an ADC near the tissue's,
    because the CSF's b = 1000 signal is small."""
    from scipy import ndimage

    s0 = _tissue_s0(int(template.resolution_mm))
    if lesion is not None and lesion.any():
        s0 = s0 * (1.0 + (LESION_S0_FACTOR - 1.0) * lesion)
    s_b = diffusion_weighted(s0, adc)
    if profile is not None:
        s0, s_b = ndimage.gaussian_filter(s0, profile), ndimage.gaussian_filter(s_b, profile)
    return np.asarray(s0, np.float32), np.asarray(s_b, np.float32)


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


def compute_zadc(adc: np.ndarray, brain: np.ndarray, atlas_mean: np.ndarray, atlas_std: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """BONBID-HIE Z-ADC: ADC smoothed 2 mm FWHM inside the brain, minus the atlas mean, over the atlas
    standard deviation, clipped to +-10, 0 outside the brain, stored in steps of 1/256."""
    smoothed = _masked_smooth(adc, brain, ZADC_SMOOTHING_FWHM_MM / 2.3548 / np.asarray(spacing, float))
    zadc = np.zeros(adc.shape, np.float32)
    np.divide(smoothed - atlas_mean, atlas_std, out=zadc, where=brain)
    zadc = np.clip(zadc, -ZADC_CLIP, ZADC_CLIP)
    return (np.round(zadc / ZADC_QUANTUM) * ZADC_QUANTUM).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Normative atlas: a separate population


@dataclass(frozen=True)
class NormativeAtlas:
    """Per-voxel mean and standard deviation of smoothed ADC in healthy (synthetic) neonates, template grid."""

    mean: np.ndarray
    std: np.ndarray
    n_subjects: int


@dataclass(frozen=True)
class _Anatomy:
    """One baby's size and pose: template-to-neonate scale, per-axis shape factors, head rotation."""

    neonatal_scale: float
    axis_scale: np.ndarray
    rotation: np.ndarray


def _random_displacement(rng: np.random.Generator, shape: Sequence[int], spacing_vox: Sequence[float], amplitude_vox: float) -> np.ndarray:
    """A smooth random displacement field ``(3, *shape)`` with ``amplitude_vox`` standard deviation per axis."""
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
    """Smoothed ADC of one lesion-free baby of the normative population, after its registration to the
    template: its own tissue values, the part of its anatomy the atlas-building registration did not
    recover (:data:`ATLAS_BUILD_CAPTURE`, :data:`ATLAS_RESIDUAL_FRACTION`), its own acquisition blur and
    Rician noise."""
    from scipy import ndimage

    template = load_template(resolution_mm)
    rng = np.random.default_rng([ATLAS_SEED, resolution_mm, n_subjects, subject])
    to_vox = 1.0 / (NOMINAL_NEONATAL_SCALE * template.resolution_mm)
    adc = tissue_adc_map(template, TissueValues.sample_adc(rng, spread=ATLAS_SPREAD), rng)
    warp = _random_displacement(rng, template.shape, (SHAPE_SPACING_MM * to_vox,) * 3, (1.0 - ATLAS_BUILD_CAPTURE) * SHAPE_AMPLITUDE_MM * to_vox)
    warp += _random_displacement(rng, template.shape, (RESIDUAL_SPACING_MM * to_vox,) * 3, ATLAS_RESIDUAL_FRACTION * RESIDUAL_AMPLITUDE_MM * to_vox)
    warp += np.indices(template.shape, dtype=np.float32)
    profile = _slice_profile_sigma(template, NOMINAL_NEONATAL_SCALE, ATLAS_VOXEL_MM)
    s0, s_b = template_signals(template, adc, profile=profile)
    # Only the brain and its surroundings matter (the atlas is used inside subjects' brains).
    support = np.flatnonzero(ndimage.binary_dilation(template.brain > 0.01, iterations=3))
    s0, s_b = TrilinearSampler(warp.reshape(3, -1)[:, support], template.shape).sample(s0, s_b)
    # Noise per template voxel with the power the acquired voxel has over the same volume.
    template_voxel_mm3 = (template.resolution_mm * NOMINAL_NEONATAL_SCALE) ** 3
    snr = ATLAS_SNR_B0 * np.sqrt(template_voxel_mm3 / float(np.prod(ATLAS_VOXEL_MM)))
    adc = _scatter(acquire_adc(s0, s_b, SignalProtocol(snr_b0=float(snr)), rng), support, template.shape)
    return _masked_smooth(adc, template.brain > 0.5, (ZADC_SMOOTHING_FWHM_MM / 2.3548 * to_vox,) * 3)


#: Memo of :func:`build_normative_atlas` (a pure function of its arguments, costly to rebuild).
_ATLAS_MEMO: dict[tuple[int, int], NormativeAtlas] = {}


def build_normative_atlas(resolution_mm: int, n_subjects: int = ATLAS_SUBJECTS, *, workers: int = 1) -> NormativeAtlas:
    """Normative ADC atlas on the template grid, from ``n_subjects`` lesion-free synthetic babies.

    The population is separate from every dataset's patients: its own random stream (:data:`ATLAS_SEED`,
    fixed like a published atlas), wider tissue variation (:data:`ATLAS_SPREAD`), each baby with its own
    anatomy, acquisition and noise (:func:`_atlas_subject`), averaged in template space. The standard
    deviation therefore carries the population's misregistration at tissue boundaries, as a real atlas'
    does. It is floored at 4 % of the mean so a small cohort never gives near-zero denominators. The
    atlas does not depend on ``workers`` and is memoised per process.
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
    """A generated case in native space (as stored: oriented arrays and header), before it is written."""

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
    if site.slice_choices:
        thickness = float(site.slice_choices[int(rng.integers(len(site.slice_choices)))])
    else:
        thickness = float(np.round(rng.uniform(*site.slice_mm), 1))
    if preset.matrix is None:
        matrix = int(site.matrix_choices[int(rng.integers(len(site.matrix_choices)))])
        if site.coverage_mm is not None:
            n_slices = int(np.clip(round(rng.uniform(*site.coverage_mm) / thickness), *site.n_slices))
        else:
            n_slices = int(rng.integers(site.n_slices[0], site.n_slices[1] + 1))
    else:
        matrix, n_slices = preset.matrix, int(preset.n_slices or 8)
        fov *= preset.fov_factor
        # Slices spread over the preset's coverage, thicker or thinner as the site's (2.6 mm nominal).
        thickness = preset.coverage_mm / n_slices * float(np.clip(thickness / 2.6, 0.85, 1.2))
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


def _registration_error(matrix: np.ndarray, offset: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The native -> template affine as the atlas registration estimates it: the true one composed with a
    small random rotation, per-axis scale and translation (native mm) -- an affine fit to a thick-slice,
    noisy, distorted ADC map is never exact."""
    error = _rotation(rng.normal(0.0, REGISTRATION_ROTATION_SD_DEG, size=3)) @ np.diag(1.0 + rng.normal(0.0, REGISTRATION_SCALE_SD, size=3))
    shift = rng.normal(0.0, REGISTRATION_SHIFT_SD_MM, size=3)
    return matrix @ error, offset + matrix @ shift


@dataclass
class _Subject:
    """One baby before acquisition: pose, grid, injury and its signals on the template grid."""

    anatomy: _Anatomy
    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    head_center: np.ndarray
    factor: int
    pattern: str
    s0: np.ndarray
    s_b: np.ndarray
    lesion: np.ndarray

    @property
    def acquired_spacing(self) -> np.ndarray:
        return self.spacing * (1, self.factor, self.factor)


def _draw_subject(site: SiteProfile, preset: SizePreset, template: AnatomicalTemplate, rng: np.random.Generator) -> _Subject:
    """Anatomy, pose, grid, tissue values and lesions of one case, and its blurred template-grid signals."""
    from scipy import ndimage

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
    adc_t = tissue_adc_map(template, TissueValues.sample_adc(rng).scaled(site.tissue_contrast), rng)
    pattern = choose(site.pattern_weights, rng)
    fraction = float(np.clip(site.lesion_fraction_median * VOLUME_FACTOR.get(pattern, 1.0) * np.exp(rng.normal(0.0, site.lesion_fraction_sigma)), 3e-4, 0.2))
    context = LesionContext(template, anatomy.neonatal_scale, size_scale=preset.lesion_scale)
    lesion_t = draw_lesions(pattern, context, rng, target_ml=fraction * brain_ml)
    # DWI is acquired on a coarser in-plane grid than it is reconstructed on (e.g. 128 -> 256 matrix).
    factor = max(1, int(round(ACQUIRED_INPLANE_MM / spacing[1]))) if preset.matrix is None else 1
    profile = _slice_profile_sigma(template, anatomy.neonatal_scale, spacing_arr * (1, factor, factor))
    if pattern != "none":
        # The day of the scan varies: later scans show pseudo-normalising (milder) lesions.
        contrast = site.lesion_contrast * float(np.exp(rng.normal(0.0, site.lesion_contrast_sd)))
        lesion_adc = rng.uniform(*LESION_ADC[pattern]) * contrast
        # Lesion texture and slice-profile blur only around the lesions (cheaper than the whole grid).
        around = _bounding_box(lesion_t > 0, margin=int(np.ceil(4 * max(profile))) + 1)
        texture = smooth_random_field(rng, lesion_t[around].shape, (3.0,) * 3)[0]
        adc_t[around] = adc_t[around] * (1.0 - lesion_t[around]) + lesion_t[around] * lesion_adc * (1.0 + 0.05 * texture)
    if rng.random() < site.cooled_fraction:
        adc_t *= 1.0 - ADC_TEMPERATURE_COEFFICIENT * HYPOTHERMIA_DELTA_C
    s0_t, sb_t = template_signals(template, adc_t, lesion_t, profile=profile)
    if pattern != "none":
        lesion_t[around] = ndimage.gaussian_filter(lesion_t[around], profile)
    return _Subject(anatomy, shape, spacing_arr, origin, head_center, factor, pattern, s0_t, sb_t, lesion_t)


@dataclass
class _Sampled:
    """A subject sampled on the acquired grid of its brain box (``lower`` .. ``upper`` of the native grid)."""

    lower: np.ndarray
    upper: np.ndarray
    brain: np.ndarray
    s0: np.ndarray
    s_b: np.ndarray
    lesion: np.ndarray
    atlas_mean: np.ndarray
    atlas_std: np.ndarray
    #: Flat indices (acquired grid) of the brain and its rim, where anything is computed.
    support: np.ndarray


def _acquired_axes(subject: _Subject, lower: np.ndarray, acquired_shape: Sequence[int]) -> list[np.ndarray]:
    """Physical position (relative to the head centre, array order) of each acquired sample, per axis;
    acquired pixel j covers reconstructed pixels j*factor .. j*factor + factor - 1."""
    steps = (1, subject.factor, subject.factor)
    return [
        subject.origin[a] + subject.spacing[a] * (lower[a] + steps[a] * np.arange(acquired_shape[a]) + (steps[a] - 1) / 2.0) - subject.head_center[a]
        for a in range(3)
    ]


def _affine_coords(matrix: np.ndarray, offset: np.ndarray, axes: Sequence[np.ndarray]) -> np.ndarray:
    """Template indices ``(3, *grid)`` of the grid spanned by ``axes`` under ``index = matrix @ p + offset``."""
    coords = np.empty((3, *(len(a) for a in axes)), np.float32)
    for i in range(3):
        coords[i] = matrix[i, 0] * axes[0][:, None, None] + matrix[i, 1] * axes[1][None, :, None] + matrix[i, 2] * axes[2][None, None, :] + offset[i]
    return coords


def _artefact_shift_mm(subject: _Subject, site: SiteProfile, lower: np.ndarray, acquired_shape: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """In-plane displacement (y, x; mm) of what each acquired sample shows: EPI distortion along the
    phase-encode axis (y) and each slice's motion. The atlas registration follows neither."""
    art = site.artefacts
    dy = np.zeros(tuple(acquired_shape), np.float32)
    dx = np.zeros(tuple(acquired_shape), np.float32)
    if art.distortion_mm > 0:
        dy += smooth_random_field(rng, acquired_shape, DISTORTION_SCALE_MM / subject.acquired_spacing)[0] * art.distortion_mm
    motion = slice_motion_mm(rng, subject.shape[0], art)[int(lower[0]) : int(lower[0]) + int(acquired_shape[0])]
    dy += motion[:, 0, None, None].astype(np.float32)
    dx += motion[:, 1, None, None].astype(np.float32)
    return dy, dx


def _sample_native(
    subject: _Subject, site: SiteProfile, template: AnatomicalTemplate, atlas: NormativeAtlas, rng: np.random.Generator, artefact_rng: np.random.Generator
) -> _Sampled:
    """Sample the subject (with its anatomy, artefacts) and the imperfectly registered atlas on the
    acquired grid, inside the box of the native grid that can contain brain. Artefacts draw from their
    own stream, so a site with and without them shows the same baby with the same noise."""
    from scipy import ndimage

    matrix, offset = _native_to_template(subject.anatomy, template)
    lower, upper = _brain_box(subject.anatomy, template, matrix, offset, subject.head_center, subject.shape, subject.spacing, subject.origin, ARTEFACT_MARGIN_MM)
    box_shape = tuple(int(v) for v in upper - lower)
    f = subject.factor
    acquired_shape = (box_shape[0], -(-box_shape[1] // f), -(-box_shape[2] // f))
    axes = _acquired_axes(subject, lower, acquired_shape)
    acquired_spacing = subject.acquired_spacing
    to_vox = 1.0 / (subject.anatomy.neonatal_scale * template.resolution_mm)
    shape_field = _random_displacement(rng, acquired_shape, SHAPE_SPACING_MM / acquired_spacing, SHAPE_AMPLITUDE_MM * to_vox)
    coords = _affine_coords(matrix, offset, axes) + shape_field
    coords += _random_displacement(rng, acquired_shape, RESIDUAL_SPACING_MM / acquired_spacing, RESIDUAL_AMPLITUDE_MM * to_vox)
    dy, dx = _artefact_shift_mm(subject, site, lower, acquired_shape, artefact_rng)
    for i in range(3):
        coords[i] += matrix[i, 1] * dy + matrix[i, 2] * dx
    (brain_p,) = TrilinearSampler(coords, template.shape).sample(template.brain)
    # Everything else is only needed on and next to the brain (a fifth of the box): sample it there.
    support = np.flatnonzero(ndimage.maximum_filter(brain_p, size=3) > 0.01)
    subject_values = TrilinearSampler(coords.reshape(3, -1)[:, support], template.shape).sample(subject.s0, subject.s_b, subject.lesion)
    del coords, dy, dx
    matrix_a, offset_a = _registration_error(matrix, offset, rng)
    atlas_coords = (_affine_coords(matrix_a, offset_a, axes) + REGISTRATION_CAPTURE * shape_field).reshape(3, -1)[:, support]
    atlas_values = TrilinearSampler(atlas_coords, template.shape).sample(atlas.mean, atlas.std)
    s0, s_b, lesion, mean, std = (_scatter(v, support, acquired_shape) for v in (*subject_values, *atlas_values))
    return _Sampled(lower, upper, brain_p, s0, s_b, lesion, mean, std, support)


def _acquire(sampled: _Sampled, subject: _Subject, site: SiteProfile, rng: np.random.Generator, artefact_rng: np.random.Generator) -> np.ndarray:
    """Noisy ADC on the acquired grid: receive sensitivity, the site's apparent-ADC scale and
    gradient non-linearity, then the DW acquisition (:func:`bench.data.acquisition.acquire_adc`)."""
    shape = sampled.s0.shape
    spacing = subject.acquired_spacing
    receive = np.exp(RECEIVE_FIELD_SD * smooth_random_field(rng, shape, RECEIVE_FIELD_MM / spacing)[0])
    scale = site.intensity_scale * np.exp(site.bias * smooth_random_field(rng, shape, BIAS_FIELD_MM / spacing)[0])
    s0 = sampled.s0 * receive
    # Apparent ADC = scale * true (mixed) ADC: S_b = S0 * (S_b / S0) ** scale.
    attenuation = np.divide(sampled.s_b, sampled.s0, out=np.zeros_like(s0), where=sampled.s0 > 1e-6)
    s_b = s0 * np.power(attenuation, scale, dtype=np.float32)
    return acquire_adc(s0.astype(np.float32), s_b.astype(np.float32), site.protocol, rng, support=sampled.support, artefact_rng=artefact_rng)


def synthesize_case(spec: CaseSpec) -> SyntheticCase:
    """Generate one case (anatomy, lesions, acquisition, Z-ADC, label, header) in memory."""
    preset, site = spec.preset, spec.site
    template = load_template(preset.template_resolution_mm)
    atlas = build_normative_atlas(preset.template_resolution_mm, preset.atlas_subjects)
    rng = np.random.default_rng([spec.seed, 0, spec.index])
    artefact_rng = np.random.default_rng([spec.seed, 3, spec.index])
    subject = _draw_subject(site, preset, template, rng)
    sampled = _sample_native(subject, site, template, atlas, rng, artefact_rng)
    adc = _acquire(sampled, subject, site, rng, artefact_rng)
    box_shape = tuple(int(v) for v in sampled.upper - sampled.lower)
    upsample = _InplaneUpsampler(box_shape, subject.factor)
    adc, brain_p, lesion, atlas_mean, atlas_std = (upsample(v) for v in (adc, sampled.brain, sampled.lesion, sampled.atlas_mean, sampled.atlas_std))
    brain = brain_p > 0.5
    adc = np.where(brain, np.clip(np.round(adc), *ADC_STORED_RANGE), 0.0).astype(np.float32)
    zadc = compute_zadc(adc, brain, atlas_mean, atlas_std, subject.spacing)
    rater = site.raters[int(rng.integers(len(site.raters)))]
    label, missed = annotate(lesion, brain, rater, rng, subject.spacing) if subject.pattern != "none" else (np.zeros(box_shape, bool), 0)

    def embed(box: np.ndarray, dtype: type) -> np.ndarray:
        full = np.zeros(subject.shape, dtype)
        full[tuple(slice(int(lo), int(hi)) for lo, hi in zip(sampled.lower, sampled.upper))] = box
        return full

    orientation = choose(site.orientations, rng)
    canonical = Geometry(shape=subject.shape, spacing=tuple(float(s) for s in subject.spacing), origin=tuple(float(v) for v in np.round(subject.origin, 4)))
    (adc, zadc, label_full), geometry = store_oriented([embed(adc, np.float32), embed(zadc, np.float32), embed(label, np.uint8)], canonical, orientation, rng)
    return SyntheticCase(
        case_id=spec.case_id,
        site=site.name,
        adc=adc,
        zadc=zadc,
        label=label_full,
        geometry=geometry,
        metadata={
            "scanner": site.scanner,
            "field_strength_t": site.field_strength_t,
            "pattern": subject.pattern if label.any() else "none",
            "orientation": orientation,
            "rater": rater.name,
            "missed_lesions": missed,
        },
    )


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (the whole grid if empty)."""
    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - margin, 0), int(hits[-1]) + margin + 1))
    return tuple(box)


def _scatter(values: np.ndarray, flat_index: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A zero volume of ``shape`` with ``values`` at the flat positions ``flat_index``."""
    volume = np.zeros(int(np.prod(shape)), np.float32)
    volume[flat_index] = values
    return volume.reshape(tuple(shape))


def _brain_box(
    anatomy: _Anatomy,
    template: AnatomicalTemplate,
    matrix: np.ndarray,
    offset: np.ndarray,
    head_center: np.ndarray,
    shape: Sequence[int],
    spacing: np.ndarray,
    origin: np.ndarray,
    extra_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Index range (lower, upper) of the native grid that can contain brain: the template's brain
    bounding box, grown by the largest plausible deformation (plus ``extra_mm`` of artefact
    displacement), mapped through the inverse affine."""
    # Three standard deviations of both random fields: the brain practically never moves further.
    margin = (3 * (SHAPE_AMPLITUDE_MM + RESIDUAL_AMPLITUDE_MM) + extra_mm) / (anatomy.neonatal_scale * template.resolution_mm)
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


def plan_cases(cases: int, sites: int, seed: int, size: SizeName | str, profiles: Sequence[SiteProfile] | None = None) -> list[CaseSpec]:
    """The cases a call will generate: ``cases`` split as evenly as possible over ``sites`` sites
    (:func:`site_profiles`, or the given ``profiles``)."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZE_PRESETS)}")
    if cases < sites:
        raise ValueError(f"need at least one case per site: {cases} cases for {sites} sites")
    profiles = list(profiles) if profiles is not None else site_profiles(sites, seed)
    preset = SIZE_PRESETS[size]
    specs: list[CaseSpec] = []
    for site_index, profile in enumerate(profiles):
        count = cases // sites + (1 if site_index < cases % sites else 0)
        for number in range(1, count + 1):
            specs.append(CaseSpec(f"{profile.name}_{number:03d}", len(specs), seed, profile, preset))
    return specs


def cohort_preset(name: str) -> CohortPreset:
    """The preset called ``name`` (:data:`COHORT_PRESETS`); an unknown name is a ``ValueError`` listing them."""
    try:
        return COHORT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(COHORT_PRESETS)}") from None


def generate_synthetic_dataset(
    out: str | Path,
    *,
    cases: int | None = None,
    sites: int | None = None,
    seed: int = 0,
    size: SizeName | str = "full",
    preset: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    folds: int = 5,
    split_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Generate a synthetic HIE dataset at ``out`` (written atomically) and return it.

    Args:
        out: dataset folder to create (its name is the dataset name).
        cases: number of cases, split evenly over the sites (default 60; set by ``preset``).
        sites: number of sites (default 4, the first four are :data:`DEFAULT_SITES`; set by ``preset``).
        seed: generation seed; the same seed gives byte-identical images whatever ``workers`` is.
        size: ``"tiny"``, ``"small"`` or ``"full"`` (see :data:`SIZE_PRESETS`).
        preset: a cohort of :data:`COHORT_PRESETS` (``"bonbid2023"``): its sites and size, and its own
            test cases stored as the holdout split. Giving ``cases`` or ``sites`` with it is an error.
        workers: processes to use (default: one per CPU core, at most 8; 1 generates in this process).
        overwrite: replace an existing dataset at ``out``.
        folds: number of k-fold splits stored in ``splits.json``.
        split_seed: seed of the stored k-fold splits and of the site-stratified holdout split (both
            written to ``splits.json`` by :func:`bench.data.splits.build_splits_payload`); a preset's
            holdout is its own test set instead.
        progress: called as ``progress(done, total)`` after each case.
    """
    cohort = cohort_preset(preset) if preset is not None else None
    if cohort is not None:
        if cases is not None or sites is not None:
            raise ValueError(f"preset {cohort.name} fixes the cohort ({cohort.cases} cases, {len(cohort.sites)} site(s)); leave cases and sites out")
        specs = plan_cases(cohort.cases, len(cohort.sites), seed, size, profiles=cohort.sites)
        holdout_test = preset_test_cases(specs, cohort, seed)
    else:
        cases, sites = 60 if cases is None else cases, 4 if sites is None else sites
        specs = plan_cases(cases, sites, seed, size)
        holdout_test = None
    n_sites = len({spec.site.name for spec in specs})
    size_preset = SIZE_PRESETS[size]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(specs)))
    # Build the shared template and atlas once here; forked or inline workers reuse the memoised copy.
    load_template(size_preset.template_resolution_mm)
    build_normative_atlas(size_preset.template_resolution_mm, size_preset.atlas_subjects, workers=workers)
    what = f"preset {cohort.name} ({cohort.description})" if cohort else f"{len(specs)} cases, {n_sites} sites"
    description = f"Synthetic neonatal HIE diffusion MRI (ADC, Z-ADC) generated by HIE-Bench: {what}, seed {seed}, size {size}."
    generator = {"name": "hie-bench synth", "cases": len(specs), "sites": n_sites, "seed": seed, "size": size}
    if cohort:
        generator["preset"] = cohort.name
    with DatasetWriter(
        out, channel_names=("ADC", "Z-ADC"), description=description, licence=SYNTHETIC_LICENCE, overwrite=overwrite, extra={"generator": generator}
    ) as writer:
        _write_cases(writer, specs, workers, progress)
        return writer.commit(folds=folds, split_seed=split_seed, holdout_test=holdout_test)


def _write_cases(writer: DatasetWriter, specs: Sequence[CaseSpec], workers: int, progress: Callable[[int, int], None] | None) -> None:
    """Generate and write every case into the writer's folder, in order, in ``workers`` processes."""
    if workers == 1:
        for done, spec in enumerate(specs, start=1):
            writer.add(_generate_and_write(spec, writer.root))
            if progress:
                progress(done, len(specs))
        return
    with _process_pool(workers) as pool:
        futures = [pool.submit(_generate_and_write, spec, writer.root) for spec in specs]
        for done, future in enumerate(futures, start=1):
            writer.add(future.result())
            if progress:
                progress(done, len(specs))
