"""Whole-volume inference: Gaussian-weighted sliding windows with flip test-time augmentation.

:class:`MirroredSoftmax` turns a network's logits into lesion-class probabilities averaged over every
combination of mirrored axes (nnU-Net's test-time augmentation, done per window so the windows' blending
sees the averaged probabilities). The same module is what :func:`bench.models.export.export_fold` traces
into TorchScript, so an exported submission predicts exactly what the trained run predicts.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bench.models.recipe import InferenceConfig


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the spatial ``axes`` (as tensor dims of a (B, C, z, y, x) batch)."""
    dims = [2 + a for a in axes]
    return [combo for r in range(1, len(dims) + 1) for combo in combinations(dims, r)]


class MirroredSoftmax(nn.Module):
    """``softmax(net(x))`` averaged over the mirrored copies of ``x`` along ``mirror_axes`` (0 z, 1 y, 2 x).

    Returns class probabilities ``(B, out_channels, z, y, x)``; with no mirror axes it is a plain softmax.
    """

    def __init__(self, net: nn.Module, mirror_axes: Sequence[int] = ()) -> None:
        super().__init__()
        self.net = net
        self.flips = mirror_combinations(mirror_axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(self.net(x).float(), dim=1)
        for dims in self.flips:
            probabilities = probabilities + torch.flip(torch.softmax(self.net(torch.flip(x, dims)).float(), dim=1), dims)
        return probabilities / (1 + len(self.flips))


def sliding_window_probabilities(
    model: nn.Module,
    image: np.ndarray,
    patch_size: Sequence[int],
    config: InferenceConfig,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Lesion probability ``(z, y, x)`` float32 for a ``(C, z, y, x)`` image.

    ``model`` maps a window batch to class probabilities (a :class:`MirroredSoftmax`). Windows of
    ``patch_size`` overlap by ``config.overlap`` and are blended with a Gaussian importance map (centre
    voxels, which saw the most context, count most); images smaller than a window are zero-padded.
    """
    from monai.inferers import sliding_window_inference

    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        output = sliding_window_inference(
            inputs,
            roi_size=tuple(int(s) for s in patch_size),
            sw_batch_size=config.sw_batch_size,
            predictor=model,
            overlap=config.overlap,
            mode="gaussian",
            sigma_scale=config.gaussian_sigma_scale,
            padding_mode="constant",
            cval=0.0,
        )
    return output[0, 1].float().cpu().numpy()


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (a correct "no lesion")."""
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total
