"""MONAI's ``DynUNet``: the nnU-Net-style dynamic U-Net, with kernels and strides planned from the voxel
spacing (``kernel_size="auto"``) and optional deep supervision."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.models.networks.base import NetworkContext, NetworkEntry, plan_stages, require_divisible, total_strides

DEFAULTS: dict[str, Any] = {
    "filters": (16, 32, 64, 128, 256),
    "kernel_size": "auto",
    "strides": "auto",
    "deep_supervision": True,
    "deep_supr_num": 2,
    "res_block": True,
}


class DeepSupervisionAsList(nn.Module):
    """Turn DynUNet's stacked training output ``(B, heads, C, ...)`` into the list the trainer expects."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        if self.training and out.dim() == x.dim() + 1:
            return list(torch.unbind(out, dim=1))
        return out


def build(context: NetworkContext, **params: Any):
    """``monai.networks.nets.DynUNet``; ``kernel_size``/``strides`` ``"auto"`` are planned by
    :func:`~bench.models.networks.base.plan_stages` (upsampling kernels follow the strides)."""
    from monai.networks.nets import DynUNet

    options = {**DEFAULTS, **params}
    filters = tuple(options.pop("filters"))
    kernel_size, strides = options.pop("kernel_size"), options.pop("strides")
    if kernel_size == "auto" or strides == "auto":
        plan = plan_stages(context.patch_size, context.spacing, max_stages=len(filters))
        kernel_size = kernel_size if kernel_size != "auto" else plan.kernels
        strides = strides if strides != "auto" else ((1, 1, 1),) + plan.strides
    if len(kernel_size) != len(strides):
        raise ValueError(f"network dynunet: kernel_size has {len(kernel_size)} stages but strides has {len(strides)}")
    if len(strides) < 3:
        raise ValueError(f"network dynunet: patch size {context.patch_size} allows only {len(strides)} levels, DynUNet needs 3 or more")
    require_divisible("dynunet", context.patch_size, total_strides(strides))
    deep_supervision = bool(options.get("deep_supervision"))
    options["deep_supr_num"] = min(options.get("deep_supr_num", 1), len(strides) - 2) if deep_supervision else 1
    net = DynUNet(
        spatial_dims=3,
        in_channels=context.in_channels,
        out_channels=context.out_channels,
        kernel_size=kernel_size,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=filters[: len(strides)],
        **options,
    )
    return DeepSupervisionAsList(net) if deep_supervision else net


ENTRY = NetworkEntry(
    build=build,
    description="MONAI DynUNet (nnU-Net-style, spacing-aware kernels and strides)",
    encoder_prefixes=("net.input_block.", "net.downsamples.", "net.bottleneck.", "input_block.", "downsamples.", "bottleneck."),
    deep_supervision=True,
)
