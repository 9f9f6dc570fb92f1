"""The universal model as a plain ``nn.Module``: backbone + class embedding table + dynamic head.

A checkpoint written by the training task stores, beside the weights, everything needed to
rebuild and run this module without the text encoder: class entries (names, prompts, relations),
the embedding table, the text encoder's id, the backbone and head arguments, and the
preprocessing (spacing, HU window, window size). :func:`load_model` reads it back.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from clipseg3d.backbones import Backbone, build_backbone
from clipseg3d.catalog import ClassCatalog, ClassEntry
from clipseg3d.head import DynamicHead

CHECKPOINT_KEY = "clipseg3d"
CHECKPOINT_VERSION = 1


class UniversalModel(nn.Module):
    """One network for many classes: each class is a row of ``class_embeddings``."""

    def __init__(self, backbone: Backbone, classes: Sequence[ClassEntry], embeddings: torch.Tensor,
                 text_encoder: str, head_hidden: int = 256, head_channels: int = 8, head_layers: int = 3,
                 chunk_voxels: int = 4096):
        super().__init__()
        if len(classes) != embeddings.shape[0]:
            raise ValueError(f"{len(classes)} classes but {embeddings.shape[0]} embeddings")
        self.backbone = backbone
        self.classes = list(classes)
        self.text_encoder = text_encoder
        self.register_buffer("class_embeddings", embeddings.float().clone())
        self.head_args = dict(hidden=head_hidden, channels=head_channels, layers=head_layers,
                              chunk_voxels=chunk_voxels)
        self.head = DynamicHead(backbone.out_channels, backbone.global_channels, embeddings.shape[1],
                                **self.head_args)

    @property
    def class_names(self) -> list[str]:
        return [entry.name for entry in self.classes]

    @property
    def catalog(self) -> ClassCatalog:
        """The model's classes as a catalog (parents outside the model are not required)."""
        return ClassCatalog._unchecked(self.classes)

    def text_features(self) -> torch.Tensor:
        """The [K, D] class features the head sees (subclasses may add trainable offsets)."""
        return self.class_embeddings

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, *S] for an image batch [B, 1, *S]."""
        decoder_map, global_feature = self.backbone(image)
        return self.head(decoder_map, global_feature, self.text_features())

    def metadata(self) -> dict[str, Any]:
        """What a checkpoint needs besides the state dict to rebuild this model."""
        return {
            "version": CHECKPOINT_VERSION,
            "classes": [asdict(entry) for entry in self.classes],
            "text_encoder": self.text_encoder,
            "embedding_dim": int(self.class_embeddings.shape[1]),
            "backbone": {"name": self.backbone.registry_name, "init_args": dict(self.backbone.init_args)},
            "head": dict(self.head_args),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "UniversalModel":
        """An untrained model with the architecture and classes ``meta`` describes."""
        classes = [ClassEntry(**{**entry, "parents": tuple(entry["parents"]), "aliases": tuple(entry["aliases"])})
                   for entry in meta["classes"]]
        backbone = build_backbone(meta["backbone"]["name"], **meta["backbone"]["init_args"])
        embeddings = torch.zeros(len(classes), meta["embedding_dim"])
        head = meta["head"]
        return cls(backbone, classes, embeddings, meta["text_encoder"], head_hidden=head["hidden"],
                   head_channels=head["channels"], head_layers=head["layers"], chunk_voxels=head["chunk_voxels"])


class CheckpointError(RuntimeError):
    """A file that is not a readable clipseg3d checkpoint."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked to be a clipseg3d checkpoint."""
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: checkpoint not found") from err
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(f"{path}: not a clipseg3d checkpoint (no {CHECKPOINT_KEY!r} metadata)")
    return checkpoint


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[UniversalModel, dict[str, Any]]:
    """Rebuild a trained :class:`UniversalModel` from a checkpoint; returns it with the metadata."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    model = UniversalModel.from_metadata(meta)
    prefix = "model."
    state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks weights for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return model.to(map_location).eval(), meta
