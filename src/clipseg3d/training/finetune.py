"""Fine-tuning from a trained checkpoint: add classes, choose what trains.

:func:`start_from_checkpoint` rebuilds a checkpoint's model (backbone, head, class embeddings)
with the requested class list. Classes the checkpoint lacks are embedded with the text encoder
the checkpoint records and each gets its own embedding residual and controller adapter, both
starting at zero, so the new model's outputs start equal to the checkpoint's. :func:`freeze` then
sets what trains:

- ``full``: everything;
- ``head``: the whole head (controller included) and the new classes' own parameters, with the
  backbone frozen;
- ``new_classes``: only the new classes' residuals and adapters; the backbone and the shared head
  are frozen, and the adapters act only on their own class, so the old classes' outputs cannot
  change.

Fine-tuning the whole head may move the old classes: :class:`StartingHead` keeps the head as it
began, frozen, to score the old classes' starting Dice (and so their drift) and, optionally, to
hold them to their starting outputs where the data do not label them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipseg3d.catalog import ClassCatalog, ClassEntry, load_catalog
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.models.checkpoint import CHECKPOINT_KEY, read_checkpoint, restore_model
from clipseg3d.models.model import UniversalModel
from clipseg3d.models.text_encoder import EmbeddingCache, embed_prompts
from clipseg3d.training.metrics import ClassDice

FINETUNE_MODES = ("full", "head", "new_classes")


class FinetuneError(ValueError):
    """A fine-tuning request that does not fit its starting checkpoint."""


@dataclass
class StartingPoint:
    """The model to fine-tune, the classes it added, and the checkpoint it came from."""

    model: UniversalModel
    new_classes: list[str]
    checkpoint: Path
    meta: dict[str, Any]

    @property
    def old_classes(self) -> list[str]:
        return [name for name in self.model.class_names if name not in self.new_classes]

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The preprocessing the checkpoint was trained with (None when it records none)."""
        recorded = self.meta.get("preprocessing", {})
        return Preprocessing.from_dict(recorded) if {"spacing", "hu_window"} & set(recorded) else None


def check_finetune_request(init_from: str | None, mode: str, keep_old_classes: float, own_backbone: bool) -> None:
    """Refuse, in one line, a fine-tuning request that contradicts itself before anything is read."""
    if mode not in FINETUNE_MODES:
        raise FinetuneError(f"finetune {mode!r} is not one of {FINETUNE_MODES}")
    if keep_old_classes < 0 or (keep_old_classes > 0 and mode != "head"):
        raise FinetuneError(f"keep_old_classes={keep_old_classes}: a weight >= 0 that applies to finetune='head' "
                            f"only, not {mode!r}")
    if init_from is None and mode != "full":
        raise FinetuneError(f"finetune={mode!r} needs a trained checkpoint to start from (init_from)")
    if init_from is not None and own_backbone:
        raise FinetuneError(f"init_from={init_from!r} brings its own backbone; leave 'backbone' unset")


def prepare_finetuning(init_from: str, classes: Sequence[str] | None, mode: str, text_encoder: str | None = None,
                       cache: EmbeddingCache | None = None, adapter_rank: int = 4,
                       chunk_voxels: int | None = None) -> StartingPoint:
    """:func:`start_from_checkpoint` with what trains set by :func:`freeze` for ``mode``."""
    start = start_from_checkpoint(init_from, classes, text_encoder, cache=cache, adapter_rank=adapter_rank,
                                  chunk_voxels=chunk_voxels)
    if mode == "new_classes" and not start.new_classes:
        raise FinetuneError(f"finetune='new_classes': the class list adds nothing to {init_from} "
                            f"(it has {', '.join(start.model.class_names)})")
    freeze(start.model, mode, start.new_classes)
    return start


