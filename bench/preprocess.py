"""The standardized preprocessing pipeline: every model sees the same inputs, every score is native.

A benchmark is only fair if all models receive identical inputs and are all scored on the same voxels.
This module provides one versioned pipeline whose parameters are *data*: a :class:`PreprocessingConfig`
(a frozen pydantic model) hashed together with :data:`PIPELINE_VERSION` into a short
**preprocessing id** that is stored with every result. Two results with the same id saw byte-identical
inputs; a changed parameter or a changed pipeline gives a new id and a new cache entry.

The steps, in order (each one a small function below, applied with SimpleITK in physical space):

1. **load** the configured channels of a :class:`~bench.data.dataset.Case` (plus the brain-mask channel);
2. **reorient** to a canonical orientation (``"RAS"`` by default: the last array axis points to the
   subject's Right, then Anterior, then Superior; a pure permutation/flip of axes, no interpolation);
3. **denoise** (optional): Gaussian smoothing with a physical sigma, or non-local means;
4. **register** (optional): rigid or affine registration of secondary channels to the reference channel
   (ADC), estimated with SimpleITK's Mattes mutual information;
5. **resample** (optional) onto a grid with the target spacing that keeps the field of view centred:
   images with linear or B-spline interpolation, labels with nearest neighbour, all channels in one
   interpolation (registration transform included). The target is a fixed spacing or ``"median"``,
   nnU-Net's rule on a set of training cases (:func:`nnunet_target_spacing`), which a trainer turns into
   a fixed spacing with :meth:`PreprocessingConfig.resolved` before preprocessing;
6. **brain mask**: reference channel above a threshold (``ADC > 0``: the maps are skull-stripped);
7. **crop** to the bounding box of the brain mask plus a margin;
8. **normalize** intensities per channel: z-score inside the brain mask, percentile clipping, or
   nothing (the default for Z-ADC, whose units, standard deviations from a normative atlas, carry
   meaning that the classical ``Z-ADC < -2`` rule relies on); then set voxels outside the brain to 0.

:func:`preprocess` returns a :class:`PreprocessedCase`. Its :meth:`~PreprocessedCase.to_native` maps any
prediction made on the preprocessed grid back onto the case's native voxel grid (inverse crop and
resampling; nearest neighbour for masks, linear for probabilities), which is where every score is
computed, so scores never depend on a submission's preprocessing.

Results are cached on disk by (case content, preprocessing id)::

    <cache_dir>/<preprocessing id>/config.json                   the configuration, for humans
    <cache_dir>/<preprocessing id>/<case_id>.<input hash>.npz    arrays + geometry, written atomically

The input hash covers the bytes of the case's image and label files, so a regenerated dataset never
reuses stale entries, and editing any parameter changes the preprocessing id.

Conventions: arrays are ``(z, y, x)`` (``(C, z, y, x)`` for images) and spacings are in that same
array-axis order, as everywhere in HIE-Bench (see :mod:`bench.imageio`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator, model_validator

from bench.imageio import Geometry, atomic_output, geometry_of, read_image, to_sitk, write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from bench.data.dataset import Case

logger = logging.getLogger(__name__)

#: Bumped whenever the code of the pipeline changes what it outputs for the same configuration; it is
#: part of every preprocessing id, so results and caches made by older code are never mixed with new.
PIPELINE_VERSION = "1"

#: Per-channel normalization used when a configuration does not name a channel: ADC is z-scored inside
#: the brain, Z-ADC is left in its units (standard deviations from a normative atlas), any other
#: channel is z-scored.
STANDARD_NORMALIZATION: dict[str, str] = {"ADC": "zscore", "Z-ADC": "none"}

_ORIENTATION_AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


class PreprocessingError(ValueError):
    """A case cannot be preprocessed with a configuration; the message names the case and the cause."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NormalizationConfig(_Frozen):
    """How one channel's intensities are normalized (statistics are taken inside the brain mask).

    - ``none``: leave values in their physical units;
    - ``zscore``: subtract the mean and divide by the standard deviation of the brain voxels;
    - ``percentile``: clip to the ``lower_percentile``/``upper_percentile`` of the brain voxels and
      rescale that range linearly to [0, 1].
    """

    method: Literal["none", "zscore", "percentile"] = "zscore"
    lower_percentile: float = Field(0.5, ge=0.0, le=100.0)
    upper_percentile: float = Field(99.5, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _ordered_percentiles(self) -> "NormalizationConfig":
        if self.lower_percentile >= self.upper_percentile:
            raise ValueError(
                f"lower_percentile ({self.lower_percentile}) must be below upper_percentile ({self.upper_percentile})"
            )
        return self


class DenoiseConfig(_Frozen):
    """Optional denoising, applied on the native grid before resampling.

    - ``gaussian``: SimpleITK recursive Gaussian with ``sigma_mm`` (physical units, so anisotropic voxels
      are smoothed isotropically in space);
    - ``nlm``: non-local means (scikit-image, fast mode) with filtering strength ``nlm_h`` times the noise
      standard deviation estimated from the image (:func:`estimate_noise_sigma`), patches of ``nlm_patch_size`` voxels searched within
      ``nlm_patch_distance`` voxels.
    """

    method: Literal["gaussian", "nlm"] = "gaussian"
    sigma_mm: PositiveFloat = 0.5
    nlm_h: PositiveFloat = 0.8
    nlm_patch_size: int = Field(3, ge=1)
    nlm_patch_distance: int = Field(3, ge=1)
    #: Channels to denoise; ``None`` means every configured channel.
    channels: tuple[str, ...] | None = None


class RegistrationConfig(_Frozen):
    """Optional rigid/affine registration of secondary channels to the reference channel (SimpleITK).

    Multi-resolution Mattes mutual information with regular sampling (fixed seed, one thread: the result
    is reproducible bit for bit) and a regular-step gradient descent, initialised by aligning the
    geometric centres of the two images.
    """

    transform: Literal["rigid", "affine"] = "rigid"
    reference_channel: str = "ADC"
    #: Channels to register; ``None`` means every configured channel except the reference.
    channels: tuple[str, ...] | None = None
    iterations: int = Field(100, ge=1)
    histogram_bins: int = Field(32, ge=4)
    sampling_fraction: float = Field(0.25, gt=0.0, le=1.0)
    shrink_factors: tuple[int, ...] = (2, 1)
    smoothing_sigmas_vox: tuple[float, ...] = (1.0, 0.0)
    #: Seed of the sampling jitter (SimpleITK reads 0 as "seed from the clock", hence >= 1).
    seed: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _levels_match(self) -> "RegistrationConfig":
        if len(self.shrink_factors) != len(self.smoothing_sigmas_vox):
            raise ValueError("shrink_factors and smoothing_sigmas_vox must have the same length (one per level)")
        return self


class BrainMaskConfig(_Frozen):
    """The brain mask: voxels of ``channel`` strictly above ``threshold`` (ADC maps are skull-stripped)."""

    channel: str = "ADC"
    threshold: float = 0.0


class PreprocessingConfig(_Frozen):
    """Every parameter of the preprocessing pipeline; its :attr:`id` identifies the inputs a model saw.

    The defaults are the benchmark's *standard* preprocessing: both channels, reoriented to RAS, native
    spacing, no denoising or registration, ADC z-scored inside the brain, Z-ADC unchanged, cropped to
    the brain with a 2-voxel margin, zero outside the brain.
    """

    #: Channels stacked into ``PreprocessedCase.image``, by name, in this order.
    channels: tuple[str, ...] = ("ADC", "Z-ADC")
    #: Target orientation code (DICOM "to" convention: ``RAS`` = array x axis points to the Right,
    #: y to Anterior, z to Superior); ``None`` keeps the file's orientation.
    orientation: str | None = "RAS"
    #: Target voxel spacing in mm, in array-axis order (z, y, x); ``None`` keeps the native spacing;
    #: ``"median"`` is planned from the training cases as nnU-Net plans its ``3d_fullres`` spacing
    #: (:func:`nnunet_target_spacing`) and must be resolved (:meth:`resolved`) before preprocessing.
    target_spacing: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | Literal["median"] | None = None
    #: Interpolation of image channels when resampling (labels always use nearest neighbour).
    interpolation: Literal["linear", "bspline"] = "linear"
    denoise: DenoiseConfig | None = None
    registration: RegistrationConfig | None = None
    #: Normalization per channel name; channels left out get :data:`STANDARD_NORMALIZATION`.
    normalization: dict[str, NormalizationConfig] = Field(default_factory=dict)
    brain_mask: BrainMaskConfig = BrainMaskConfig()
    #: Set every channel to 0 outside the brain mask after normalization (z-scoring would otherwise
    #: turn the empty background into a large negative constant).
    zero_outside_brain: bool = True
    crop_to_brain: bool = True
    #: Voxels kept around the brain bounding box on every side.
    crop_margin_voxels: int = Field(2, ge=0)

    @field_validator("channels")
    @classmethod
    def _channels_unique(cls, channels: tuple[str, ...]) -> tuple[str, ...]:
        if not channels:
            raise ValueError("at least one channel is required")
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels must be unique, got {list(channels)}")
        return channels

    @field_validator("orientation")
    @classmethod
    def _valid_orientation(cls, code: str | None) -> str | None:
        if code is None:
            return None
        code = code.upper()
        if len(code) != 3 or any(sum(letter in pair for letter in code) != 1 for pair in _ORIENTATION_AXES):
            raise ValueError(f"orientation {code!r} must use one letter of each pair R/L, A/P, S/I (e.g. 'RAS', 'LPS')")
        return code

    @model_validator(mode="after")
    def _complete_normalization(self) -> "PreprocessingConfig":
        unknown = sorted(set(self.normalization) - set(self.channels))
        if unknown:
            raise ValueError(f"normalization names channels {unknown} that are not in channels {list(self.channels)}")
        # Fill in the standard per-channel defaults so the hashed JSON always states every choice.
        complete = {
            name: self.normalization.get(name) or NormalizationConfig(method=STANDARD_NORMALIZATION.get(name, "zscore"))  # type: ignore[arg-type]
            for name in self.channels
        }
        object.__setattr__(self, "normalization", complete)
        for section, channels in (
            ("denoise", self.denoise.channels if self.denoise else None),
            ("registration", self.registration.channels if self.registration else None),
        ):
            if channels is not None and not set(channels) <= set(self.channels):
                raise ValueError(f"{section}.channels {list(channels)} must be a subset of channels {list(self.channels)}")
        return self

    def canonical_json(self) -> str:
        """The configuration as canonical JSON (sorted keys, no spaces), the input of :attr:`id`."""
        return json.dumps(
            {"pipeline_version": PIPELINE_VERSION, "config": self.model_dump(mode="json")},
            sort_keys=True,
            separators=(",", ":"),
        )

    @property
    def id(self) -> str:
        """Preprocessing id: the resolution policy, then the first 12 hex digits of SHA-256 of
        :meth:`canonical_json` (``median-1f3a...``, ``native-...``, ``6x0.8x0.8mm-...``), so every run's
        id names the resolution its inputs had (issue 12) and the hash tells configurations apart."""
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]
        return f"{self.resolution.replace(' ', '')}-{digest}"

    @property
    def resolution(self) -> str:
        """The resolution policy in words, for tables: ``native``, ``median`` or ``6x2.6x2.6 mm``."""
        if self.target_spacing is None:
            return "native"
        if self.target_spacing == "median":
            return "median"
        return "x".join(f"{s:.3g}" for s in self.target_spacing) + " mm"

    @property
    def is_resolved(self) -> bool:
        """False while the target spacing still has to be planned from training cases (``median``)."""
        return self.target_spacing != "median"

    def resolved(self, cases: "Sequence[Case]") -> "PreprocessingConfig":
        """This configuration with a ``median`` target spacing replaced by the spacing nnU-Net's rule plans
        for ``cases`` (:func:`nnunet_target_spacing`, on their reoriented grids); unchanged otherwise."""
        if self.is_resolved:
            return self
        if not cases:
            raise PreprocessingError("target_spacing 'median' needs at least one case to plan the spacing from")
        spacings, shapes = zip(*(oriented_nonzero_extent(case, self.orientation) for case in cases))
        return self.model_copy(update={"target_spacing": nnunet_target_spacing(spacings, shapes)})

    def __hash__(self) -> int:  # the per-channel dict is unhashable; the canonical JSON says it all
        return hash(self.canonical_json())


