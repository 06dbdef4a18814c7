"""MONAI's ``SwinUNETR`` (Hatamizadeh et al. 2022): a Swin-transformer encoder with a convolutional U-Net decoder.

Contract (see :mod:`bench.models.networks.base`): ``build(context, **params)`` returns
``monai.networks.nets.SwinUNETR`` for ``context.in_channels`` inputs and ``context.out_channels``
logits; ``params`` are SwinUNETR's own keyword arguments (``feature_size``, ``depths``, ``num_heads``,
``window_size``, ``use_v2``, ``dropout_path_rate``, ...), over :data:`DEFAULTS`.

Shape constraint: the patch embedding (``patch_size`` voxels, 2 by default) is followed by four 2x
patch-merging stages on *every* axis, so each patch axis must be divisible by ``patch_size ** 5`` (32).
SwinUNETR cannot pool in-plane only, so on thick-slice data (23-60 slices of 2.2-3 mm in BONBID-HIE and
the synthetic sites) the slice axis of the patch is 32 and a volume with fewer slices is padded by
the sliding window. With instance normalisation the bottleneck also needs more than one voxel, so the
smallest usable patch is 32 x 32 x 64. Both checks fail at load time with the rule, instead of deep
inside MONAI or torch.
"""

from __future__ import annotations

import math
from typing import Any

from bench.models.networks.base import NetworkContext, NetworkEntry, merged, require_divisible

#: MONAI's defaults except ``feature_size``: 24 is MONAI's default, 48 the published BTCV model; the
#: GPU schedule sets 48, the CPU schedule 12 (the smallest SwinUNETR accepts: a multiple of 12).
DEFAULTS: dict[str, Any] = {
    "feature_size": 24,
    "depths": (2, 2, 2, 2),
    "num_heads": (3, 6, 12, 24),
    "window_size": 7,
    "patch_size": 2,
    "norm_name": "instance",
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "dropout_path_rate": 0.0,
    "use_v2": False,
}


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.SwinUNETR`` (``spatial_dims=3``); ``params`` are its keyword arguments."""
    from monai.networks.nets import SwinUNETR

    options = merged(DEFAULTS, params)
    token = int(options["patch_size"])
    require_divisible("swin_unetr", context.patch_size, (token**5,) * 3)
    if int(options["feature_size"]) % 12:
        raise ValueError(f"network swin_unetr: feature_size must be a multiple of 12, got {options['feature_size']}")
    bottleneck = [p // token**5 for p in context.patch_size]
    if math.prod(bottleneck) < 2 and options["norm_name"] in ("instance", "INSTANCE"):
        # instance norm cannot normalise a single voxel (torch raises deep in the forward pass)
        raise ValueError(
            f"network swin_unetr: patch size {tuple(context.patch_size)} leaves one voxel at the bottleneck, too few for "
            f"instance normalisation; make one axis {2 * token**5} (e.g. {(token**5, token**5, 2 * token**5)})"
        )
    return SwinUNETR(spatial_dims=3, in_channels=context.in_channels, out_channels=context.out_channels, **options)


ENTRY = NetworkEntry(
    build=build,
    description="MONAI SwinUNETR (Swin-transformer encoder, convolutional decoder)",
    # the transformer encoder and the convolutional skip encoders (MONAI's own module names)
    encoder_prefixes=("swinViT.", "encoder1.", "encoder2.", "encoder3.", "encoder4.", "encoder10."),
)