def start_from_checkpoint(path: str | Path, classes: Sequence[str] | None = None, text_encoder: str | None = None,
                          cache: EmbeddingCache | None = None, adapter_rank: int = 4,
                          chunk_voxels: int | None = None, catalog: ClassCatalog | None = None) -> StartingPoint:
    """The checkpoint's model with ``classes`` (default: the checkpoint's own) in that order.

    A class is looked up first among the checkpoint's classes (keeping its recorded prompt and
    embedding), then in ``catalog`` (default: built-in and plugins). ``text_encoder``, when
    given, must be the checkpoint's. ``adapter_rank`` applies when the checkpoint has no
    adapters yet; otherwise its rank is kept.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    encoder = meta["text_encoder"]
    if text_encoder is not None and text_encoder != encoder:
        raise FinetuneError(f"{path}: its class embeddings come from text encoder {encoder!r}; new classes must "
                            f"be embedded with the same one, not {text_encoder!r} (set text_encoder to {encoder!r} "
                            "or leave it unset)")
    start = restore_model(checkpoint, path)
    known = start.catalog
    entries: list[ClassEntry] = []
    new: list[ClassEntry] = []
    for name in classes if classes is not None else start.class_names:
        entry = known.get(name)
        if entry is None:
            entry = (catalog or load_catalog())[name]
            entry = known.get(entry.name) or entry
        if entry in entries:
            raise FinetuneError(f"class list {list(classes or [])} names {entry.name!r} twice")
        entries.append(entry)
        if entry.name not in known:
            new.append(entry)
    embeddings = torch.empty(len(entries), start.class_embeddings.shape[1])
    fresh = embed_prompts([entry.prompt for entry in new], encoder, cache=cache) if new else None
    for k, entry in enumerate(entries):
        embeddings[k] = fresh[new.index(entry)] if entry in new else start.class_embeddings[known.index(entry.name)]
    names = [entry.name for entry in entries]
    adapted = [name for name in start.adapted_classes if name in names] + [entry.name for entry in new]
    head = meta["head"]
    model = UniversalModel(start.backbone, entries, embeddings, encoder, head_hidden=head["hidden"],
                           head_channels=head["channels"], head_layers=head["layers"],
                           chunk_voxels=chunk_voxels or head["chunk_voxels"], adapted_classes=adapted,
                           adapter_rank=start.adapter_rank if start.adapted_classes else adapter_rank)
    model.load_state_dict(_carried_state(start, model), strict=False)
    return StartingPoint(model, [entry.name for entry in new], path, meta)


def _carried_state(start: UniversalModel, model: UniversalModel) -> dict[str, torch.Tensor]:
    """``start``'s weights under ``model``'s keys; adapters and residuals follow their class."""
    own = ("class_embeddings", "class_residuals.", "head.adapters.")
    source = start.state_dict()
    state = {key: value for key, value in source.items() if not key.startswith(own)}
    for slot, name in enumerate(model.adapted_classes):
        if name in start.adapted_classes:
            old = start.adapted_classes.index(name)
            state[f"class_residuals.{slot}"] = source[f"class_residuals.{old}"]
            for key in model.head.adapters[slot].state_dict():
                state[f"head.adapters.{slot}.{key}"] = source[f"head.adapters.{old}.{key}"]
    return state


def class_parameters(model: UniversalModel, names: Sequence[str]) -> list[nn.Parameter]:
    """The residuals and adapter weights that belong to the classes ``names``."""
    params: list[nn.Parameter] = []
    for slot, name in enumerate(model.adapted_classes):
        if name in names:
            params.append(model.class_residuals[slot])
            params.extend(model.head.adapters[slot].parameters())
    return params


def freeze(model: UniversalModel, mode: str, new_classes: Sequence[str]) -> None:
    """Set ``requires_grad`` for fine-tuning ``mode`` (see the module docstring)."""
    if mode not in FINETUNE_MODES:
        raise FinetuneError(f"finetune {mode!r} is not one of {FINETUNE_MODES}")
    model.requires_grad_(mode == "full")
    if mode == "head":
        model.head.requires_grad_(True)
    for param in class_parameters(model, new_classes):
        param.requires_grad_(True)


class StartingHead(nn.Module):
    """The head as fine-tuning began, frozen, for the old classes of ``finetune='head'``.

    On the (frozen) backbone's features it gives the starting model's logits of the old classes.
    Evaluation scores them (:attr:`dice`) beside the current ones, which gives each old class's
    starting Dice and drift; with ``keep_weight > 0`` training adds :meth:`keep_loss`, which holds
    the old classes to their starting outputs where the data do not label them. Always in eval mode.
    """

    def __init__(self, model: UniversalModel, old_classes: Sequence[str], keep_weight: float = 0.0):
        super().__init__()
        self.class_names = list(old_classes)
        self.rows = [model.class_names.index(name) for name in self.class_names]
        self.keep_weight = keep_weight
        self.head = copy.deepcopy(model.head).requires_grad_(False)
        embeddings, slots = model.class_inputs(self.rows)
        self.register_buffer("class_embeddings", embeddings.detach().clone(), persistent=False)
        self.register_buffer("adapter_slots", slots.clone(), persistent=False)
        self.dice = ClassDice(len(self.rows))
        self.train(False)

    def train(self, mode: bool = True) -> "StartingHead":
        """Stays in eval mode whatever ``mode`` asks: the starting head never trains."""
        return super().train(False)

    def forward(self, decoder_map: torch.Tensor, global_feature: torch.Tensor) -> torch.Tensor:
        """The old classes' starting logits [B, K_old, *S]."""
        return self.head(decoder_map, global_feature, self.class_embeddings, self.adapter_slots)

    def keep_loss(self, logits: torch.Tensor, start: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Soft BCE of the old classes' current logits (in ``logits`` [B, K, *S], every class) against
        :meth:`forward`'s ``start``, over the (sample, old class) pairs ``labelled`` [B, K] leaves out."""
        unlabelled = ~labelled.bool()[:, self.rows]
        if not unlabelled.any():
            return logits.sum() * 0.0
        current = logits[:, self.rows].flatten(2)[unlabelled].float()
        reference = torch.sigmoid(start.flatten(2)[unlabelled].float())
        return F.binary_cross_entropy_with_logits(current, reference)

    def score(self, start: Sequence[torch.Tensor], target: torch.Tensor, labelled: torch.Tensor) -> None:
        """Score one scan's starting logit volumes (one per old class) against its targets [K, *S],
        for the classes ``labelled`` [K] marks."""
        for j, (row, logits) in enumerate(zip(self.rows, start)):
            if labelled[row]:
                self.dice.update(j, logits > 0, target[row] > 0)

    def drift(self, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``dice_start/<class>`` and ``dice_drift/<class>`` (Dice now minus at the start) of the old
        classes scored both ways, and their ``dice_drift_mean``; starts the starting Dice afresh."""
        metrics, drifts = {}, []
        for name, start in zip(self.class_names, self.dice.compute()):
            if start is not None and name in scores:
                metrics[f"dice_start/{name}"] = start
                metrics[f"dice_drift/{name}"] = scores[name] - start
                drifts.append(scores[name] - start)
        if drifts:
            metrics["dice_drift_mean"] = torch.stack(drifts).mean()
        return metrics