@dataclass(frozen=True, eq=False)
class PreprocessedCase:
    """A case on the preprocessed grid, with what is needed to map predictions back to its native grid.

    Attributes:
        case_id: id of the source case.
        image: ``(C, z, y, x)`` float32, channels in ``channel_names`` order.
        label: boolean ``(z, y, x)`` reference mask on the preprocessed grid, or ``None`` when the case has
            no label (or labels were not requested).
        brain_mask: boolean ``(z, y, x)`` brain mask on the preprocessed grid.
        channel_names: names of the image channels.
        geometry: geometry of the preprocessed (cropped) grid; ``geometry.spacing`` is in array order.
        native_geometry: geometry of the case's native grid, where predictions are scored.
        crop_box: ``(start, stop)`` per array axis of the crop inside the uncropped resampled grid.
        preprocessing_id: :attr:`PreprocessingConfig.id` of the configuration that produced this.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    brain_mask: np.ndarray
    channel_names: tuple[str, ...]
    geometry: Geometry
    native_geometry: Geometry
    crop_box: tuple[tuple[int, int], ...]
    preprocessing_id: str

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing of the preprocessed grid in mm, array-axis order (z, y, x)."""
        return self.geometry.spacing

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape ``(z, y, x)`` of the preprocessed grid."""
        return self.geometry.shape

    def to_native(self, array: np.ndarray) -> np.ndarray:
        """Map an array on the preprocessed grid back onto the case's native grid.

        Args:
            array: ``(z, y, x)`` or ``(K, z, y, x)`` (e.g. class probabilities) on :attr:`geometry`.
                Boolean and integer arrays are labels and use nearest-neighbour interpolation; floating
                point arrays are intensities or probabilities and use linear interpolation.

        Returns:
            An array of ``native_geometry.shape`` (with the leading ``K`` kept): boolean for boolean input,
            the input integer dtype for labels, float32 otherwise. Voxels outside the crop are 0.
        """
        array = np.asarray(array)
        if array.ndim == 4:
            return np.stack([self.to_native(channel) for channel in array])
        if tuple(array.shape) != tuple(self.geometry.shape):
            raise PreprocessingError(
                f"case {self.case_id}: array of shape {array.shape} does not match the preprocessed grid "
                f"{self.geometry.shape} (expected (z, y, x) or (K, z, y, x))"
            )
        is_label = array.dtype == bool or np.issubdtype(array.dtype, np.integer)
        source = array.astype(np.uint8 if array.dtype == bool else array.dtype if is_label else np.float32)
        resampled = _resample_array(source, self.geometry, self.native_geometry, nearest=is_label)
        return resampled.astype(bool) if array.dtype == bool else resampled


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def preprocess(
    case: "Case",
    config: PreprocessingConfig | None = None,
    cache_dir: str | Path | None = None,
    *,
    with_label: bool = True,
) -> PreprocessedCase:
    """Run the standardized pipeline on one case (see the module docstring for the steps).

    Args:
        case: the case to preprocess.
        config: the pipeline parameters; ``None`` means the standard ``PreprocessingConfig()``.
        cache_dir: folder of the on-disk cache; ``None`` disables caching.
        with_label: also map the reference label (if the case has one) onto the preprocessed grid. Pass
            ``False`` when preparing inputs for a model, so a prediction can never see the answer.

    Raises:
        PreprocessingError: a configured channel is missing from the case, or the data is unusable.
    """
    config = config or PreprocessingConfig()
    label_path = case.label_path if with_label else None
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_file(Path(cache_dir), case, config, label_path)
        cached = _load_cached(cache_file, config)
        if cached is not None:
            return cached
    result = _run_pipeline(case, config, label_path)
    if cache_file is not None:
        _save_cached(cache_file, result, config)
    return result


#: nnU-Net's ``ANISO_THRESHOLD``: an axis is anisotropic when its spacing exceeds 3 times the others'.
ANISOTROPY_THRESHOLD = 3.0


def nnunet_target_spacing(
    spacings: "Sequence[Sequence[float]]", shapes: "Sequence[Sequence[int]]", anisotropy_threshold: float = ANISOTROPY_THRESHOLD
) -> tuple[float, float, float]:
    """The target spacing nnU-Net v2 plans for ``3d_fullres`` (``ExperimentPlanner.determine_fullres_target_spacing``).

    The per-axis median of ``spacings``; except that when the coarsest axis is both anisotropic in
    spacing (more than ``anisotropy_threshold`` times the next coarsest) and in voxels (its median size,
    ``shapes`` after cropping to the non-zero region, times the threshold is below the others'), that
    axis gets the 10th percentile of its spacings instead (but not finer than the other axes), so thick
    slices are not interpolated into many more. Spacings and shapes in array order (z, y, x).
    """
    spacing = np.vstack([np.asarray(s, float) for s in spacings])
    size = np.vstack([np.asarray(s, float) for s in shapes])
    target = np.percentile(spacing, 50, axis=0)
    target_size = np.percentile(size, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    aniso_spacing = target[worst] > anisotropy_threshold * max(other_spacings)
    aniso_voxels = target_size[worst] * anisotropy_threshold < min(other_sizes)
    if aniso_spacing and aniso_voxels:
        value = float(np.percentile(spacing[:, worst], 10))
        if value < max(other_spacings):
            value = max(max(other_spacings), value) + 1e-5
        target[worst] = value
    return tuple(float(round(v, 6)) for v in target)  # type: ignore[return-value]


def oriented_nonzero_extent(case: "Case", orientation: str | None) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Spacing of ``case`` reoriented to ``orientation`` and the shape of the bounding box of its non-zero
    voxels (any channel), as nnU-Net's fingerprint measures them after its crop to the non-zero region."""
    import SimpleITK as sitk

    nonzero = None
    geometry = case.geometry
    for name in case.channel_names:
        array, geometry = case.load_channel(name)
        nonzero = array != 0 if nonzero is None else nonzero | (array != 0)
    image = reorient(to_sitk(nonzero.astype(np.uint8), geometry), orientation)
    oriented = sitk.GetArrayFromImage(image).astype(bool)
    box = brain_bounding_box(oriented, 0)
    return tuple(float(s) for s in geometry_of(image).spacing), tuple(int(b - a) for a, b in box)


def _run_pipeline(case: "Case", config: PreprocessingConfig, label_path: Path | None) -> PreprocessedCase:
    import SimpleITK as sitk

    if not config.is_resolved:
        raise PreprocessingError(
            f"case {case.case_id}: target_spacing 'median' is planned from training cases; "
            "resolve it first with config.resolved(training_cases) (trainers do this)"
        )

    native_geometry = case.geometry
    needed = list(dict.fromkeys([*config.channels, config.brain_mask.channel]))
    if config.registration is not None:
        needed.append(config.registration.reference_channel)
    missing = [name for name in dict.fromkeys(needed) if name not in case.channel_names]
    if missing:
        raise PreprocessingError(
            f"case {case.case_id}: preprocessing needs channels {missing}, the case has {list(case.channel_names)}"
        )
    images = {name: load_channel(case, name, config.orientation) for name in dict.fromkeys(needed)}
    # The brain mask comes from the channel before denoising: smoothing spreads brain values into the
    # skull-stripped background and would grow the mask.
    mask_source = images[config.brain_mask.channel]

    if config.denoise is not None:
        for name in config.denoise.channels or config.channels:
            images[name] = denoise(images[name], config.denoise)

    transforms: dict[str, sitk.Transform] = {}
    if config.registration is not None:
        reference = images[config.registration.reference_channel]
        for name in config.registration.channels or [c for c in config.channels if c != config.registration.reference_channel]:
            transforms[name] = register(reference, images[name], config.registration)

    grid = target_grid(native_geometry, config.orientation, config.target_spacing)
    arrays = {
        name: resample_to_grid(images[name], grid, config.interpolation, transforms.get(name)) for name in config.channels
    }
    label = None
    if label_path is not None:
        label_image = reorient(to_sitk(*_read_label(label_path)), config.orientation)
        label = resample_to_grid(label_image, grid, "nearest").astype(bool)

    brain = resample_to_grid(mask_source, grid, config.interpolation) > config.brain_mask.threshold
    box = brain_bounding_box(brain, config.crop_margin_voxels) if config.crop_to_brain else _full_box(grid.shape)
    window = tuple(slice(start, stop) for start, stop in box)
    cropped_geometry = crop_geometry(grid, box)
    brain = brain[window]
    image = np.stack(
        [normalize(arrays[name][window], brain, config.normalization[name]) for name in config.channels]
    ).astype(np.float32)
    if config.zero_outside_brain:
        image[:, ~brain] = 0.0
    return PreprocessedCase(
        case_id=case.case_id,
        image=image,
        label=None if label is None else label[window],
        brain_mask=brain,
        channel_names=tuple(config.channels),
        geometry=cropped_geometry,
        native_geometry=native_geometry,
        crop_box=box,
        preprocessing_id=config.id,
    )


def _read_label(path: Path) -> tuple[np.ndarray, Geometry]:
    array, geometry = read_image(path)
    return (array > 0).astype(np.uint8), geometry


def load_channel(case: "Case", name: str, orientation: str | None) -> "sitk.Image":
    """Read one channel of ``case`` as a float32 SimpleITK image, reoriented to ``orientation``."""
    array, geometry = case.load_channel(name)
    return reorient(to_sitk(array.astype(np.float32, copy=False), geometry), orientation)


def reorient(image: "sitk.Image", orientation: str | None) -> "sitk.Image":
    """Permute/flip the axes of ``image`` so they point as ``orientation`` says (no interpolation).

    SimpleITK's ``DICOMOrient`` names orientations by where each index axis points *to* (``"LPS"`` is the
    identity direction, ``"RAS"`` flips x and y), the same convention as nibabel's ``RAS+``. Oblique
    images get the closest orthogonal orientation and keep their residual obliquity in the direction.
    """
    import SimpleITK as sitk

    if orientation is None:
        return image
    return sitk.DICOMOrient(image, orientation)


def denoise(image: "sitk.Image", config: DenoiseConfig) -> "sitk.Image":
    """Denoise one channel on its own grid (Gaussian in mm, or non-local means); geometry is kept."""
    import SimpleITK as sitk

    if config.method == "gaussian":
        return sitk.SmoothingRecursiveGaussian(image, config.sigma_mm)
    from skimage.restoration import denoise_nl_means

    array = sitk.GetArrayFromImage(image).astype(np.float64)
    sigma = estimate_noise_sigma(array)
    if sigma == 0.0:  # a constant image has nothing to denoise, and NLM would divide by zero
        return image
    smoothed = denoise_nl_means(
        array,
        patch_size=config.nlm_patch_size,
        patch_distance=config.nlm_patch_distance,
        h=config.nlm_h * sigma,
        sigma=sigma,
        fast_mode=True,
        channel_axis=None,
    ).astype(np.float32)
    result = sitk.GetImageFromArray(smoothed)
    result.CopyInformation(image)
    return result


def estimate_noise_sigma(array: np.ndarray) -> float:
    """Robust noise standard deviation from in-plane neighbour differences (MAD), ignoring zero voxels.

    For white noise of standard deviation s, neighbour differences have standard deviation s*sqrt(2); the
    median absolute deviation ignores edges, and skipping zero voxels ignores the skull-stripped background.
    """
    left, right = array[..., :-1], array[..., 1:]
    differences = (right - left)[(left != 0) & (right != 0)]
    if differences.size < 10:
        return float(array.std())
    mad = float(np.median(np.abs(differences - np.median(differences))))
    return 1.4826 * mad / np.sqrt(2.0)


def register(fixed: "sitk.Image", moving: "sitk.Image", config: RegistrationConfig) -> "sitk.Transform":
    """Estimate the rigid/affine transform mapping points of ``fixed`` space into ``moving`` space.

    The result is what ``sitk.Resample(moving, fixed_grid, transform)`` needs to bring ``moving`` onto
    ``fixed``. A fixed sampling seed and a single thread make the estimate deterministic.
    """
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(
        fixed,
        moving,
        sitk.Euler3DTransform() if config.transform == "rigid" else sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.GEOMETRY,
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.histogram_bins)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(config.sampling_fraction, config.seed)
    method.SetNumberOfThreads(1)  # multi-threaded metric sums are reduced in varying order
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=config.iterations, relaxationFactor=0.5
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(config.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(config.smoothing_sigmas_vox))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32))


