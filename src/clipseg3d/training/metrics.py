"""Per-class Dice of whole-scan predictions, scored one class at a time from boolean masks.

Sliding-window inference gives one float16 logit volume per class; scoring each class from
``logits > 0`` and its boolean target as it comes never builds a K-channel copy of either (the
metric's own intermediates are one boolean volume and a few counts).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.segmentation import DiceScore


class ClassDice(nn.Module):
    """One binary Dice per class (torchmetrics ``DiceScore``: per scan, averaged over the scans scored)."""

    def __init__(self, count: int):
        super().__init__()
        self.metrics = nn.ModuleList(DiceScore(num_classes=1, include_background=True, average="none",
                                               input_format="one-hot") for _ in range(count))

    def __len__(self) -> int:
        return len(self.metrics)

    def update(self, k: int, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Score class ``k`` on one scan: boolean masks ``prediction`` and ``target`` [*S]."""
        self.metrics[k].update(prediction[None, None], target[None, None])

    def compute(self) -> list[torch.Tensor | None]:
        """Each class's Dice so far (None when nothing was scored, or the class was absent from
        every scan and never predicted), then a fresh start."""
        scores = []
        for metric in self.metrics:
            score = metric.compute().float().squeeze() if metric.update_called else None
            metric.reset()
            scores.append(None if score is None or torch.isnan(score) else score)
        return scores
