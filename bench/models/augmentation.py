"""Patch sampling and training augmentation (MONAI dictionary transforms).

A training sample is a dict ``{"image": (C, z, y, x) float32, "label": (1, z, y, x) uint8,
"foreground": (N, 3) int}`` whose arrays were padded once to at least :func:`context_size`. The
pipeline then

1. crops a *context* patch around a lesion voxel with probability ``sampling.foreground_probability``,
   or around a uniformly drawn voxel otherwise (nnU-Net's foreground oversampling; it only stores the
   lesion coordinates, not every background index, so memory stays small for full-size volumes);
2. deforms that larger patch elastically (if configured), then cuts the patch from its centre, rotated
   and scaled at random in one resampling on the patch's own grid (:class:`RandRotateScaleCropd`,
   nnU-Net's spatial transform: a scale ``s`` shows ``s`` times as much tissue), so rotated and scaled
   corners contain real tissue instead of zero padding;
3. flips and applies the intensity augmentations (scale, shift, gamma, noise, Gaussian blur,
   simulated low resolution) to the image only.

Together with the rotation, the scale (0.7-1.4, probability 0.2) and blur (sigma 0.5-1 voxel,
probability 0.2, half of the channels) augmentations are those of nnU-Net's default trainer, so
entrants trained here see the range of resolutions nnU-Net's augmentation shows its network.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform, Randomizable

from bench.models.recipe import AugmentationConfig, BlurAug, RotateAug, SamplingConfig, ScaleAug

#: Extra voxels around the patch, per side, given to elastic deformation.
ELASTIC_MARGIN = 4


class RandForegroundCropd(Randomizable, MapTransform):
    """Crop ``size`` voxels centred on a foreground voxel with probability ``foreground_probability``.

    The arrays must already be at least ``size`` large (pad once when loading). The coordinates of the
    foreground voxels are read from (and removed from) ``data[foreground_key]``; a case without lesion
    always gets a uniformly random centre.
    """

    def __init__(self, keys: Sequence[Hashable], size: Sequence[int], foreground_probability: float, foreground_key: str = "foreground") -> None:
        MapTransform.__init__(self, keys)
        self.size = np.asarray(size, dtype=int)
        self.foreground_probability = float(foreground_probability)
        self.foreground_key = foreground_key

    def randomize(self, data: Any = None) -> None:  # the draw depends on the sample; see __call__
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        foreground = np.asarray(d.pop(self.foreground_key, np.zeros((0, 3), dtype=int)))
        shape = np.asarray(d[self.keys[0]].shape[1:], dtype=int)
        if np.any(shape < self.size):
            raise ValueError(f"array of shape {tuple(shape)} is smaller than the crop {tuple(self.size)}; pad it first")
        if len(foreground) and self.R.rand() < self.foreground_probability:
            center = foreground[self.R.randint(len(foreground))]
        else:
            center = np.array([self.R.randint(s) for s in shape])
        start = np.clip(center - self.size // 2, 0, shape - self.size)
        window = (slice(None),) + tuple(slice(int(a), int(a + n)) for a, n in zip(start, self.size))
        for key in self.key_iterator(d):
            d[key] = d[key][window]
        return d


def scaled_axes(scale: ScaleAug) -> tuple[int, ...]:
    """The axes the scale augmentation resizes: in-plane (y, x), or all three with ``through_plane``."""
    return (0, 1, 2) if scale.through_plane else (1, 2)


def rotation_matrix(inplane: float, about_y: float, about_x: float) -> np.ndarray:
    """3 x 3 rotation in array index space (z, y, x): ``inplane`` radians about the slice axis (within
    the y-x plane), then ``about_y`` (z-x plane) and ``about_x`` (z-y plane), the through-plane tilts."""
    c, s = math.cos(inplane), math.sin(inplane)
    in_plane = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = math.cos(about_y), math.sin(about_y)
    tilt_y = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    c, s = math.cos(about_x), math.sin(about_x)
    tilt_x = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return in_plane @ tilt_y @ tilt_x


class RandRotateScaleCropd(Randomizable, MapTransform):
    """Cut the patch from the centre of a larger context patch, rotated and scaled at random, in one
    resampling on the patch's own grid (as nnU-Net's spatial transform does).

    Rotation fires with ``rotate.prob`` (in-plane angle and two through-plane tilts drawn uniformly
    within the configured degrees), scaling with ``scale.prob`` (one factor ``s ~ U(scale.range)`` for the
    scaled axes: the patch shows ``s`` times as much tissue). Neither: a plain centre crop. Rotation is
    in voxel space, like MONAI's ``RandRotate`` and nnU-Net's. Image trilinear, label nearest, zeros
    outside (which :func:`context_size` keeps away from the patch).
    """

    def __init__(self, keys: Sequence[Hashable], size: Sequence[int], rotate: RotateAug, scale: ScaleAug, label_key: str = "label") -> None:
        MapTransform.__init__(self, keys)
        self.size = tuple(int(s) for s in size)
        self.rotate, self.scale = rotate, scale
        self.label_key = label_key
        self._matrix: np.ndarray | None = None
        self._offsets = None

    def randomize(self, data: Any = None) -> None:
        rotated = self.rotate.prob > 0 and self.R.rand() < self.rotate.prob
        scaled = self.scale.prob > 0 and self.R.rand() < self.scale.prob
        inplane, through = math.radians(self.rotate.inplane_degrees), math.radians(self.rotate.through_plane_degrees)
        angles = [self.R.uniform(-inplane, inplane), self.R.uniform(-through, through), self.R.uniform(-through, through)] if rotated else [0.0, 0.0, 0.0]
        factor = float(self.R.uniform(*self.scale.range)) if scaled else 1.0
        if not (rotated or scaled):
            self._matrix = None
            return
        stretch = np.diag([factor if axis in scaled_axes(self.scale) else 1.0 for axis in range(3)])
        self._matrix = rotation_matrix(*angles) @ stretch

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        import torch

        self.randomize()
        d = dict(data)
        for key in self.key_iterator(d):
            array = torch.as_tensor(d[key])
            shape = tuple(int(n) for n in array.shape[1:])
            if self._matrix is None:
                start = [(n - p) // 2 for n, p in zip(shape, self.size)]
                d[key] = array[(slice(None),) + tuple(slice(a, a + p) for a, p in zip(start, self.size))]
                continue
            d[key] = self._resample(array, shape, key == self.label_key)
        return d

    def _resample(self, array, shape: tuple[int, ...], is_label: bool):
        import torch

        if getattr(self, "_offsets", None) is None:
            axes = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in self.size]
            self._offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (z, y, x, 3) output offsets
        matrix = torch.as_tensor(self._matrix, dtype=torch.float32)
        # source offset = matrix @ output offset, written out: a (N x 3) @ (3 x 3) matmul hits a slow
        # multi-threaded BLAS path on small CPUs (tens of ms instead of a fraction of one)
        o = self._offsets
        source = o[..., 0:1] * matrix[:, 0] + o[..., 1:2] * matrix[:, 1] + o[..., 2:3] * matrix[:, 2]
        centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float32)
        half = torch.tensor([max(n - 1, 1) / 2 for n in shape], dtype=torch.float32)
        sample_grid = ((source + centre) / half - 1).flip(-1)[None]  # grid_sample wants (x, y, z)
        values = array.as_tensor() if hasattr(array, "as_tensor") else array
        out = torch.nn.functional.grid_sample(
            values[None].float(), sample_grid, mode="nearest" if is_label else "bilinear", padding_mode="zeros", align_corners=True
        )[0]
        return out.to(values.dtype) if is_label else out


class RandBlurd(Randomizable, MapTransform):
    """nnU-Net's Gaussian blur: with probability ``prob`` per patch, each channel with probability
    ``prob_per_channel``, a sigma (voxels) drawn per channel and per axis from ``sigma``; in-plane only
    unless ``through_plane``."""

    def __init__(self, keys: Sequence[Hashable], blur: BlurAug) -> None:
        MapTransform.__init__(self, keys)
        self.blur = blur

    def randomize(self, data: Any = None) -> None:  # drawn per channel in __call__
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        import torch
        from scipy.ndimage import gaussian_filter

        d = dict(data)
        if not (self.blur.prob > 0 and self.R.rand() < self.blur.prob):
            return d
        for key in self.key_iterator(d):
            array = torch.as_tensor(d[key])
            out = array.detach().cpu().numpy().astype(np.float32, copy=True)
            for channel in range(out.shape[0]):
                if self.R.rand() >= self.blur.prob_per_channel:
                    continue
                sigma = [float(self.R.uniform(*self.blur.sigma)) for _ in range(3)]
                if not self.blur.through_plane:
                    sigma[0] = 0.0
                out[channel] = gaussian_filter(out[channel], sigma=sigma, mode="nearest", truncate=3.0)
            d[key] = torch.from_numpy(out)
        return d


def context_size(patch_size: Sequence[int], augmentation: AugmentationConfig) -> tuple[int, int, int]:
    """Size of the patch cropped before spatial augmentation, so that the centre ``patch_size`` (or, when
    it is scaled, ``patch_size x max(scale range)``) stays covered by image data after rotating by the
    largest configured angles (and deforming)."""
    z, y, x = (int(s) for s in patch_size)
    if augmentation.scale.prob > 0 and augmentation.scale.range[1] > 1:
        grow = augmentation.scale.range[1]
        axes = scaled_axes(augmentation.scale)
        z, y, x = (math.ceil(n * grow) if axis in axes else n for axis, n in enumerate((z, y, x)))
    rotate = augmentation.rotate
    if rotate.prob > 0:
        a = math.radians(rotate.inplane_degrees)
        b = math.radians(rotate.through_plane_degrees)
        y, x = (math.ceil(y * abs(math.cos(a)) + x * abs(math.sin(a))), math.ceil(x * abs(math.cos(a)) + y * abs(math.sin(a))))
        z = math.ceil(z * abs(math.cos(b)) + max(y, x) * abs(math.sin(b)))
        y = max(y, math.ceil(y * abs(math.cos(b)) + z * abs(math.sin(b))))
        x = max(x, math.ceil(x * abs(math.cos(b)) + z * abs(math.sin(b))))
    if augmentation.elastic.prob > 0:
        z, y, x = z + 2 * ELASTIC_MARGIN, y + 2 * ELASTIC_MARGIN, x + 2 * ELASTIC_MARGIN
    return (z, y, x)


def build_train_transform(patch_size: Sequence[int], augmentation: AugmentationConfig, sampling: SamplingConfig):
    """The training pipeline described in the module docstring, as a MONAI ``Compose``."""
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        EnsureTyped,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
    )

    keys = ["image", "label"]
    patch = tuple(int(s) for s in patch_size)
    context = context_size(patch, augmentation)
    aug = augmentation
    transforms: list = [RandForegroundCropd(keys, context, sampling.foreground_probability)]
    if aug.elastic.prob > 0:
        transforms.append(
            Rand3DElasticd(
                keys, sigma_range=aug.elastic.sigma, magnitude_range=aug.elastic.magnitude, prob=aug.elastic.prob, mode=("bilinear", "nearest"), padding_mode="zeros"
            )
        )
    if aug.rotate.prob > 0 or aug.scale.prob > 0:
        transforms.append(RandRotateScaleCropd(keys, patch, aug.rotate, aug.scale))
    elif context != patch:
        transforms.append(CenterSpatialCropd(keys, roi_size=patch))
    if aug.flip.prob > 0:
        transforms += [RandFlipd(keys, prob=aug.flip.prob, spatial_axis=axis) for axis in aug.flip.axes]
    if aug.intensity_scale.prob > 0:
        transforms.append(RandScaleIntensityd("image", factors=aug.intensity_scale.factor, prob=aug.intensity_scale.prob))
    if aug.intensity_shift.prob > 0:
        transforms.append(RandShiftIntensityd("image", offsets=aug.intensity_shift.offset, prob=aug.intensity_shift.prob))
    if aug.gamma.prob > 0:
        transforms.append(RandAdjustContrastd("image", gamma=aug.gamma.range, prob=aug.gamma.prob, retain_stats=True))
    if aug.noise.prob > 0:
        transforms.append(RandGaussianNoised("image", std=aug.noise.std, prob=aug.noise.prob))
    if aug.blur.prob > 0:
        transforms.append(RandBlurd("image", aug.blur))
    if aug.low_resolution.prob > 0:
        transforms.append(RandSimulateLowResolutiond("image", zoom_range=aug.low_resolution.zoom, prob=aug.low_resolution.prob))
    transforms.append(EnsureTyped(keys, track_meta=False, dtype=np.float32))
    return Compose(transforms)


def pad_to(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Pad a channel-first array symmetrically with zeros so each spatial axis is at least ``size``."""
    pads = [(0, 0)] + [(max(0, s - n) // 2, max(0, s - n) - max(0, s - n) // 2) for n, s in zip(array.shape[1:], size)]
    return np.pad(array, pads) if any(p != (0, 0) for p in pads) else array