def target_grid(
    native: Geometry, orientation: str | None, target_spacing: tuple[float, float, float] | None
) -> Geometry:
    """The uncropped preprocessed grid: ``native`` reoriented, then respaced around the same centre.

    With a new spacing the number of voxels per axis is ``round(extent / spacing)`` (at least 1) and the
    grid is placed so that the centre of the field of view does not move.
    """
    import SimpleITK as sitk

    reference = sitk.Image([int(s) for s in reversed(native.shape)], sitk.sitkUInt8)
    reference.SetSpacing(tuple(reversed(native.spacing)))
    reference.SetOrigin(tuple(reversed(native.origin)))
    reference.SetDirection(native.direction)
    oriented = geometry_of(reorient(reference, orientation))
    if target_spacing is None:
        return oriented
    old_shape, old_spacing = np.array(oriented.shape, float), np.array(oriented.spacing, float)
    new_spacing = np.array(target_spacing, float)
    new_shape = np.maximum(1, np.round(old_shape * old_spacing / new_spacing)).astype(int)
    # Keep the physical centre of the field of view: offsets are along the index axes (array order),
    # the direction matrix (x, y, z columns) turns them into physical offsets.
    shift_array_order = (old_shape - 1) / 2 * old_spacing - (new_shape - 1) / 2 * new_spacing
    direction = np.array(oriented.direction, float).reshape(3, 3)
    origin_xyz = np.array(oriented.origin[::-1], float) + direction @ shift_array_order[::-1]
    return Geometry(
        shape=tuple(int(s) for s in new_shape),
        spacing=tuple(float(s) for s in new_spacing),
        origin=tuple(float(o) for o in origin_xyz[::-1]),
        direction=oriented.direction,
    )


