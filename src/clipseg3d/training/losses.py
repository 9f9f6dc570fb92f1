"""Partial-label loss: BCE + soft Dice over the (sample, class) pairs a sample's dataset labels."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn


class PartialLabelLoss(nn.Module):
    """Weighted BCE + Dice (MONAI's ``DiceCELoss``), averaged over labelled (sample, class) pairs only.

    Each labelled pair is one item of the loss (Dice per pair, ``smooth`` added to its numerator
    and denominator; BCE over all their voxels). Unlabelled pairs are left out before any
    arithmetic, so their logits get exactly zero gradient, and a sample whose dataset labels
    nothing contributes nothing.

    With ``dice_on_empty=False`` a pair whose crop holds none of its class gets BCE only, and the
    Dice term is the mean over the pairs that hold some. Crops much smaller than the body (a fine
    grid) miss most classes, and a Dice of 1 for predicting nothing on all those pairs outweighs
    the few that hold the class: the model learns to predict nothing.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 dice_on_empty: bool = True):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.dice_on_empty = dice_on_empty
        self.dice_ce = DiceCELoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, lambda_dice=dice_weight,
                                  lambda_ce=bce_weight)
        self.pair_dice = DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, reduction="none")

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
        truth = target.flatten(1).to(chosen.dtype)[:, None]
        if self.dice_on_empty:
            return self.dice_ce(chosen, truth)
        bce = self.dice_ce.binary_cross_entropy(chosen, truth)
        holds = truth.flatten(1).any(dim=1)
        if not holds.any():
            return self.bce_weight * bce
        return self.bce_weight * bce + self.dice_weight * self.pair_dice(chosen[holds], truth[holds]).mean()
