"""Partial-label loss: BCE + soft Dice over the (sample, class) pairs a sample's dataset labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per row of flattened [N, V] probabilities and targets."""
    intersection = (probs * target).sum(-1)
    denominator = probs.sum(-1) + target.sum(-1)
    return 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)


class PartialLabelLoss(nn.Module):
    """Weighted BCE + Dice, averaged over labelled (sample, class) pairs only.

    Unlabelled pairs are left out before any arithmetic, so their logits get exactly zero
    gradient, and a sample whose dataset labels nothing contributes nothing.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, K, *S]; ``target`` [B, K, *S] in {0, 1}; ``labelled`` bool [B, K]."""
        if logits.shape != target.shape or labelled.shape != logits.shape[:2]:
            raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                             f"labelled {tuple(labelled.shape)}")
        pairs = labelled.bool()
        if not pairs.any():
            return logits.sum() * 0.0
        chosen = logits.flatten(2)[pairs].float()
        truth = target.flatten(2)[pairs].to(chosen.dtype)
        bce = F.binary_cross_entropy_with_logits(chosen, truth, reduction="none").mean(-1)
        dice = soft_dice_loss(torch.sigmoid(chosen), truth, self.smooth)
        return (self.bce_weight * bce + self.dice_weight * dice).mean()
