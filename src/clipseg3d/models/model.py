"""The universal model as a plain ``nn.Module``: backbone + class embedding table + dynamic head.

:meth:`UniversalModel.metadata` is what a checkpoint needs besides the weights to rebuild it
without the text encoder: class entries (names, prompts, relations), the embedding table's size,
the text encoder's id, the backbone and head arguments, and the classes that own an embedding
residual and a controller adapter (classes added by fine-tuning).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch
from torch import nn

from clipseg3d.catalog import ClassCatalog, ClassEntry
from clipseg3d.models import genesis_unet, swin_legacy  # noqa: F401  (they register the released backbones)
from clipseg3d.models.backbones import Backbone, build_backbone
from clipseg3d.models.head import DynamicHead
from clipseg3d.models.original_head import OriginalHead

CHECKPOINT_VERSION = 1


class UniversalModel(nn.Module):
    """One network for many classes: each class is a row of ``class_embeddings``.

    Each class named in ``adapted_classes`` also owns a trainable residual on its embedding
    (``class_residuals``, zero at first) and a rank-``adapter_rank`` controller adapter in the
    head, both at its position in ``adapted_classes`` (its adapter slot, ``adapter_slots[k]``;
    ``-1`` for the classes that use neither).
    """

    def __init__(self, backbone: Backbone, classes: Sequence[ClassEntry], embeddings: torch.Tensor,
                 text_encoder: str, head_hidden: int = 256, head_channels: int = 8, head_layers: int = 3,
                 chunk_voxels: int = 4096, adapted_classes: Sequence[str] = (), adapter_rank: int = 4,
                 head_kind: str = "dynamic"):
        super().__init__()
        if len(classes) != embeddings.shape[0]:
            raise ValueError(f"{len(classes)} classes but {embeddings.shape[0]} embeddings")
        self.backbone = backbone
        self.classes = list(classes)
        self.text_encoder = text_encoder
        self.register_buffer("class_embeddings", embeddings.float().clone())
        unknown = [name for name in adapted_classes if name not in self.class_names]
        if unknown or len(set(adapted_classes)) != len(adapted_classes):
            raise ValueError(f"adapted classes {list(adapted_classes)} must be distinct model classes "
                             f"(unknown: {unknown})")
        self.adapted_classes = list(adapted_classes)
        self.adapter_rank = adapter_rank
        rows = torch.tensor([self.class_names.index(name) for name in self.adapted_classes], dtype=torch.long)
        slots = torch.full((len(self.classes),), -1, dtype=torch.long)
        slots[rows] = torch.arange(len(rows))
        self.register_buffer("adapted_rows", rows, persistent=False)
        self.register_buffer("adapter_slots", slots, persistent=False)
        self.class_residuals = nn.ParameterList(nn.Parameter(torch.zeros(embeddings.shape[1]))
                                                for _ in self.adapted_classes)
        self.head_args = dict(hidden=head_hidden, channels=head_channels, layers=head_layers,
                              chunk_voxels=chunk_voxels)
        self.head_kind = head_kind
        if head_kind == "original":  # the released weights' head (no adapters)
            if self.adapted_classes:
                raise ValueError("the original head has no class adapters")
            self.head = OriginalHead(backbone.out_channels, backbone.global_channels, embeddings.shape[1],
                                     chunk_voxels=chunk_voxels)
        elif head_kind == "dynamic":
            self.head = DynamicHead(backbone.out_channels, backbone.global_channels, embeddings.shape[1],
                                    adapters=len(self.adapted_classes), adapter_rank=adapter_rank, **self.head_args)
        else:
            raise ValueError(f"head kind {head_kind!r} is not 'dynamic' or 'original'")

    @property
    def class_names(self) -> list[str]:
        return [entry.name for entry in self.classes]

    @property
    def catalog(self) -> ClassCatalog:
        """The model's classes as a catalog (parents outside the model are not required)."""
        return ClassCatalog._unchecked(self.classes)

    def class_inputs(self, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the head takes for the classes at ``rows`` (default: all, in order): their embeddings
        [k, D] with their residuals, and their adapter slots [k] (long, ``-1``: none)."""
        embeddings, slots = self.class_embeddings, self.adapter_slots
        if self.adapted_classes:
            embeddings = embeddings.index_add(0, self.adapted_rows, torch.stack(list(self.class_residuals)))
        if rows is None:
            return embeddings, slots
        index = torch.as_tensor(list(rows), dtype=torch.long, device=slots.device)
        return embeddings[index], slots[index]

    def forward(self, image: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Logits [B, k, *S] of the classes at ``rows`` (default: all) for an image batch [B, 1, *S]."""
        decoder_map, global_feature = self.backbone(image)
        return self.head(decoder_map, global_feature, *self.class_inputs(rows))

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs besides the state dict to rebuild this model."""
        return {
            "version": CHECKPOINT_VERSION,
            "classes": [asdict(entry) for entry in self.classes],
            "text_encoder": self.text_encoder,
            "embedding_dim": int(self.class_embeddings.shape[1]),
            "backbone": {"name": self.backbone.registry_name, "init_args": dict(self.backbone.init_args)},
            "head": {**self.head_args, "kind": self.head_kind},
            "adapters": {"classes": list(self.adapted_classes), "rank": self.adapter_rank},
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "UniversalModel":
        """An untrained model with the architecture and classes ``meta`` describes."""
        classes = [ClassEntry(**{**entry, "parents": tuple(entry["parents"]), "aliases": tuple(entry["aliases"])})
                   for entry in meta["classes"]]
        backbone = build_backbone(meta["backbone"]["name"], **meta["backbone"]["init_args"])
        embeddings = torch.zeros(len(classes), meta["embedding_dim"])
        head = meta["head"]
        adapters = meta.get("adapters", {})
        return cls(backbone, classes, embeddings, meta["text_encoder"], head_hidden=head["hidden"],
                   head_channels=head["channels"], head_layers=head["layers"], chunk_voxels=head["chunk_voxels"],
                   adapted_classes=adapters.get("classes", ()), adapter_rank=adapters.get("rank", 4),
                   head_kind=head.get("kind", "dynamic"))
