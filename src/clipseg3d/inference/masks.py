"""From model-grid class probabilities to masks on the scan grid.

The probabilities are turned into masks one class at a time (:func:`scan_masks`): each is moved
to the scan grid on the boxes of scan voxels near its model voxels above threshold (an organ's box
is a few percent of a CT, and a stray speck far from it brings only its own small box), thresholded
to a bool mask at once and freed. Only tumour classes keep a
probability volume on the scan grid, as uint8 0..255 (for the lesions' peak probability in the
report). So memory grows with the class count through float16 model-grid probabilities and bool
scan-grid masks only.

Classes of the same depth in the parent relation (organs and other structures: depth 0,
tumours: 1) are made mutually exclusive: a voxel above threshold for several goes to the most
probable (a running argmax per depth while the classes come in). A tumour and its parent organ
keep sharing voxels.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np
import torch

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.preprocess import ModelGrid
from clipseg3d.inference.outputs import as_uint8
from clipseg3d.inference.postprocess import PostprocessConfig, bounding_box, class_depth

#: Edge of the model-grid cubes whose occupied boxes are moved to the scan grid one at a time (see
#: :func:`occupied_boxes`).
TILE_VOXELS = 32


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


def occupied_boxes(mask: np.ndarray, tile: int = TILE_VOXELS) -> list[tuple[slice, ...]]:
    """The bounding boxes of ``mask``'s voxels in each ``tile``-voxel cube of its bounding box that
    holds any: together they hold every voxel, and scattered specks leave the space between them out."""
    outer = bounding_box(mask)
    if outer is None:
        return []
    boxes = []
    for corner in itertools.product(*(range(piece.start, piece.stop, tile) for piece in outer)):
        cube = tuple(slice(start, min(start + tile, piece.stop)) for start, piece in zip(corner, outer))
        inner = bounding_box(mask[cube])
        if inner is not None:
            boxes.append(tuple(slice(part.start + piece.start, part.stop + piece.start) for part, piece in zip(inner, cube)))
    return boxes


class DepthArgmax:
    """Makes classes of the same depth mutually exclusive: a voxel claimed by several goes to the
    most probable one. Classes are fed one at a time, each as its box of the scan grid; memory is
    3 bytes per voxel and depth."""

    def __init__(self, shape: tuple[int, ...], num_classes: int):
        self.shape = shape
        self.owner_dtype = np.uint8 if num_classes < 255 else np.uint16
        self.levels: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def add(self, label: int, level: int, probability: torch.Tensor, mask: np.ndarray, box: tuple[slice, ...]) -> None:
        """Class ``label`` of depth ``level``: its ``probability`` and ``mask`` over ``box``."""
        if level not in self.levels:
            # numpy's zeros leave the pages untouched until a box is written (torch.zeros writes them all:
            # 0.5 s on a VM whose first touch of memory is slow)
            self.levels[level] = (torch.from_numpy(np.zeros(self.shape, np.float16)), np.zeros(self.shape, self.owner_dtype))
        best, owner = self.levels[level][0][box], torch.from_numpy(self.levels[level][1][box])
        probability = probability.half()  # compared as stored: a tie stays with the earlier class
        wins = torch.gt(probability, best).logical_and_(torch.from_numpy(mask))
        # whole-box writes in torch: boolean-index assignment gathers and scatters (twice the time on
        # an organ's box), numpy's copyto(where=) takes twice masked_fill_'s time
        torch.where(wins, probability, best, out=best)
        owner.masked_fill_(wins, label)

    def keep(self, label: int, level: int, mask: np.ndarray, box: tuple[slice, ...]) -> None:
        """Restrict ``mask`` (the scan grid's; nothing outside ``box``) to the voxels where ``label`` won its depth."""
        mask[box] &= self.levels[level][1][box] == label


def scan_masks(grid: ModelGrid, probabilities: list[torch.Tensor], class_names: Sequence[str],
               catalog: ClassCatalog, config: PostprocessConfig,
               save_probability: Callable[[str, torch.Tensor], None] | None = None,
               ) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
    """Thresholded masks on the scan grid, same-depth classes made exclusive (see module docstring).

    Returns the masks and, per class, the uint8 (0..255) scan-grid probabilities of tumour classes
    (``None`` for the others; 0 where the class is below its threshold on the whole neighbourhood,
    as only the masks' voxels are read). ``probabilities`` (model grid) is consumed one class at a
    time. Each class is moved to the scan grid on the boxes of scan voxels that read a model voxel
    above its threshold (:func:`occupied_boxes`, :meth:`~clipseg3d.data.preprocess.ModelGrid.to_scan_box`), unless
    ``save_probability(name, probability)`` is given: it sees each class's whole scan-grid volume.
    """
    levels = {name: class_depth(name, catalog) for name in class_names}
    exclusive = DepthArgmax(grid.scan_shape, len(class_names))
    masks: dict[str, np.ndarray] = {}
    boxes: dict[str, list[tuple[slice, ...]]] = {}
    tumour_probabilities: list[np.ndarray | None] = []
    for index, name in enumerate(class_names):
        probability, probabilities[index] = probabilities[index], None
        limit = config.thresholds.get(name, config.default_threshold)
        model_boxes = ([tuple(slice(0, size) for size in grid.shape)] if save_probability is not None
                       else occupied_boxes((probability.float() >= limit).cpu().numpy()))
        masks[name] = np.zeros(grid.scan_shape, dtype=bool)
        tumour = catalog[name].kind == "tumour"
        tumour_probabilities.append(np.zeros(grid.scan_shape, dtype=np.uint8) if tumour else None)
        boxes[name] = []
        for model_box in model_boxes:  # boxes may share scan voxels: each gives the same values there
            on_scan, box = grid.to_scan_box(probability, model_box)
            on_scan = on_scan.cpu()
            if save_probability is not None:
                save_probability(name, on_scan)  # the whole model grid's box: the whole scan grid
            masks[name][box] = (on_scan >= limit).numpy()
            exclusive.add(index + 1, levels[name], on_scan, masks[name][box], box)
            if tumour:
                tumour_probabilities[-1][box] = as_uint8(on_scan)
            boxes[name].append(box)
        del probability
    for index, name in enumerate(class_names):
        for box in boxes[name]:
            exclusive.keep(index + 1, levels[name], masks[name], box)
    return masks, tumour_probabilities
