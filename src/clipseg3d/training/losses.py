"""Partial-label loss: BCE + soft Dice over the (sample, class) pairs a sample's dataset labels."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


class PartialLabelLoss(nn.Module):
    """Weighted BCE + Dice (MONAI's ``DiceCELoss``), averaged over labelled (sample, class) pairs only.

    Each labelled pair is one item of the loss (Dice per pair, ``smooth`` added to its numerator
    and denominator; BCE over all their voxels). Unlabelled pairs are left out before any
    arithmetic, so their logits get exactly zero gradient, and a sample whose dataset labels
    nothing contributes nothing.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.dice_ce = DiceCELoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, lambda_dice=dice_weight,
                                  lambda_ce=bce_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, K, *S]; ``target`` [B, K, *S] in {0, 1}; ``labelled`` bool [B, K]."""
        if logits.shape != target.shape or labelled.shape != logits.shape[:2]:
            raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                             f"labelled {tuple(labelled.shape)}")
        pairs = labelled.bool()
        if not pairs.any():
            return logits.sum() * 0.0
        return self.of_pairs(logits[pairs], target[pairs])

    def of_pairs(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of P labelled pairs given directly: ``logits`` and ``target`` [P, *S]."""
        chosen = logits.flatten(1).float()[:, None]
        return self.dice_ce(chosen, target.flatten(1).to(chosen.dtype)[:, None])
