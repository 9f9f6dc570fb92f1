"""The Lightning task that trains the universal model on partially labelled data."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from monai.inferers import SlidingWindowInferer
from torch import nn
from torchmetrics.segmentation import DiceScore

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.models.backbones import Backbone, UNetBackbone
from clipseg3d.models.checkpoint import CHECKPOINT_KEY
from clipseg3d.models.model import UniversalModel
from clipseg3d.models.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    EmbeddingCache,
    embed_prompts,
)
from clipseg3d.training.finetune import (
    FinetuneError,
    freeze,
    parameter_counts,
    start_from_checkpoint,
)
from clipseg3d.training.losses import PartialLabelLoss


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """Learning-rate factor per optimiser step: linear warm-up, then cosine decay to ``min_factor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _dice_metrics(count: int) -> nn.ModuleList:
    """One binary Dice metric per class."""
    return nn.ModuleList(DiceScore(num_classes=1, include_background=True, average="none", input_format="one-hot")
                         for _ in range(count))


class UniversalSegmentation(L.LightningModule):
    """Backbone + class embeddings + dynamic head, trained with the partial-label loss.

    Args:
        classes: class names (or aliases) from the catalog, built-in and plugins; ``None`` means
            the 32 built-in classes. Their order is the channel order everywhere.
        backbone: the encoder-decoder (``UNetBackbone``, ``SwinUNETRBackbone`` or a registered one).
        text_encoder: Hugging Face id or local folder of the text encoder that embeds the prompts
            (default: the ``init_from`` checkpoint's, else all-MiniLM-L6-v2).
        embedding_cache: folder of the embedding cache (default ``$CLIPSEG3D_CACHE/embeddings``).
        head_hidden, head_channels, head_layers, head_chunk_voxels: dynamic head shape and chunking.
        init_from: a trained checkpoint to start from (not a run to resume: that is ``--ckpt_path``).
            Its backbone, head shape, weights and class embeddings are kept (the ``backbone`` and
            head shape arguments do not apply); ``classes`` it lacks are added, each with its own
            embedding residual and rank-``adapter_rank`` controller adapter (see
            :mod:`clipseg3d.training.finetune`).
        finetune: what trains after ``init_from``: ``full`` (everything), ``head`` (the whole head;
            the backbone frozen in eval mode; validation also logs the old classes' Dice at the start
            and its drift), ``new_classes`` (only the added classes' residuals and adapters).
        adapter_rank: rank of the added classes' controller adapters.
        keep_old_classes: with ``finetune='head'``, the weight of a term that holds each old class
            to the starting model's output (soft BCE) in the samples whose dataset does not label
            it, so the head learns the new classes without forgetting the old ones; 0 turns it off.
        bce_weight, dice_weight: loss weights.
        lr, weight_decay, warmup_steps, min_lr_factor: AdamW with warm-up cosine, stepped per step.
        roi_size: sliding-window size for validation and inference (the training crop size).
        sw_overlap, sw_batch_size, sw_mode: sliding-window settings.
    """

    def __init__(
        self,
        classes: list[str] | None = None,
        backbone: Backbone | None = None,
        text_encoder: str | None = None,
        embedding_cache: str | None = None,
        head_hidden: int = 256,
        head_channels: int = 8,
        head_layers: int = 3,
        head_chunk_voxels: int = 4096,
        init_from: str | None = None,
        finetune: Literal["full", "new_classes", "head"] = "full",
        adapter_rank: int = 4,
        keep_old_classes: float = 0.0,
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
        self.frozen_backbone = finetune != "full"
        if keep_old_classes < 0 or (keep_old_classes > 0 and finetune != "head"):
            raise FinetuneError(f"keep_old_classes={keep_old_classes}: a weight >= 0 that applies to finetune='head' "
                                f"only, not {finetune!r}")
        cache = EmbeddingCache(embedding_cache) if embedding_cache else None
        self.new_classes: list[str] = []
        if init_from is None:
            if finetune != "full":
                raise FinetuneError(f"finetune={finetune!r} needs a trained checkpoint to start from (init_from)")
            catalog = load_catalog()
            entries = [catalog[name] for name in classes] if classes is not None else list(ClassCatalog.builtin())
            text_encoder = text_encoder or DEFAULT_TEXT_ENCODER
            embeddings = embed_prompts([entry.prompt for entry in entries], text_encoder, cache=cache)
            self.model = UniversalModel(backbone if backbone is not None else UNetBackbone(), entries, embeddings,
                                        text_encoder, head_hidden=head_hidden, head_channels=head_channels,
                                        head_layers=head_layers, chunk_voxels=head_chunk_voxels)
        else:
            if backbone is not None:
                raise FinetuneError(f"init_from={init_from!r} brings its own backbone; leave 'backbone' unset")
            start = start_from_checkpoint(init_from, classes, text_encoder, cache=cache, adapter_rank=adapter_rank,
                                          chunk_voxels=head_chunk_voxels)
            if finetune == "new_classes" and not start.new_classes:
                raise FinetuneError(f"finetune='new_classes': the class list adds nothing to {init_from} "
                                    f"(it has {', '.join(start.model.class_names)})")
            self.model, self.new_classes = start.model, start.new_classes
            self.start_preprocessing = start.meta.get("preprocessing", {})
            freeze(self.model, finetune, self.new_classes)
        self.old_classes = [name for name in self.class_names if name not in self.new_classes]
        self.old_rows = [self.class_names.index(name) for name in self.old_classes]
        if finetune == "head":
            # The starting head, frozen: on the (frozen) backbone's features it gives the starting
            # model's outputs, so validation can report how far the old classes have drifted.
            self.reference_head = copy.deepcopy(self.model.head).requires_grad_(False)
            self.register_buffer("reference_features", self.model.text_features().detach()[self.old_rows].clone(),
                                 persistent=False)
            self.start_dice = _dice_metrics(len(self.old_classes))
        self.loss = PartialLabelLoss(bce_weight, dice_weight)
        self.val_dice = _dice_metrics(len(self.class_names))
        self.inferer = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=sw_overlap,
                                            mode=sw_mode)

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.hparams.keep_old_classes > 0:
            logits, start = self._split_reference(self._with_reference(batch["image"]))
        else:
            logits = self.model(batch["image"])
        loss = self.loss(logits, batch["target"], batch["labelled"])
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        if self.hparams.keep_old_classes > 0:
            keep = self._keep_loss(logits, start, batch["labelled"].bool())
            self.log("train/keep_old_loss", keep, batch_size=logits.shape[0])
            loss = loss + self.hparams.keep_old_classes * keep
        return loss

    def _keep_loss(self, logits: torch.Tensor, start: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Soft BCE of the old classes' logits against the starting head's, over unlabelled pairs."""
        unlabelled = ~labelled[:, self.old_rows]
        if not unlabelled.any():
            return logits.sum() * 0.0
        current = logits[:, self.old_rows].flatten(2)[unlabelled].float()
        reference = torch.sigmoid(start.flatten(2)[unlabelled].float())
        return F.binary_cross_entropy_with_logits(current, reference)

    def train(self, mode: bool = True) -> "UniversalSegmentation":
        """Train mode for what trains; a frozen backbone and the reference head stay in eval mode."""
        super().train(mode)
        if self.frozen_backbone:
            self.model.backbone.eval()
        if hasattr(self, "reference_head"):
            self.reference_head.eval()
        return self

    def _with_reference(self, image: torch.Tensor) -> torch.Tensor:
        """Current logits of every class, then the starting head's logits of the old classes."""
        decoder_map, global_feature = self.model.backbone(image)
        current = self.model.head(decoder_map, global_feature, self.model.text_features())
        start = self.reference_head(decoder_map, global_feature, self.reference_features)
        return torch.cat([current, start], dim=1)

    def _split_reference(self, both: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_with_reference`'s output as (every class's logits, the starting head's old-class logits)."""
        current, start = both.split([len(self.class_names), len(self.old_classes)], dim=1)
        return current, start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        target = batch["target"].long()
        labelled = batch["labelled"].bool()
        if hasattr(self, "reference_head"):
            logits, start = self._split_reference(self.inferer(batch["image"], self._with_reference))
            for j, (k, metric) in enumerate(zip(self.old_rows, self.start_dice)):
                if labelled[:, k].any():
                    samples = labelled[:, k]
                    metric.update((start[samples, j:j + 1] > 0).long(), target[samples, k:k + 1])
        else:
            logits = self.inferer(batch["image"], self.model)
        self.log("val/loss", self.loss(logits, batch["target"], batch["labelled"]), batch_size=logits.shape[0])
        prediction = (logits > 0).long()
        for k, metric in enumerate(self.val_dice):
            samples = labelled[:, k]
            if samples.any():
                metric.update(prediction[samples, k:k + 1], target[samples, k:k + 1])

    @staticmethod
    def _score(metric: DiceScore) -> torch.Tensor | None:
        """The epoch's Dice, or None when nothing was scored or the class was absent and not predicted."""
        score = metric.compute().float() if metric.update_called else None
        metric.reset()
        return None if score is None or torch.isnan(score) else score

    def on_validation_epoch_end(self) -> None:
        scores = {}
        for name, metric in zip(self.class_names, self.val_dice):
            score = self._score(metric)
            if score is not None:
                self.log(f"val/dice/{name}", score)
                scores[name] = score
        if scores:
            self.log("val/dice_mean", torch.stack(list(scores.values())).mean(), prog_bar=True)
        drifts = []
        for name, metric in zip(self.old_classes, getattr(self, "start_dice", [])):
            start = self._score(metric)
            if start is not None and name in scores:
                self.log(f"val/dice_start/{name}", start)
                self.log(f"val/dice_drift/{name}", scores[name] - start)
                drifts.append(scores[name] - start)
        if drifts:
            self.log("val/dice_drift_mean", torch.stack(drifts).mean())

    def on_fit_start(self) -> None:
        """Warn when the data are prepared otherwise than for the ``init_from`` checkpoint."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data = getattr(datamodule, "preprocessing", {})
        for key, value in getattr(self, "start_preprocessing", {}).items():
            if key in data and key in ("spacing", "hu_window") and list(data[key]) != list(value):
                rank_zero_warn(f"init_from {self.hparams.init_from}: the checkpoint was trained with {key} {value}, "
                               f"the data give {list(data[key])}")

    def on_train_start(self) -> None:
        trainable, total = parameter_counts(self.model)
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%), "
                       f"finetune={self.hparams.finetune}"
                       + (f", new classes: {', '.join(self.new_classes)}" if self.new_classes else ""))
        self.log("trainable_params", float(trainable))
        self.log("trainable_fraction", trainable / total)

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
        if self.hparams.init_from is not None:
            meta["finetune"] = {"init_from": str(self.hparams.init_from), "mode": self.hparams.finetune,
                                "new_classes": list(self.new_classes)}
        checkpoint[CHECKPOINT_KEY] = meta

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return torch.sigmoid(self.inferer(batch["image"], self.model))
