"""From model-grid class probabilities to masks on the scan grid.

The probabilities are turned into masks one class at a time (:func:`scan_masks`): each is moved
to the scan grid, thresholded to a bool mask at once and freed. Only tumour classes keep a
probability volume on the scan grid, as uint8 0..255 (for the lesions' peak probability in the
report). So memory grows with the class count through float16 model-grid probabilities and bool
scan-grid masks only.

Classes of the same depth in the parent relation (organs and other structures: depth 0,
tumours: 1) are made mutually exclusive: a voxel above threshold for several goes to the most
probable (a running argmax per depth while the classes come in). A tumour and its parent organ
keep sharing voxels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.preprocess import ModelGrid
from clipseg3d.inference.outputs import as_uint8
from clipseg3d.inference.postprocess import PostprocessConfig, class_depth


def nested_classes(class_names: Sequence[str], catalog: ClassCatalog) -> list[str]:
    """Classes meant to share voxels: classes with a parent among ``class_names``, and those parents."""
    present = set(class_names)
    chosen: set[str] = set()
    for name in class_names:
        parents = {catalog[parent].name for parent in catalog[name].parents if parent in catalog} & present
        if parents:
            chosen |= parents | {name}
    return [name for name in class_names if name in chosen]


def hidden_classes(masks: dict[str, np.ndarray], label_map: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Classes with voxels that the label map gives to another class."""
    return [name for label, name in enumerate(class_names, start=1)
            if np.any(masks[name] & (label_map != label))]


class DepthArgmax:
    """Makes classes of the same depth mutually exclusive: a voxel claimed by several goes to the
    most probable one. Classes are fed one at a time; memory is 3 bytes per voxel and depth."""

    def __init__(self, shape: tuple[int, ...], num_classes: int):
        self.shape = shape
        self.owner_dtype = np.uint8 if num_classes < 255 else np.uint16
        self.levels: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def add(self, label: int, level: int, probability: torch.Tensor, mask: np.ndarray) -> None:
        if level not in self.levels:
            self.levels[level] = (torch.zeros(self.shape, dtype=torch.float16), np.zeros(self.shape, self.owner_dtype))
        best, owner = self.levels[level]
        wins = torch.from_numpy(mask) & (probability > best)
        best[wins] = probability[wins].half()
        owner[wins.numpy()] = label

    def keep(self, label: int, level: int, mask: np.ndarray) -> np.ndarray:
        """``mask`` restricted to the voxels where ``label`` won its depth."""
        return mask & (self.levels[level][1] == label)


def scan_masks(grid: ModelGrid, probabilities: list[torch.Tensor], class_names: Sequence[str],
               catalog: ClassCatalog, config: PostprocessConfig,
               save_probability: Callable[[str, torch.Tensor], None] | None = None,
               ) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
    """Thresholded masks on the scan grid, same-depth classes made exclusive (see module docstring).

    Returns the masks and, per class, the uint8 (0..255) scan-grid probabilities of tumour classes
    (``None`` for the others). ``probabilities`` (model grid) is consumed one class at a time;
    ``save_probability(name, probability)`` sees each class's scan-grid probabilities.
    """
    levels = {name: class_depth(name, catalog) for name in class_names}
    exclusive = DepthArgmax(grid.scan_shape, len(class_names))
    masks: dict[str, np.ndarray] = {}
    tumour_probabilities: list[np.ndarray | None] = []
    for index, name in enumerate(class_names):
        on_scan = grid.to_scan(probabilities[index]).cpu()
        probabilities[index] = None
        masks[name] = (on_scan >= config.thresholds.get(name, config.default_threshold)).numpy()
        exclusive.add(index + 1, levels[name], on_scan, masks[name])
        if save_probability is not None:
            save_probability(name, on_scan)
        tumour_probabilities.append(as_uint8(on_scan) if catalog[name].kind == "tumour" else None)
        del on_scan
    for index, name in enumerate(class_names):
        masks[name] = exclusive.keep(index + 1, levels[name], masks[name])
    return masks, tumour_probabilities
