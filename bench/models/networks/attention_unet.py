"""MONAI's ``AttentionUnet`` (Oktay et al. 2018): attention gates on the skip connections, which help
suppress the many lesion-like bright structures around small HIE lesions."""

from __future__ import annotations

from typing import Any

from bench.models.networks.base import NetworkContext, NetworkEntry, channels_and_strides

DEFAULTS: dict[str, Any] = {"channels": (16, 32, 64, 128, 256), "strides": "auto", "dropout": 0.0}


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.AttentionUnet``; ``params`` are its keyword arguments (``strides="auto"`` plans them)."""
    from monai.networks.nets import AttentionUnet

    options = {**DEFAULTS, **params}
    channels, strides = channels_and_strides("attention_unet", context, options.pop("channels"), options.pop("strides"))
    return AttentionUnet(spatial_dims=3, in_channels=context.in_channels, out_channels=context.out_channels, channels=channels, strides=strides, **options)


ENTRY = NetworkEntry(build=build, description="MONAI Attention U-Net (attention-gated skips)")
