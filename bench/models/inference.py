"""Compatibility names for the trainer: the inference itself lives in :mod:`bench.inference` (one path).

``sliding_window_probabilities`` is :func:`bench.inference.window_output` plus
:func:`bench.inference.lesion_probability` for a model that already outputs class probabilities (a
:class:`bench.inference.MirroredSoftmax`), configured from a recipe's :class:`InferenceConfig`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bench.inference import WindowSettings, dice, lesion_probability, mirror_combinations, window_output
from bench.inference import MirroredSoftmax  # noqa: F401  (re-exported)
from bench.models.recipe import InferenceConfig

__all__ = ["MirroredSoftmax", "dice", "mirror_combinations", "sliding_window_probabilities", "window_settings"]


def window_settings(patch_size: Sequence[int], config: InferenceConfig) -> WindowSettings:
    """The :class:`WindowSettings` a recipe's inference configuration describes (Gaussian blending)."""
    return WindowSettings(tuple(int(s) for s in patch_size), config.overlap, "gaussian", config.gaussian_sigma_scale, config.sw_batch_size)


def sliding_window_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    config: InferenceConfig,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Lesion probability ``(z, y, x)`` float32 for a ``(C, z, y, x)`` image (model outputs probabilities)."""
    output = window_output(model, image, window_settings(patch_size, config), device, amp=amp, channels_last=channels_last)
    return lesion_probability(output, image.shape[1:], "none", 1)
