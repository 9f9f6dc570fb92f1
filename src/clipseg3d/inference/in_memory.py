"""Segmenting a CT held in memory: the Python API behind ``clipseg3d.segment``.

:func:`segment` runs what ``clipseg3d segment`` runs for one scan (the checkpoint's
preprocessing, the streaming sliding window, masks on the input grid, post-processing) and
returns the results instead of writing files. Probabilities are kept as float16 on the input
grid (2 bytes per voxel and class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clipseg3d.data.scans import Scan
from clipseg3d.inference.pipeline import CheckpointSettings, model_grid_probabilities, scan_results
from clipseg3d.inference.postprocess import PostprocessConfig, merge_label_map
from clipseg3d.inference.sliding_window import StreamingInferer
from clipseg3d.models import checkpoint
from clipseg3d.models.model import UniversalModel


@dataclass
class Segmentation:
    """One scan's results on its own grid.

    Attributes:
        masks: class name -> post-processed bool mask (what ``masks/<class>.nii.gz`` holds).
        probabilities: class name -> float16 probabilities in [0, 1].
        label_map: each voxel's most specific class, ids 1..K in ``class_names`` order (``labels.nii.gz``).
        class_names: the classes segmented, in label order.
    """

    masks: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]
    label_map: np.ndarray
    class_names: list[str]


@dataclass
class TrainedModel:
    """A checkpoint's model (eval mode) with the preprocessing and window it was trained with."""

    network: UniversalModel
    settings: CheckpointSettings

    @property
    def class_names(self) -> list[str]:
        return self.network.class_names


def load_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The trained model of a checkpoint on ``device``, ready for :func:`segment`."""
    model, meta = checkpoint.load_model(path, map_location=device)
    return TrainedModel(model, CheckpointSettings.from_dict(meta.get("preprocessing")))


def segment(image: np.ndarray, affine: np.ndarray, model: TrainedModel, classes: Sequence[str] | None = None,
            threshold: float = 0.5, roi_size: Sequence[int] | None = None, overlap: float | None = None,
            tta: bool = False) -> Segmentation:
    """Segment a CT volume ``image`` (HU, 3-D) whose voxel-to-RAS matrix is ``affine`` (4x4).

    ``model`` comes from :func:`load_model`; ``classes`` (names or aliases) narrows the classes
    (kept in the model's order); ``roi_size`` and ``overlap`` default to the checkpoint's.
    """
    if not isinstance(model, TrainedModel):
        raise TypeError(f"expected a model from clipseg3d.load_model, got {type(model).__name__}")
    settings, network = model.settings, model.network
    image, affine = np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=np.float64)
    if image.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"expected a 3-D image and a 4x4 affine, got shapes {image.shape} and {affine.shape}")
    class_names = network.class_names
    if classes is not None:
        wanted = set(network.catalog.resolve(classes))
        class_names = [name for name in class_names if name in wanted]
    scan = Scan(array=image, affine=affine, path=Path("<array>"), kind="array")
    inferer = StreamingInferer(tuple(roi_size or settings.roi_size),
                               settings.overlap if overlap is None else overlap, tta=tta)
    network_input, grid = settings.preprocessing(scan)
    device = next(network.parameters()).device
    probabilities = model_grid_probabilities(network, network_input.to(device), class_names, inferer)
    del network_input
    on_scan: dict[str, np.ndarray] = {}

    def keep(name: str, probability: torch.Tensor) -> None:
        on_scan[name] = probability.numpy().astype(np.float16)

    catalog = network.catalog
    masks, _ = scan_results(scan, grid, probabilities, class_names, catalog,
                            PostprocessConfig(default_threshold=threshold), keep)
    label_map, _ = merge_label_map(masks, class_names, catalog)
    return Segmentation(masks=masks, probabilities=on_scan, label_map=label_map, class_names=list(class_names))
