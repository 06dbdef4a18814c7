"""The one inference path: sliding windows with flip test-time augmentation, back to the native grid.

Every network prediction in HIE-Bench goes through here: trained folds (:class:`bench.models.monai_model.MonaiPredictor`),
exported and uploaded network submissions (``torchscript``, ``onnx``, ``monai-bundle``, via
:class:`bench.submissions.networks.SlidingWindowPredictor`) and the trainer's validation. So one set of
weights is scored one way:

1. :func:`window_output`: MONAI's sliding-window inference over a ``(C, z, y, x)`` preprocessed image,
   windows blended with a Gaussian (or constant) importance map, zero padding;
2. :func:`lesion_probability`: the network's activation and lesion channel, as float32 ``(z, y, x)``;
3. :func:`native_mask`: the probability is mapped back to the native grid (linear interpolation, which
   gives smoother borders than resampling a mask) and thresholded *there*.

:class:`MirroredSoftmax` averages softmax probabilities over every combination of mirrored axes
(nnU-Net's TTA, per window, so blending sees averaged probabilities). It is what an exported
TorchScript model contains, which is why an export predicts exactly what its trained fold predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from bench.preprocess import PreprocessedCase

Activation = Literal["sigmoid", "softmax", "none"]
#: MONAI's default width of the Gaussian importance map, as a fraction of the window size.
DEFAULT_SIGMA_SCALE = 0.125


@dataclass(frozen=True)
class WindowSettings:
    """How windows are laid over an image and blended."""

    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = DEFAULT_SIGMA_SCALE
    sw_batch_size: int = 1


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the spatial ``axes`` (as tensor dims of a (B, C, z, y, x) batch)."""
    dims = [2 + a for a in axes]
    return [combo for r in range(1, len(dims) + 1) for combo in combinations(dims, r)]


def _mirrored_softmax_class():
    from torch import nn

    class MirroredSoftmax(nn.Module):
        """``softmax(net(x))`` averaged over the mirrored copies of ``x`` along ``mirror_axes`` (0 z, 1 y, 2 x)."""

        def __init__(self, net: nn.Module, mirror_axes: Sequence[int] = ()) -> None:
            super().__init__()
            self.net = net
            self.flips = mirror_combinations(mirror_axes)

        def forward(self, x):
            import torch

            probabilities = torch.softmax(self.net(x).float(), dim=1)
            for dims in self.flips:
                probabilities = probabilities + torch.flip(torch.softmax(self.net(torch.flip(x, dims)).float(), dim=1), dims)
            return probabilities / (1 + len(self.flips))

    return MirroredSoftmax


def __getattr__(name: str) -> Any:  # torch is imported only when the class is first used
    if name == "MirroredSoftmax":
        cls = _mirrored_softmax_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def window_output(
    forward: Callable[["torch.Tensor"], "torch.Tensor"],
    image: np.ndarray,
    settings: WindowSettings,
    device: "torch.device | str",
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> "torch.Tensor":
    """The blended network output ``(1, K, z, y, x)`` (float32, on the CPU) for a ``(C, z, y, x)`` image."""
    import torch
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    if isinstance(forward, torch.nn.Module):
        forward.eval()
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        output = sliding_window_inference(
            inputs,
            roi_size=tuple(int(s) for s in settings.patch_size),
            sw_batch_size=settings.sw_batch_size,
            predictor=forward,
            overlap=settings.overlap,
            mode=settings.blend,
            sigma_scale=settings.sigma_scale,
            padding_mode="constant",
            cval=0.0,
        )
    return output.float().cpu()


class OutputError(ValueError):
    """The network's output does not have the shape or channels the manifest says."""


def lesion_probability(output: "torch.Tensor", spatial_shape: Sequence[int], activation: Activation, lesion_channel: int) -> np.ndarray:
    """Lesion probability ``(z, y, x)`` float32 from a ``(1, K, z, y, x)`` output."""
    import torch

    if not isinstance(output, torch.Tensor) or output.ndim != 5 or tuple(output.shape[2:]) != tuple(spatial_shape):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise OutputError(f"the network returned {shape} for an image of spatial shape {tuple(spatial_shape)}")
    if activation == "sigmoid":
        output = torch.sigmoid(output)
    elif activation == "softmax":
        output = torch.softmax(output, dim=1)
    channels = output.shape[1]
    if not -channels <= lesion_channel < channels:
        raise OutputError(f"lesion_channel {lesion_channel} but the network has {channels} output channels")
    return output[0, lesion_channel].numpy().astype(np.float32, copy=False)


def native_mask(prepared: "PreprocessedCase", probability: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, mask)`` on the case's native grid: interpolate the probability, then threshold."""
    native = np.clip(np.asarray(prepared.to_native(probability), dtype=np.float32), 0.0, 1.0)
    return native, native > threshold


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (a correct "no lesion")."""
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total
