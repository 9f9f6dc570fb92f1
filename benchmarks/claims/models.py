"""The baseline the universal model is measured against: a backbone with a plain 1x1x1 conv head."""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import torch
from torch import nn

from claims.config import Budget
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.training.losses import PartialLabelLoss
from clipseg3d.training.task import warmup_cosine


def make_backbone(budget: Budget) -> UNetBackbone:
    """The U-Net every model of the benchmark shares (fresh weights)."""
    return UNetBackbone(budget.channels, budget.strides, budget.out_channels, num_res_units=1)


class PlainConvNet(nn.Module):
    """Backbone + one 1x1x1 convolution with a fixed number of output classes."""

    def __init__(self, backbone: nn.Module, classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv3d(backbone.out_channels, classes, kernel_size=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        decoder_map, _ = self.backbone(image)
        return self.head(decoder_map)


class PlainConvSegmentation(L.LightningModule):
    """A dataset-specific model: :class:`PlainConvNet` over ``classes``, trained with the same loss,
    optimiser and schedule as the universal task."""

    def __init__(self, backbone: nn.Module, classes: Sequence[str], lr: float, warmup_steps: int,
                 weight_decay: float = 1.0e-5, min_lr_factor: float = 0.01):
        super().__init__()
        self.class_names = list(classes)
        self.model = PlainConvNet(backbone, len(self.class_names))
        self.loss = PartialLabelLoss()
        self.lr, self.warmup_steps, self.weight_decay, self.min_lr_factor = lr, warmup_steps, weight_decay, min_lr_factor

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model(batch["image"]), batch["target"], batch["labelled"])
        self.log("train/loss", loss, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(min(self.warmup_steps, total // 2), total, self.min_lr_factor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
