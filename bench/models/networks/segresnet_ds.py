"""MONAI's ``SegResNetDS``: the SegResNet that MONAI Auto3DSeg's ``segresnet`` algorithm trains.

Contract (see :mod:`bench.models.networks.base`): ``build(context, **params)`` returns
``monai.networks.nets.SegResNetDS`` for ``context.in_channels`` inputs and ``context.out_channels``
logits; ``params`` are its keyword arguments over :data:`DEFAULTS`, plus ``anisotropic`` (default
``True``): pass the data's voxel spacing as SegResNetDS's ``resolution``, as Auto3DSeg does, so the
first levels use 1 x 3 x 3 kernels and in-plane strides until the in-plane spacing reaches the slice
thickness (``False``: isotropic kernels and strides, the plain SegResNet design).

It differs from the ``segresnet`` entry (``monai.networks.nets.SegResNet``, Myronenko 2018) in what
Auto3DSeg added: deep-supervision heads (``dsdepth`` outputs in training mode, full resolution first,
as the trainer expects) and spacing-aware kernels. The patch must be divisible by the network's own
``shape_factor()``; the check runs at load time with the rule in the message.
"""

from __future__ import annotations

from typing import Any

from bench.models.networks.base import NetworkContext, NetworkEntry, merged, require_divisible

#: Auto3DSeg's segresnet defaults (init_filters 32, five levels, instance norm, four supervised scales).
DEFAULTS: dict[str, Any] = {
    "init_filters": 32,
    "blocks_down": (1, 2, 2, 4, 4),
    "norm": "instance",
    "dsdepth": 4,
    "anisotropic": True,
}


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.SegResNetDS`` (``spatial_dims=3``); see the module docstring for ``params``."""
    from monai.networks.nets import SegResNetDS

    options = merged(DEFAULTS, params)
    anisotropic = bool(options.pop("anisotropic"))
    resolution = tuple(float(s) for s in context.spacing) if anisotropic else None
    net = SegResNetDS(spatial_dims=3, in_channels=context.in_channels, out_channels=context.out_channels, resolution=resolution, **options)
    require_divisible("segresnet_ds", context.patch_size, tuple(int(f) for f in net.shape_factor()))
    return net


ENTRY = NetworkEntry(
    build=build,
    description="MONAI SegResNetDS (Auto3DSeg's SegResNet: residual encoder, deep supervision, spacing-aware kernels)",
    encoder_prefixes=("encoder.",),
    deep_supervision=True,
)