_INTERPOLATORS = {"nearest": "sitkNearestNeighbor", "linear": "sitkLinear", "bspline": "sitkBSpline"}


def resample_to_grid(
    image: "sitk.Image",
    grid: Geometry,
    interpolation: Literal["nearest", "linear", "bspline"],
    transform: "sitk.Transform | None" = None,
) -> np.ndarray:
    """Sample ``image`` on ``grid`` (physical space, optional transform) and return the array.

    When ``image`` already lies on ``grid`` and there is no transform, the voxels are returned unchanged,
    so a pipeline that only reorients is exact.
    """
    import SimpleITK as sitk

    if transform is None and not geometry_of(image).differences(grid, atol=1e-6):
        return sitk.GetArrayFromImage(image)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in reversed(grid.shape)])
    resampler.SetOutputSpacing(tuple(reversed(grid.spacing)))
    resampler.SetOutputOrigin(tuple(reversed(grid.origin)))
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(getattr(sitk, _INTERPOLATORS[interpolation]))
    resampler.SetDefaultPixelValue(0)
    if transform is not None:
        resampler.SetTransform(transform)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def _resample_array(array: np.ndarray, source: Geometry, target: Geometry, *, nearest: bool) -> np.ndarray:
    return resample_to_grid(to_sitk(array, source), target, "nearest" if nearest else "linear")


