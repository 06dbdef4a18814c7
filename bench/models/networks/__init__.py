"""The network registry: architecture name (as written in a recipe) -> :class:`NetworkEntry`.

Adding an architecture takes one file in this folder that defines ``build(context, **params)`` and an
``ENTRY``, plus one line in :data:`NETWORKS` below. Registration is explicit on purpose: no package
scanning, no class lookup from strings, so what a recipe can name is exactly what this dict lists.

Importing this package imports torch; only training and inference code paths do.
"""

from __future__ import annotations

from typing import Any

from bench.models.networks import aniso_unet, attention_unet, basic_unet, dynunet, segresnet, segresnet_ds, swin_unetr, unet
from bench.models.networks.base import NetworkContext, NetworkEntry, StagePlan, plan_stages

NETWORKS: dict[str, NetworkEntry] = {
    "unet": unet.ENTRY,
    "basic_unet": basic_unet.ENTRY,
    "segresnet": segresnet.ENTRY,
    "attention_unet": attention_unet.ENTRY,
    "dynunet": dynunet.ENTRY,
    "aniso_unet": aniso_unet.ENTRY,
    "segresnet_ds": segresnet_ds.ENTRY,
    "swin_unetr": swin_unetr.ENTRY,
}


def get_entry(name: str) -> NetworkEntry:
    """The registered architecture ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return NETWORKS[name]
    except KeyError:
        raise KeyError(f"unknown network {name!r}; registered networks: {', '.join(sorted(NETWORKS))}") from None


def build_network(name: str, params: dict[str, Any], context: NetworkContext):
    """Build the architecture ``name`` with the recipe's ``params`` for data described by ``context``.

    Wrong keyword arguments become a ``ValueError`` naming the network, instead of a bare ``TypeError``
    from deep inside MONAI.
    """
    entry = get_entry(name)
    try:
        return entry.build(context, **params)
    except TypeError as exc:
        raise ValueError(f"network {name}: invalid params {sorted(params)} ({exc})") from exc


__all__ = ["NETWORKS", "NetworkContext", "NetworkEntry", "StagePlan", "build_network", "get_entry", "plan_stages"]
