"""The Lightning task that trains the universal model on partially labelled data."""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import lightning as L
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn
from torchmetrics.segmentation import DiceScore

from clipseg3d.backbones import Backbone, UNetBackbone
from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.losses import PartialLabelLoss
from clipseg3d.model import CHECKPOINT_KEY, UniversalModel
from clipseg3d.text_encoder import DEFAULT_TEXT_ENCODER, EmbeddingCache, embed_prompts


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """Learning-rate factor per optimiser step: linear warm-up, then cosine decay to ``min_factor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class UniversalSegmentation(L.LightningModule):
    """Backbone + class embeddings + dynamic head, trained with the partial-label loss.

    Args:
        classes: class names (or aliases) from the catalog, built-in and plugins; ``None`` means
            the 32 built-in classes. Their order is the channel order everywhere.
        backbone: the encoder-decoder (``UNetBackbone``, ``SwinUNETRBackbone`` or a registered one).
        text_encoder: Hugging Face id or local folder of the text encoder that embeds the prompts.
        embedding_cache: folder of the embedding cache (default ``$CLIPSEG3D_CACHE/embeddings``).
        head_hidden, head_channels, head_layers, head_chunk_voxels: dynamic head shape and chunking.
        bce_weight, dice_weight: loss weights.
        lr, weight_decay, warmup_steps, min_lr_factor: AdamW with warm-up cosine, stepped per step.
        roi_size: sliding-window size for validation and inference (the training crop size).
        sw_overlap, sw_batch_size, sw_mode: sliding-window settings.
    """

    def __init__(
        self,
        classes: list[str] | None = None,
        backbone: Backbone | None = None,
        text_encoder: str = DEFAULT_TEXT_ENCODER,
        embedding_cache: str | None = None,
        head_hidden: int = 256,
        head_channels: int = 8,
        head_layers: int = 3,
        head_chunk_voxels: int = 4096,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        warmup_steps: int = 100,
        min_lr_factor: float = 0.01,
        roi_size: tuple[int, int, int] = (96, 96, 96),
        sw_overlap: float = 0.5,
        sw_batch_size: int = 1,
        sw_mode: Literal["gaussian", "constant"] = "gaussian",
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        catalog = load_catalog()
        entries = [catalog[name] for name in classes] if classes is not None else list(ClassCatalog.builtin())
        cache = EmbeddingCache(embedding_cache) if embedding_cache else None
        embeddings = embed_prompts([entry.prompt for entry in entries], text_encoder, cache=cache)
        self.model = UniversalModel(backbone if backbone is not None else UNetBackbone(), entries, embeddings,
                                    text_encoder, head_hidden=head_hidden, head_channels=head_channels,
                                    head_layers=head_layers, chunk_voxels=head_chunk_voxels)
        self.loss = PartialLabelLoss(bce_weight, dice_weight)
        self.val_dice = nn.ModuleList(
            DiceScore(num_classes=1, include_background=True, average="none", input_format="one-hot")
            for _ in entries)
        self.inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=sw_overlap,
                                            mode=sw_mode)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = self.loss(logits, batch["target"], batch["labelled"])
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.inferer(batch["image"], self.model)
        self.log("val/loss", self.loss(logits, batch["target"], batch["labelled"]), batch_size=logits.shape[0])
        prediction = (logits > 0).long()
        target = batch["target"].long()
        labelled = batch["labelled"].bool()
        for k, metric in enumerate(self.val_dice):
            samples = labelled[:, k]
            if samples.any():
                metric.update(prediction[samples, k:k + 1], target[samples, k:k + 1])

    def on_validation_epoch_end(self) -> None:
        scores = []
        for name, metric in zip(self.class_names, self.val_dice):
            if metric.update_called:
                score = metric.compute().float()
                if not torch.isnan(score):  # NaN: the class was absent and predicted absent everywhere
                    self.log(f"val/dice/{name}", score)
                    scores.append(score)
            metric.reset()
        if scores:
            self.log("val/dice_mean", torch.stack(scores).mean(), prog_bar=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup, total, self.hparams.min_lr_factor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = self.model.metadata()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        meta["preprocessing"] = {"roi_size": list(self.hparams.roi_size), "sw_overlap": self.hparams.sw_overlap,
                                 **getattr(datamodule, "preprocessing", {})}
        checkpoint[CHECKPOINT_KEY] = meta

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self.inferer(batch["image"], self.model))
