"""Patch sampling and training augmentation (MONAI dictionary transforms).

A training sample is a dict ``{"image": (C, z, y, x) float32, "label": (1, z, y, x) uint8,
"foreground": (N, 3) int}`` whose arrays were padded once to at least :func:`context_size`. The
pipeline then

1. crops a *context* patch around a lesion voxel with probability ``sampling.foreground_probability``,
   or around a uniformly drawn voxel otherwise (nnU-Net's foreground oversampling; it only stores the
   lesion coordinates, not every background index, so memory stays small for full-size volumes);
2. applies the spatial augmentations (rotation, elastic deformation) to that larger patch and crops
   its centre, so rotated corners contain real tissue instead of zero padding;
3. flips and applies the intensity augmentations (scale, shift, gamma, noise, simulated low resolution)
   to the image only.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import MapTransform, Randomizable

from bench.models.recipe import AugmentationConfig, SamplingConfig

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


def context_size(patch_size: Sequence[int], augmentation: AugmentationConfig) -> tuple[int, int, int]:
    """Size of the patch cropped before spatial augmentation, so that the centre ``patch_size`` stays
    covered by image data after rotating by the largest configured angles (and deforming)."""
    z, y, x = (int(s) for s in patch_size)
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
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
    )

    keys = ["image", "label"]
    patch = tuple(int(s) for s in patch_size)
    context = context_size(patch, augmentation)
    aug = augmentation
    transforms: list = [RandForegroundCropd(keys, context, sampling.foreground_probability)]
    if aug.rotate.prob > 0:
        inplane, through = math.radians(aug.rotate.inplane_degrees), math.radians(aug.rotate.through_plane_degrees)
        # MONAI's range_x rotates within the plane of the last two axes (y, x), i.e. about the slice axis
        transforms.append(
            RandRotated(keys, range_x=inplane, range_y=through, range_z=through, prob=aug.rotate.prob, mode=("bilinear", "nearest"), padding_mode="zeros")
        )
    if aug.elastic.prob > 0:
        transforms.append(
            Rand3DElasticd(
                keys, sigma_range=aug.elastic.sigma, magnitude_range=aug.elastic.magnitude, prob=aug.elastic.prob, mode=("bilinear", "nearest"), padding_mode="zeros"
            )
        )
    if context != patch:
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
    if aug.low_resolution.prob > 0:
        transforms.append(RandSimulateLowResolutiond("image", zoom_range=aug.low_resolution.zoom, prob=aug.low_resolution.prob))
    transforms.append(EnsureTyped(keys, track_meta=False, dtype=np.float32))
    return Compose(transforms)


def pad_to(array: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Pad a channel-first array symmetrically with zeros so each spatial axis is at least ``size``."""
    pads = [(0, 0)] + [(max(0, s - n) // 2, max(0, s - n) - max(0, s - n) // 2) for n, s in zip(array.shape[1:], size)]
    return np.pad(array, pads) if any(p != (0, 0) for p in pads) else array
