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

Voxel uncertainty from the same passes (issue 14). ``MirroredSoftmax(net, axes, with_variance=True)``
appends one channel to its output: the population variance of the lesion-class probability over the
mirrored copies it already ran (no extra forward pass; the first ``K`` channels are bit for bit those of
the plain module). Sliding-window blending weights that channel like the probabilities, so a voxel gets
the importance-weighted mean of its windows' flip variances. :func:`split_uncertainty_channel` and
:func:`tta_variance` read it (an exported TorchScript fold names it ``uncertainty_channel`` in its manifest),
:func:`native_uncertainty` maps it back to the native grid exactly as the probability (linear
interpolation, then clipped to [0, 0.25]): uncertainty lives where the probability lives. MC dropout
(:func:`mc_dropout_output`) costs ``n_samples`` more passes and is opt-in
(:class:`bench.uncertainty.UncertaintySettings`); it needs the network itself (a traced export has its
dropout frozen). Which map a case's uncertainty is, is recorded as its source string
(:data:`bench.uncertainty.UNCERTAINTY_SOURCES`; docs/interpretability.md).
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

        def __init__(self, net: nn.Module, mirror_axes: Sequence[int] = (), *, with_variance: bool = False, lesion_channel: int = 1) -> None:
            super().__init__()
            self.net = net
            self.flips = mirror_combinations(mirror_axes)
            #: Append the flip variance of class ``lesion_channel`` as one more output channel.
            self.with_variance = bool(with_variance)
            self.lesion_channel = int(lesion_channel)

        def forward(self, x):
            import torch

            probabilities = torch.softmax(self.net(x).float(), dim=1)
            members = [probabilities[:, self.lesion_channel : self.lesion_channel + 1]] if self.with_variance else []
            for dims in self.flips:
                member = torch.flip(torch.softmax(self.net(torch.flip(x, dims)).float(), dim=1), dims)
                if self.with_variance:
                    members.append(member[:, self.lesion_channel : self.lesion_channel + 1])
                probabilities = probabilities + member
            mean = probabilities / (1 + len(self.flips))
            if not self.with_variance:
                return mean
            # Two-pass population variance over the members (no cancellation: exactly 0 when they agree).
            centre = mean[:, self.lesion_channel : self.lesion_channel + 1]
            variance = torch.stack([(m - centre) ** 2 for m in members]).mean(dim=0)
            return torch.cat([mean, variance], dim=1)

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
    keep_mode: bool = False,
) -> "torch.Tensor":
    """The blended network output ``(1, K, z, y, x)`` (float32, on the CPU) for a ``(C, z, y, x)`` image.

    A ``torch.nn.Module`` is put in eval mode first, unless ``keep_mode`` (MC dropout: the caller has
    switched its dropout layers on, :func:`bench.uncertainty.dropout_enabled`)."""
    import torch
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    if isinstance(forward, torch.nn.Module) and not keep_mode:
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


def tta_variance(output: "torch.Tensor", spatial_shape: Sequence[int], channel: int = -1) -> np.ndarray:
    """The flip-TTA variance ``(z, y, x)`` float32 in [0, 0.25]: channel ``channel`` (default the last) of
    the blended output of a ``MirroredSoftmax(..., with_variance=True)`` (its lesion channel is then ``1``
    of the first ``K``). NaN stays NaN (the guard refuses it)."""
    import torch

    if not isinstance(output, torch.Tensor) or output.ndim != 5 or tuple(output.shape[2:]) != tuple(spatial_shape) or output.shape[1] < 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise OutputError(f"expected probabilities and a variance channel for spatial shape {tuple(spatial_shape)}, got {shape}")
    if not -output.shape[1] <= channel < output.shape[1]:
        raise OutputError(f"uncertainty_channel {channel} but the network has {output.shape[1]} output channels")
    return np.clip(output[0, channel].numpy().astype(np.float32, copy=False), 0.0, 0.25)


def split_uncertainty_channel(output: "torch.Tensor", channel: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``(the other channels, the uncertainty channel)`` of a ``(1, K + 1, z, y, x)`` output, each 5-D: what
    :func:`lesion_probability` and :func:`tta_variance` read when a manifest names an ``uncertainty_channel``
    (its ``lesion_channel`` then indexes the other channels)."""
    import torch

    if not isinstance(output, torch.Tensor) or output.ndim != 5 or output.shape[1] < 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise OutputError(f"expected probabilities and an uncertainty channel, got {shape}")
    channels = output.shape[1]
    if not -channels <= channel < channels:
        raise OutputError(f"uncertainty_channel {channel} but the network has {channels} output channels")
    index = channel % channels
    others = [c for c in range(channels) if c != index]
    return output[:, others], output[:, index : index + 1]


def native_uncertainty(prepared: "PreprocessedCase", uncertainty: np.ndarray, *, kind: str = "variance") -> np.ndarray:
    """A voxel uncertainty map on the case's native grid, mapped like the probability (linear interpolation,
    :meth:`~bench.preprocess.PreprocessedCase.to_native`) and clipped to its range
    (:data:`bench.uncertainty.MAP_RANGES`)."""
    from bench.uncertainty import MAP_RANGES

    return np.clip(np.asarray(prepared.to_native(np.asarray(uncertainty, dtype=np.float32)), dtype=np.float32), 0.0, MAP_RANGES[kind])


def mc_dropout_output(
    net: "torch.nn.Module",
    image: np.ndarray,
    settings: WindowSettings,
    device: "torch.device | str",
    *,
    n_samples: int = 8,
    seed: int = 0,
    lesion_channel: int = 1,
    activation: Activation = "none",
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray] | None:
    """MC dropout through the one sliding-window path: mean and population variance ``(z, y, x)`` of the
    lesion probability over ``n_samples`` passes with only the dropout layers active; ``None`` when
    ``net`` has no dropout layer with ``p > 0`` (then there is nothing to sample).

    ``net`` is the network or a :class:`MirroredSoftmax` around it (``activation="none"``; each sample is
    then a flip-TTA mean). Costs ``n_samples`` full inferences: opt-in only. The torch seed is set for the
    samples and restored afterwards.
    """
    import torch

    from bench.uncertainty import dropout_enabled, mc_dropout_available

    if n_samples < 2:
        raise ValueError(f"MC dropout needs at least 2 samples, got {n_samples}")
    if not mc_dropout_available(net):
        return None
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with dropout_enabled(net):
            samples = []
            for _ in range(n_samples):
                output = window_output(net, image, settings, device, amp=amp, keep_mode=True)
                samples.append(lesion_probability(output[:, : output.shape[1] - int(getattr(net, "with_variance", False))],
                                                  image.shape[1:], activation, lesion_channel))
    finally:
        torch.random.set_rng_state(state)
    stack = np.stack(samples)
    return stack.mean(axis=0).astype(np.float32), stack.var(axis=0).astype(np.float32)


def native_mask(prepared: "PreprocessedCase", probability: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, mask)`` on the case's native grid: interpolate the probability, then threshold."""
    native = np.clip(np.asarray(prepared.to_native(probability), dtype=np.float32), 0.0, 1.0)
    return native, native > threshold


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (a correct "no lesion")."""
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, reference).sum()) / total