def brain_bounding_box(brain: np.ndarray, margin: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of the smallest box holding ``brain``, grown by ``margin`` voxels.

    An empty mask gives the whole image (nothing to crop to; normalization then uses every voxel).
    """
    if not brain.any():
        return _full_box(brain.shape)
    box = []
    for axis, size in enumerate(brain.shape):
        present = np.flatnonzero(brain.any(axis=tuple(a for a in range(brain.ndim) if a != axis)))
        box.append((max(0, int(present[0]) - margin), min(size, int(present[-1]) + 1 + margin)))
    return tuple(box)


def _full_box(shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((0, int(size)) for size in shape)


def crop_geometry(grid: Geometry, box: tuple[tuple[int, int], ...]) -> Geometry:
    """Geometry of the sub-grid ``box`` of ``grid`` (same spacing and direction, shifted origin)."""
    start = np.array([s for s, _ in box], float)
    direction = np.array(grid.direction, float).reshape(3, 3)
    offset_xyz = direction @ (start * np.array(grid.spacing, float))[::-1]
    origin_xyz = np.array(grid.origin[::-1], float) + offset_xyz
    return Geometry(
        shape=tuple(stop - s for s, stop in box),
        spacing=grid.spacing,
        origin=tuple(float(o) for o in origin_xyz[::-1]),
        direction=grid.direction,
    )


def normalize(array: np.ndarray, brain: np.ndarray, config: NormalizationConfig) -> np.ndarray:
    """Normalize one channel with statistics of the voxels inside ``brain`` (all voxels if it is empty)."""
    array = array.astype(np.float32, copy=False)
    if config.method == "none":
        return array
    values = array[brain] if brain.any() else array.ravel()
    if config.method == "zscore":
        std = float(values.std())
        return (array - float(values.mean())) / (std if std > 1e-8 else 1.0)
    low, high = np.percentile(values, [config.lower_percentile, config.upper_percentile])
    scale = float(high - low) if high > low else 1.0
    return (np.clip(array, low, high) - low) / scale


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------


def case_fingerprint(case: "Case", label_path: Path | None) -> str:
    """Hash of the bytes of the case's images (and label), with the channel names: the cache key."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(case.channel_names)).encode())
    for path in [*case.image_paths, *([label_path] if label_path is not None else [])]:
        digest.update(b"\0file\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _cache_file(cache_dir: Path, case: "Case", config: PreprocessingConfig, label_path: Path | None) -> Path:
    return cache_dir / config.id / f"{case.case_id}.{case_fingerprint(case, label_path)}.npz"


def _geometry_dict(geometry: Geometry) -> dict[str, Any]:
    return {"shape": list(geometry.shape), "spacing": list(geometry.spacing), "origin": list(geometry.origin), "direction": list(geometry.direction)}


def _geometry_from(data: dict[str, Any]) -> Geometry:
    return Geometry(
        shape=tuple(int(v) for v in data["shape"]),
        spacing=tuple(float(v) for v in data["spacing"]),
        origin=tuple(float(v) for v in data["origin"]),
        direction=tuple(float(v) for v in data["direction"]),
    )


def _save_cached(path: Path, result: PreprocessedCase, config: PreprocessingConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    config_file = path.parent / "config.json"
    if not config_file.exists():
        write_text_atomic(config_file, json.dumps(json.loads(config.canonical_json()), indent=2) + "\n")
    meta = {
        "case_id": result.case_id,
        "channel_names": list(result.channel_names),
        "geometry": _geometry_dict(result.geometry),
        "native_geometry": _geometry_dict(result.native_geometry),
        "crop_box": [list(b) for b in result.crop_box],
        "preprocessing_id": result.preprocessing_id,
        "has_label": result.label is not None,
    }
    arrays = {"image": result.image, "brain_mask": result.brain_mask, "meta": np.array(json.dumps(meta))}
    if result.label is not None:
        arrays["label"] = result.label
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _load_cached(path: Path, config: PreprocessingConfig) -> PreprocessedCase | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta["preprocessing_id"] != config.id:
                return None
            return PreprocessedCase(
                case_id=meta["case_id"],
                image=data["image"],
                label=data["label"] if meta["has_label"] else None,
                brain_mask=data["brain_mask"],
                channel_names=tuple(meta["channel_names"]),
                geometry=_geometry_from(meta["geometry"]),
                native_geometry=_geometry_from(meta["native_geometry"]),
                crop_box=tuple((int(a), int(b)) for a, b in meta["crop_box"]),
                preprocessing_id=meta["preprocessing_id"],
            )
    except Exception as exc:  # a truncated or foreign file: recompute rather than fail the run
        logger.warning("ignoring unreadable preprocessing cache file %s (%s)", path, exc)
        return None
