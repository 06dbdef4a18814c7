"""Segmentation losses for two-channel (background, lesion) logits, with deep supervision.

Every loss is a sum of an *overlap* term (soft Dice or Tversky on the lesion channel, computed over the
whole batch by default, as nnU-Net's "batch Dice") and a *voxel* term (cross-entropy or focal loss,
optionally class-weighted). The overlap term cares about lesions regardless of how few voxels they
have; the voxel term keeps the gradients well-behaved early in training and on lesion-free patches.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.recipe import LossConfig


class CompoundLoss(nn.Module):
    """``lambda_overlap * overlap(logits, target) + lambda_voxel * voxel(logits, target)``.

    ``target`` is ``(B, 1, z, y, x)`` with class indices (0 background, 1 lesion).
    """

    def __init__(self, overlap: nn.Module | None, voxel: nn.Module | None, lambda_overlap: float, lambda_voxel: float) -> None:
        super().__init__()
        if overlap is None and voxel is None:
            raise ValueError("a loss needs an overlap term, a voxel term or both")
        self.overlap, self.voxel = overlap, voxel
        self.lambda_overlap, self.lambda_voxel = lambda_overlap, lambda_voxel

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        if self.overlap is not None and self.lambda_overlap:
            total = total + self.lambda_overlap * self.overlap(logits, target)
        if self.voxel is not None and self.lambda_voxel:
            total = total + self.lambda_voxel * self.voxel(logits, target)
        return total


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with optional class weights, taking the ``(B, 1, ...)`` index target MONAI losses take."""

    def __init__(self, class_weights: Sequence[float] | None) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor(class_weights, dtype=torch.float32) if class_weights else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target[:, 0].long(), weight=self.weight)


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to every output of a deep-supervision network, weights halving per level.

    The first output is full resolution; coarser outputs are compared with the target resized by
    nearest neighbour (nnU-Net's scheme). Weights are normalised to sum to 1, so the loss scale does not
    depend on the number of heads. A single tensor passes straight through.
    """

    def __init__(self, loss: nn.Module, decay: float = 0.5) -> None:
        super().__init__()
        self.loss, self.decay = loss, decay

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = [self.decay**i for i in range(len(outputs))]
        norm = sum(weights)
        total = outputs[0].new_zeros(())
        for weight, output in zip(weights, outputs):
            level_target = target if output.shape[2:] == target.shape[2:] else F.interpolate(target.float(), size=output.shape[2:], mode="nearest")
            total = total + (weight / norm) * self.loss(output, level_target)
        return total


def build_loss(config: LossConfig) -> DeepSupervisionLoss:
    """The loss a recipe's ``loss`` section describes (wrapped for deep supervision)."""
    from monai.losses import DiceLoss, FocalLoss, TverskyLoss

    weights = list(config.class_weights) if config.class_weights else None
    overlap: nn.Module | None
    voxel: nn.Module | None
    if config.name == "tversky":
        overlap = TverskyLoss(
            include_background=False, to_onehot_y=True, softmax=True, alpha=config.tversky_alpha, beta=config.tversky_beta, batch=config.batch_dice
        )
    elif config.name == "focal":
        overlap = None
    else:
        overlap = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=config.batch_dice)
    if config.name in ("dice_focal", "focal"):
        voxel = FocalLoss(include_background=True, to_onehot_y=True, use_softmax=True, gamma=config.focal_gamma, weight=weights)
    elif config.name == "dice":
        voxel = None
    else:
        voxel = WeightedCrossEntropy(weights)
    return DeepSupervisionLoss(CompoundLoss(overlap, voxel, config.lambda_dice, config.lambda_ce))
