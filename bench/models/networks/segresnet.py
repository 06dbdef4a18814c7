"""MONAI's ``SegResNet`` (Myronenko 2018): residual encoder, light decoder (BraTS winner's backbone)."""

from __future__ import annotations

from typing import Any

from bench.models.networks.base import NetworkContext, NetworkEntry, require_divisible

DEFAULTS: dict[str, Any] = {"init_filters": 16, "blocks_down": (1, 2, 2, 4), "blocks_up": (1, 1, 1), "dropout_prob": None}


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.SegResNet``; ``params`` are its keyword arguments."""
    from monai.networks.nets import SegResNet

    options = {**DEFAULTS, **params}
    factor = 2 ** (len(options["blocks_down"]) - 1)
    require_divisible("segresnet", context.patch_size, (factor,) * 3)
    return SegResNet(spatial_dims=3, in_channels=context.in_channels, out_channels=context.out_channels, **options)


ENTRY = NetworkEntry(build=build, description="MONAI SegResNet (residual encoder)", encoder_prefixes=("convInit.", "down_layers."))
