"""The Lightning task that trains the universal model on partially labelled data.

:class:`UniversalSegmentation` is built from small hooks, as torchgeo's ``BaseTask`` is:
:meth:`~UniversalSegmentation.configure_models` (a fresh model, or a trained checkpoint's with
classes added, see :mod:`clipseg3d.training.finetune`), :meth:`~UniversalSegmentation.configure_losses`
and :meth:`~UniversalSegmentation.configure_metrics`. Validation, test and prediction run whole
scans through one sliding window (:class:`~clipseg3d.inference.sliding_window.StreamingInferer`,
float16 per class) and score each class as its volume comes; training runs on crops.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn
from torchmetrics import MeanMetric

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.evaluation.report import write_reports
from clipseg3d.evaluation.scoring import ClassResult
from clipseg3d.inference.sliding_window import StreamingInferer
from clipseg3d.models.backbones import Backbone, UNetBackbone
from clipseg3d.models.checkpoint import CHECKPOINT_KEY
from clipseg3d.models.model import UniversalModel
from clipseg3d.models.text_encoder import DEFAULT_TEXT_ENCODER, EmbeddingCache, embed_prompts
from clipseg3d.training.finetune import StartingHead, check_finetune_request, prepare_finetuning
from clipseg3d.training.losses import PartialLabelLoss
from clipseg3d.training.memory import FreedMemoryKept
from clipseg3d.training.metrics import ClassDice, compute_and_reset
from clipseg3d.training.testing import (
    collect_evaluation,
    gather_results,
    metric_means,
    score_test_scan,
)


def warmup_cosine(warmup_steps: int, total_steps: int, min_factor: float = 0.0):
    """Learning-rate factor per optimiser step: linear warm-up, then cosine decay to ``min_factor``.

    Step ``s`` of the warm-up gets ``(s + 1) / (warmup_steps + 1)``, so the first step already
    trains. The library schedules do not give these rates: MONAI's ``WarmupCosineSchedule`` and
    transformers' ``get_cosine_with_min_lr_schedule_with_warmup`` start at 0 (a first step that
    does not move) and MONAI's clamps at ``end_lr`` instead of decaying to it; torch's
    ``SequentialLR(LinearLR, CosineAnnealingLR)`` computes the rates recursively, which rounds
    differently at every step.
    """

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
            the backbone frozen in eval mode; evaluation also logs the old classes' Dice at the
            start and its drift), ``new_classes`` (only the added classes' residuals and adapters).
        adapter_rank: rank of the added classes' controller adapters.
        keep_old_classes: with ``finetune='head'``, the weight of a term that holds each old class
            to the starting model's output (soft BCE) in the samples whose dataset does not label
            it, so the head learns the new classes without forgetting the old ones; 0 turns it off.
        bce_weight, dice_weight: loss weights.
        dice_on_empty: whether a crop without a labelled class still gets that class's Dice term
            (False: BCE only; for crops much smaller than the body, see :class:`PartialLabelLoss`).
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
        dice_on_empty: bool = True,
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
        self.preprocessing: Preprocessing | None = None  # the training data's, recorded by setup("fit")
        self.configure_models(backbone)
        self.configure_losses()
        self.configure_metrics()
        self.inferer = StreamingInferer(roi_size, overlap=sw_overlap, sw_batch_size=sw_batch_size, mode=sw_mode)

    # -- hooks that build the task ------------------------------------------------------------
    def configure_models(self, backbone: Backbone | None) -> None:
        """``model``: a fresh one, or the ``init_from`` checkpoint's with the new classes added and
        what trains set; ``starting_head``: the frozen start of ``finetune='head'``, else None."""
        h = self.hparams
        check_finetune_request(h.init_from, h.finetune, h.keep_old_classes, own_backbone=backbone is not None)
        cache = EmbeddingCache(h.embedding_cache) if h.embedding_cache else None
        if h.init_from is None:
            catalog = load_catalog()
            entries = [catalog[name] for name in h.classes] if h.classes is not None else list(ClassCatalog.builtin())
            encoder = h.text_encoder or DEFAULT_TEXT_ENCODER
            embeddings = embed_prompts([entry.prompt for entry in entries], encoder, cache=cache)
            self.model = UniversalModel(backbone if backbone is not None else UNetBackbone(), entries, embeddings,
                                        encoder, head_hidden=h.head_hidden, head_channels=h.head_channels,
                                        head_layers=h.head_layers, chunk_voxels=h.head_chunk_voxels)
            self.new_classes: list[str] = []
            self.start_preprocessing: Preprocessing | None = None
        else:
            start = prepare_finetuning(h.init_from, h.classes, h.finetune, h.text_encoder, cache=cache,
                            adapter_rank=h.adapter_rank, chunk_voxels=h.head_chunk_voxels)
            self.model, self.new_classes, self.start_preprocessing = start.model, start.new_classes, start.preprocessing
        old_classes = [name for name in self.class_names if name not in self.new_classes]
        self.starting_head = StartingHead(self.model, old_classes, h.keep_old_classes) \
            if h.finetune == "head" else None

    def configure_losses(self) -> None:
        """``loss``: BCE + Dice over the labelled (sample, class) pairs."""
        self.loss = PartialLabelLoss(self.hparams.bce_weight, self.hparams.dice_weight,
                                     dice_on_empty=self.hparams.dice_on_empty)

    def configure_metrics(self) -> None:
        """``class_dice``: each class's Dice over whole scans; ``eval_loss``: the mean loss of the
        scored pairs; both shared by validation and test and synchronised across processes."""
        self.class_dice = ClassDice(len(self.class_names))
        self.eval_loss = MeanMetric()

    # -- the model ----------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def train(self, mode: bool = True) -> "UniversalSegmentation":
        """Train mode for what trains; a frozen backbone stays in eval mode (so does the starting head)."""
        super().train(mode)
        if self.hparams.finetune != "full":
            self.model.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the task, as Lightning's model summary counts them (the
        starting head's frozen copy of the head included)."""
        summary = ModelSummary(self, max_depth=0)
        return summary.trainable_parameters, summary.total_parameters

    # -- training on crops --------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        decoder_map, global_feature = self.model.backbone(batch["image"])
        batch_size = batch["image"].shape[0]
        if self.starting_head is None:
            loss = self.partial_label_loss(decoder_map, global_feature, batch["target"], batch["labelled"])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            return loss
        logits = self.model.head(decoder_map, global_feature, *self.model.class_inputs())
        loss = self.loss(logits, batch["target"], batch["labelled"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if self.starting_head.keep_weight > 0:
            start = self.starting_head(decoder_map, global_feature)
            keep = self.starting_head.keep_loss(logits, start, batch["labelled"])
            self.log("train/keep_old_loss", keep, batch_size=batch_size)
            loss = loss + self.starting_head.keep_weight * keep
        return loss

    def partial_label_loss(self, decoder_map: torch.Tensor, global_feature: torch.Tensor, target: torch.Tensor,
                           labelled: torch.Tensor) -> torch.Tensor:
        """The loss of a batch's labelled (sample, class) pairs (``labelled`` [B, K]).

        Without class adapters the head runs over labelled classes only: the loss leaves the others
        out, so computing them would cost time for a zero gradient (with partially labelled
        datasets, much of the head's work). It runs once over the classes some sample labels, or,
        where that computes at least twice the labelled pairs (samples of datasets that label
        different classes), once per sample over that sample's classes. With adapters it runs over
        all classes, so every adapter takes part in every step (as distributed training expects).
        """
        labelled = labelled.bool()
        if self.model.adapted_classes or not labelled.any():
            return self.loss(self.model.head(decoder_map, global_feature, *self.model.class_inputs()), target, labelled)
        union = labelled.any(0).nonzero().flatten()
        if 2 * int(labelled.sum()) > labelled.shape[0] * len(union):
            logits = self.model.head(decoder_map, global_feature, *self.model.class_inputs(union.tolist()))
            return self.loss(logits, target[:, union], labelled[:, union])
        embeddings, slots = self.model.class_inputs()
        pairs = []
        for sample, classes in enumerate(labelled):
            rows = classes.nonzero().flatten()
            if rows.numel():
                pairs.append(self.model.head(decoder_map[sample:sample + 1], global_feature[sample:sample + 1],
                                             embeddings[rows], slots[rows])[0])
        return self.loss.of_pairs(torch.cat(pairs), target[labelled])

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup, total, self.hparams.min_lr_factor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- whole scans through the sliding window -----------------------------------------------
    def infer_logits(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The K classes' blended logits of one image [1, 1, *S]: K float16 volumes [*S]."""
        return self.inferer(image, self.model)

    def _network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What evaluation runs on windows: the model; fine-tuning the head, its K channels are
        followed by the starting head's old-class channels (one backbone pass for both)."""
        if self.starting_head is None:
            return self.model

        def current_and_start(windows: torch.Tensor) -> torch.Tensor:
            decoder_map, global_feature = self.model.backbone(windows)
            current = self.model.head(decoder_map, global_feature, *self.model.class_inputs())
            return torch.cat([current, self.starting_head(decoder_map, global_feature)], dim=1)

        return current_and_start

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        """Score every labelled (scan, class) pair one class at a time; add the mean loss of those
        pairs to ``eval_loss`` (logged with the Dice, so that every process logs the same keys)."""
        network, count = self._network(), len(self.class_names)
        losses = []
        for image, target, labelled in zip(batch["image"], batch["target"], batch["labelled"].bool()):
            volumes = self.inferer(image[None], network)
            for k, logits in enumerate(volumes[:count]):
                if labelled[k]:
                    self.class_dice.update(k, logits > 0, target[k] > 0)
                    losses.append(self.loss(logits[None, None].float(), target[None, k:k + 1], labelled[None, k:k + 1]))
            if self.starting_head is not None:
                self.starting_head.score(volumes[count:], target, labelled)
        if losses:
            self.eval_loss.update(torch.stack(losses).mean(), weight=len(batch["image"]))

    def _log_dice(self, stage: str) -> None:
        """Log the epoch's ``<stage>/loss``, per-class Dice, their mean and the starting head's
        drift, then start afresh. Every process calls it: the metrics synchronise (collectives in
        the same order on every process, whatever it scored), so every process logs the same keys
        and values; ``reduce_fx="max"`` of these equal values keeps them bit for bit."""
        loss = compute_and_reset(self.eval_loss)
        scores = {name: score for name, score in zip(self.class_names, self.class_dice.compute()) if score is not None}
        values = {} if torch.isnan(loss) else {f"{stage}/loss": loss}
        values.update({f"{stage}/dice/{name}": score for name, score in scores.items()})
        if scores:
            values[f"{stage}/dice_mean"] = torch.stack(list(scores.values())).mean()
        if self.starting_head is not None:
            values.update({f"{stage}/{key}": value for key, value in self.starting_head.drift(scores).items()})
        for key, value in values.items():
            self.log(key, value, prog_bar=key == f"{stage}/dice_mean", sync_dist=True, reduce_fx="max")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_dice("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Test scans with their truth on the scan grid (``case`` items, :mod:`clipseg3d.data.test_scans`)
        are segmented as ``clipseg3d segment`` does and scored as ``clipseg3d evaluate`` does; other
        batches get Dice on the model grid, as validation."""
        if "case" not in batch:
            self._evaluate(batch, "test")
            return
        if self.test_results is None:
            self.test_results = []
        for image, grid, case in zip(batch["image"], batch["grid"], batch["case"]):
            self.test_results += score_test_scan(self.model, self.inferer, image, grid, case)
            self.test_label_maps[case.label_map.name] = None

    def on_test_epoch_end(self) -> None:
        if self.test_results is None:
            self._log_dice("test")
        else:
            self.log_test_scores()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[list[torch.Tensor]]:
        """Per batch item, the K classes' probabilities on the input's grid: K float16 volumes."""
        return [[logits.sigmoid_() for logits in self.infer_logits(image[None])] for image in batch["image"]]

    # -- what checkpoints record --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Fitting with a datamodule: record its preprocessing (checkpoints carry it) and warn when
        it differs from the ``init_from`` checkpoint's."""
        datamodule = self.trainer.datamodule
        if stage != "fit" or datamodule is None:
            return
        preprocessing = getattr(datamodule, "preprocessing", None)
        if not isinstance(preprocessing, Preprocessing):
            raise TypeError(f"{type(datamodule).__name__} needs a `preprocessing` attribute, a "
                            "clipseg3d.data.preprocess.Preprocessing saying how its images are prepared (checkpoints "
                            f"record it for inference); it has {type(preprocessing).__name__}")
        self.preprocessing = preprocessing
        if self.start_preprocessing is not None and self.start_preprocessing != preprocessing:
            then, now = asdict(self.start_preprocessing), asdict(preprocessing)
            changed = [field for field in then if then[field] != now[field]]
            rank_zero_warn(f"init_from {self.hparams.init_from}: the checkpoint was trained with "
                           + ", ".join(f"{field} {then[field]}" for field in changed) + "; the data give "
                           + ", ".join(f"{field} {now[field]}" for field in changed))

    def on_train_start(self) -> None:
        trainable, total = self.parameter_counts()
        rank_zero_info(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%), "
                       f"finetune={self.hparams.finetune}"
                       + (f", new classes: {', '.join(self.new_classes)}" if self.new_classes else ""))
        self.log("trainable_params", float(trainable))
        self.log("trainable_fraction", trainable / total)

    def configure_callbacks(self) -> list[L.Callback]:
        return [FreedMemoryKept()]  # each step's activations on the last step's pages

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = self.model.metadata()
        meta["preprocessing"] = {"roi_size": list(self.hparams.roi_size), "sw_overlap": self.hparams.sw_overlap,
                                 **(self.preprocessing.to_dict() if self.preprocessing is not None else {})}
        if self.hparams.init_from is not None:
            meta["finetune"] = {"init_from": str(self.hparams.init_from), "mode": self.hparams.finetune,
                                "new_classes": list(self.new_classes)}
        checkpoint[CHECKPOINT_KEY] = meta

    # -- test scans on their own grid ---------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.test_results: list[ClassResult] | None = None
        self.test_label_maps: dict[str, None] = {}

    def log_test_scores(self) -> None:
        """Log the per-class means (``test/dice/<class>``, ``test/nsd/<class>``, ``test/hd95/<class>``,
        ``test/tumour_sensitivity/<class>``, ...) and write ``metrics.csv``, ``summary.md`` and
        ``metrics.png`` (``clipseg3d evaluate``'s reports) into ``<log dir>/test/``."""
        evaluation = collect_evaluation(gather_results(self.test_results), list(self.test_label_maps))
        for key, value in metric_means(evaluation).items():  # equal on every process (all results gathered)
            self.log(f"test/{key}", value, sync_dist=True, reduce_fx="max")
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "test"  # log_dir: on every process
        if self.trainer.is_global_zero:
            paths = write_reports(evaluation, folder)
            cases = len({result.case for result in evaluation.results})
            rank_zero_info(f"test: {cases} scans scored on their own grid; per case and class in {paths[0]}, "
                           f"means in {paths[1]}")
