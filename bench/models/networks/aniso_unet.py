"""An anisotropic 3-D U-Net for small lesions in thick-slice diffusion MRI.

BONBID-HIE's ADC maps have millimetre pixels in-plane but slices several times thicker, and many
lesions are only a few voxels across. An isotropic U-Net pools the slice axis as often as the in-plane
axes, so after two poolings a 3-slice lesion has vanished from the feature maps, and its 3 x 3 x 3
kernels mix tissue from slices far apart. This network therefore

* plans its stages from the voxel spacing (:func:`~bench.models.networks.base.plan_stages`): the first
  stages down-sample **in-plane only** (stride 1 x 2 x 2) with 1 x 3 x 3 kernels, and the slice axis
  joins only once the in-plane spacing has caught up with the slice thickness;
* stops pooling while feature maps still hold ``min_size`` voxels, keeping small lesions resolvable;
* uses residual encoder blocks (MONAI ``UnetResBlock``) and transposed-convolution decoder blocks
  (``UnetUpBlock``) with instance norm and leaky ReLU, as nnU-Net does;
* adds **deep supervision**: 1 x 1 x 1 heads on the coarser decoder levels whose logits are returned,
  after the full-resolution ones, in training mode (the loss compares each with a resized target),
  which gives the deep layers a direct gradient from the few lesion voxels.

In eval mode it returns only the full-resolution logits, so inference and TorchScript export see an
ordinary segmentation network.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from bench.models.networks.base import NetworkContext, NetworkEntry, plan_stages, require_divisible, total_strides

DEFAULTS: dict[str, Any] = {
    "features": (16, 32, 64, 128, 256),
    "blocks_per_stage": (1, 2, 2, 2, 2),
    "deep_supervision": True,
    "deep_supervision_heads": 2,
    "anisotropy_threshold": 2.0,
    "min_size": 4,
    "dropout": 0.0,
    "kernels": "auto",
    "strides": "auto",
}


class AnisoUNet(nn.Module):
    """Residual U-Net with per-stage anisotropic kernels and strides and deep supervision.

    Args:
        in_channels: input channels (2: ADC and Z-ADC).
        out_channels: output channels (2: background and lesion logits).
        kernels: one (z, y, x) kernel size per stage.
        strides: one (z, y, x) stride per down-sampling, ``len(kernels) - 1`` of them.
        features: channels per stage (at least ``len(kernels)``).
        blocks_per_stage: residual blocks per encoder stage (an int applies to all stages).
        deep_supervision: return coarser logits too in training mode.
        deep_supervision_heads: how many coarser decoder levels get a head.
        dropout: dropout probability inside the blocks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernels: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        features: Sequence[int],
        blocks_per_stage: int | Sequence[int] = 2,
        deep_supervision: bool = True,
        deep_supervision_heads: int = 2,
        dropout: float = 0.0,
    ) -> None:
        from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock

        super().__init__()
        n_stages = len(kernels)
        if len(strides) != n_stages - 1:
            raise ValueError(f"AnisoUNet: {n_stages} stages need {n_stages - 1} strides, got {len(strides)}")
        if len(features) < n_stages:
            raise ValueError(f"AnisoUNet: {n_stages} stages need {n_stages} feature sizes, got {len(features)}")
        blocks = [blocks_per_stage] * n_stages if isinstance(blocks_per_stage, int) else list(blocks_per_stage)
        if len(blocks) < n_stages or min(blocks[:n_stages]) < 1:
            raise ValueError(f"AnisoUNet: blocks_per_stage needs {n_stages} positive entries, got {blocks_per_stage}")
        norm = ("INSTANCE", {"affine": True})
        act = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
        drop = dropout or None

        self.encoder = nn.ModuleList()
        previous = in_channels
        for stage in range(n_stages):
            stride = (1, 1, 1) if stage == 0 else tuple(strides[stage - 1])
            layers = [UnetResBlock(3, previous, features[stage], kernels[stage], stride, norm_name=norm, act_name=act, dropout=drop)]
            layers += [
                UnetResBlock(3, features[stage], features[stage], kernels[stage], 1, norm_name=norm, act_name=act, dropout=drop)
                for _ in range(blocks[stage] - 1)
            ]
            self.encoder.append(nn.Sequential(*layers))
            previous = features[stage]

        # decoder[j] brings stage n_stages-1-j up to stage n_stages-2-j
        self.decoder = nn.ModuleList(
            UnetUpBlock(
                3,
                features[stage],
                features[stage - 1],
                kernel_size=kernels[stage - 1],
                stride=1,
                upsample_kernel_size=strides[stage - 1],
                norm_name=norm,
                act_name=act,
                dropout=drop,
            )
            for stage in range(n_stages - 1, 0, -1)
        )
        self.head = UnetOutBlock(3, features[0], out_channels)
        self.deep_supervision = deep_supervision
        n_heads = max(0, min(deep_supervision_heads, n_stages - 2)) if deep_supervision else 0
        # heads for decoder levels 1..n_heads (level 0 is the full-resolution main head)
        self.deep_heads = nn.ModuleList(UnetOutBlock(3, features[level], out_channels) for level in range(1, n_heads + 1))

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        coarse: list[torch.Tensor] = []
        n_up = len(self.decoder)
        for j, up in enumerate(self.decoder):
            x = up(x, skips.pop())
            level = n_up - 1 - j  # resolution level of x after this block (0 = full resolution)
            if self.training and 1 <= level <= len(self.deep_heads):
                coarse.append(self.deep_heads[level - 1](x))
        logits = self.head(x)
        if self.training and self.deep_supervision and len(self.deep_heads) > 0:
            return [logits] + coarse[::-1]  # full resolution first, then 1/2, 1/4, ...
        return logits


def build(context: NetworkContext, **params: Any) -> AnisoUNet:
    """Plan the stages from ``context`` (unless ``kernels``/``strides`` are given) and build the network."""
    options = {**DEFAULTS, **params}
    features = tuple(options.pop("features"))
    kernels, strides = options.pop("kernels"), options.pop("strides")
    threshold, min_size = options.pop("anisotropy_threshold"), options.pop("min_size")
    if kernels == "auto" or strides == "auto":
        plan = plan_stages(context.patch_size, context.spacing, max_stages=len(features), min_size=min_size, anisotropy_threshold=threshold)
        kernels = plan.kernels if kernels == "auto" else kernels
        strides = plan.strides if strides == "auto" else strides
    if len(kernels) < 2:
        raise ValueError(f"network aniso_unet: patch size {context.patch_size} allows no down-sampling; use a larger patch")
    require_divisible("aniso_unet", context.patch_size, total_strides(strides))
    return AnisoUNet(context.in_channels, context.out_channels, kernels=kernels, strides=strides, features=features, **options)


ENTRY = NetworkEntry(
    build=build,
    description="Anisotropic residual U-Net: in-plane-only down-sampling in early stages, deep supervision",
    encoder_prefixes=("encoder.",),
    deep_supervision=True,
)
