"""Per-class Dice of whole-scan predictions, scored one class at a time from boolean masks.

Sliding-window inference gives one float16 logit volume per class; scoring each class from
``logits > 0`` and its boolean target as it comes never builds a K-channel copy of either (the
metric's own intermediates are one boolean volume and a few counts).

The scores are those of torchmetrics ``DiceScore`` (binary, per scan, averaged over the scans
where the class is in the truth or the prediction), kept as per-class sums and counts: under
DDP every process updates the same fixed-size states and synchronises them with the same
collectives, whatever classes its scans label.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torchmetrics import Metric


class DiceSums(Metric):
    """Per class: the sum of per-scan Dice and the number of scans it sums (a scan where the class
    is absent from truth and prediction has no Dice and counts in neither); summed across processes."""

    full_state_update = False

    def __init__(self, count: int):
        super().__init__()
        self.add_state("dice_sum", torch.zeros(count, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scans", torch.zeros(count, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, k: int, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add class ``k``'s Dice on one scan (boolean masks ``prediction`` and ``target``)."""
        size = prediction.sum() + target.sum()
        dice = (2 * (prediction & target).sum()).float() / size.float()  # float32, as DiceScore divides
        self.dice_sum[k] += torch.where(size > 0, dice, 0.0).double()
        self.scans[k] += (size > 0).long()

    def compute(self) -> torch.Tensor:
        """Each class's mean Dice [K] (float32); NaN where no scan has a Dice."""
        return (self.dice_sum / self.scans).float()


class ClassDice(nn.Module):
    """One binary Dice per class (torchmetrics ``DiceScore``: per scan, averaged over the scans scored)."""

    def __init__(self, count: int):
        super().__init__()
        self.sums = DiceSums(count)

    def __len__(self) -> int:
        return len(self.sums.scans)

    def update(self, k: int, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Score class ``k`` on one scan: boolean masks ``prediction`` and ``target`` [*S]."""
        self.sums.update(k, prediction, target)

    def compute(self) -> list[torch.Tensor | None]:
        """Each class's Dice so far over every process (None when nothing was scored, or the class
        was absent from every scan and never predicted), then a fresh start. A collective under
        DDP: every process calls it, also one that scored nothing."""
        return [None if torch.isnan(score) else score for score in compute_and_reset(self.sums)]


def compute_and_reset(metric: Metric) -> torch.Tensor:
    """``metric``'s value over every process (a collective under DDP), then a fresh start. A process
    that scored nothing takes part too, quietly: its states are the zeros they started as."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method")
        value = metric.compute()
    metric.reset()
    return value
