"""MONAI's residual ``UNet`` (Kerfoot et al. 2018), with strides planned for thick slices by default."""

from __future__ import annotations

from typing import Any

from bench.models.networks.base import NetworkContext, NetworkEntry, channels_and_strides

DEFAULTS: dict[str, Any] = {
    "channels": (16, 32, 64, 128, 256),
    "strides": "auto",
    "num_res_units": 2,
    "norm": "instance",
    "dropout": 0.0,
}


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.UNet``; ``params`` are its keyword arguments (``strides="auto"`` plans them)."""
    from monai.networks.nets import UNet

    options = {**DEFAULTS, **params}
    channels, strides = channels_and_strides("unet", context, options.pop("channels"), options.pop("strides"))
    return UNet(spatial_dims=3, in_channels=context.in_channels, out_channels=context.out_channels, channels=channels, strides=strides, **options)


ENTRY = NetworkEntry(build=build, description="MONAI UNet with residual units (strides auto-planned for anisotropic voxels)")
