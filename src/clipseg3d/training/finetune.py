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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from clipseg3d.catalog import ClassCatalog, ClassEntry, load_catalog
from clipseg3d.models.checkpoint import CHECKPOINT_KEY, read_checkpoint, restore_model
from clipseg3d.models.model import UniversalModel
from clipseg3d.models.text_encoder import EmbeddingCache, embed_prompts

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


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for param in module.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
