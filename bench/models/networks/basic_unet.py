"""MONAI's ``BasicUNet``: a plain four-pooling U-Net (patch sides must be multiples of 16)."""

from __future__ import annotations

from typing import Any

from bench.models.networks.base import NetworkContext, NetworkEntry, require_divisible

DEFAULTS: dict[str, Any] = {"features": (16, 16, 32, 64, 128, 16)}


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.BasicUNet``; ``params`` are its keyword arguments."""
    from monai.networks.nets import BasicUNet

    require_divisible("basic_unet", context.patch_size, (16, 16, 16))
    options = {**DEFAULTS, **params}
    return BasicUNet(spatial_dims=3, in_channels=context.in_channels, out_channels=context.out_channels, **options)


ENTRY = NetworkEntry(
    build=build,
    description="MONAI BasicUNet (isotropic max-pooling, 4 levels)",
    encoder_prefixes=("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."),
)
