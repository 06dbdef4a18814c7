"""What every network builder receives and returns, and the shared stage planner.

A builder is a function ``build(context: NetworkContext, **params) -> torch.nn.Module``. ``params`` are
the recipe's ``network.params``; ``context`` says what the data look like (channels, patch size and
voxel spacing of the preprocessed grid, all in array-axis order z, y, x), so a builder can adapt
strides and kernels to thick slices instead of asking the recipe author to compute them.

Output convention (the trainer relies on it):

* in ``eval()`` mode a network returns one tensor of logits ``(B, out_channels, z, y, x)``;
* in ``train()`` mode a network with deep supervision returns a list of logits, full resolution
  first, then coarser ones (any shape: the loss resizes the target to each); without deep
  supervision it returns a single tensor as in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NetworkContext:
    """Facts about the data a network is built for."""

    in_channels: int
    out_channels: int
    #: Training patch size (z, y, x); inference uses windows of the same size.
    patch_size: tuple[int, int, int]
    #: Voxel spacing of the preprocessed grid in mm (z, y, x).
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class NetworkEntry:
    """A registered architecture.

    ``encoder_prefixes`` lists the state-dict key prefixes of the encoder (used to freeze it during
    transfer learning); ``None`` means the architecture does not declare its encoder, and asking to
    freeze it is an error rather than a guess.
    """

    build: Callable[..., "torch.nn.Module"]
    description: str
    encoder_prefixes: tuple[str, ...] | None = None
    #: True when the network can return deep-supervision outputs in training mode.
    deep_supervision: bool = False


@dataclass(frozen=True)
class StagePlan:
    """Per-stage convolution kernels and the strides between stages (z, y, x)."""

    kernels: tuple[tuple[int, int, int], ...]  # one per stage
    strides: tuple[tuple[int, int, int], ...]  # one per down-sampling (len(kernels) - 1)


def plan_stages(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    max_stages: int,
    *,
    min_size: int = 4,
    anisotropy_threshold: float = 2.0,
) -> StagePlan:
    """Plan kernels and strides the way nnU-Net does for anisotropic data.

    At every stage an axis is down-sampled (stride 2) only if its current spacing is within
    ``anisotropy_threshold`` times the finest current spacing and it would keep at least ``min_size``
    voxels; a coarse axis gets kernel size 1. With 1 x 1 x 4 mm voxels the first stages are therefore
    in-plane only (kernel 1 x 3 x 3, stride 1 x 2 x 2) until the in-plane spacing catches up with the
    slice thickness, after which all three axes are pooled. Planning stops early when no axis can be
    pooled any more, so the result may have fewer than ``max_stages`` stages.
    """
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ValueError(f"patch_size and spacing must have 3 entries (z, y, x), got {tuple(patch_size)} and {tuple(spacing)}")
    size = [int(s) for s in patch_size]
    current = [float(s) for s in spacing]
    kernels: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = []
    kernel = [1, 1, 1]
    for stage in range(max_stages):
        finest = min(current)
        fine_axes = [s <= anisotropy_threshold * finest for s in current]
        # once an axis is convolved it stays convolved (an axis that stopped pooling because it got
        # small must not fall back to kernel 1 when the others overtake its spacing)
        kernel = [3 if fine or k == 3 else 1 for fine, k in zip(fine_axes, kernel)]
        kernels.append(tuple(kernel))  # type: ignore[arg-type]
        if stage == max_stages - 1:
            break
        stride = tuple(2 if fine and size[a] % 2 == 0 and size[a] // 2 >= min_size else 1 for a, fine in enumerate(fine_axes))
        if stride == (1, 1, 1):
            break
        strides.append(stride)  # type: ignore[arg-type]
        size = [s // st for s, st in zip(size, stride)]
        current = [sp * st for sp, st in zip(current, stride)]
    return StagePlan(kernels=tuple(kernels), strides=tuple(strides))


def require_divisible(name: str, patch_size: Sequence[int], factors: Sequence[int]) -> None:
    """Raise a clear error when the patch cannot pass through the network's down-sampling."""
    bad = [f"axis {a}: {p} not divisible by {f}" for a, (p, f) in enumerate(zip(patch_size, factors)) if p % f]
    if bad:
        raise ValueError(f"network {name}: patch size {tuple(patch_size)} does not fit its down-sampling ({'; '.join(bad)})")


def total_strides(strides: Sequence[Sequence[int] | int]) -> tuple[int, int, int]:
    """Product of per-stage strides per axis (a scalar stride counts for all three axes)."""
    total = [1, 1, 1]
    for stride in strides:
        per_axis = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        total = [t * s for t, s in zip(total, per_axis)]
    return tuple(total)  # type: ignore[return-value]


def merged(defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Recipe params over a builder's defaults."""
    return {**defaults, **params}


def channels_and_strides(
    name: str, context: NetworkContext, channels: Sequence[int], strides: Sequence[Any] | str
) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]:
    """Channels per level and strides between levels; ``strides="auto"`` plans them with :func:`plan_stages`
    (dropping the deepest channel entries when the patch allows fewer levels)."""
    if isinstance(strides, str):
        if strides != "auto":
            raise ValueError(f"network {name}: strides must be a list or 'auto', got {strides!r}")
        plan = plan_stages(context.patch_size, context.spacing, max_stages=len(channels))
        planned = plan.strides
    else:
        planned = tuple(tuple([s] * 3) if isinstance(s, int) else tuple(s) for s in strides)  # type: ignore[misc]
        if len(planned) != len(channels) - 1:
            raise ValueError(f"network {name}: needs one stride per level transition ({len(channels) - 1}), got {len(planned)}")
    require_divisible(name, context.patch_size, total_strides(planned))
    return tuple(channels[: len(planned) + 1]), planned  # type: ignore[return-value]
