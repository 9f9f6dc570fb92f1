"""Test scans: the network input with its way back to the scan grid, and the truth on the scan grid.

A test item is ``{"image": [1, *S] network input, "grid": ModelGrid, "case": TestCase}``, made
as ``clipseg3d segment`` makes its input (the model's :class:`Preprocessing` called on the
:class:`Scan`), so ``clipseg3d test`` scores the masks ``segment`` would write. The
:class:`TestCase` holds the scan, its raw label volume on the same grid and the dataset's label
map, which the test turns into per-class truth as ``clipseg3d evaluate`` does. Batches are dicts
of lists (:func:`collate_test_scans`); a plain class (not a dataclass) keeps Lightning from
copying the scan when it moves batches to a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from clipseg3d.data.grids import header_grid, same_grid
from clipseg3d.data.label_readers import read_slice_masks, read_structure_masks
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.data.scans import Scan, read_scan
from clipseg3d.data.targets import label_volume_from_masks


class TestCase:
    """One test scan with its raw truth on the scan's own grid."""

    __test__ = False  # not a pytest test class
    __slots__ = ("name", "scan", "label", "label_map")

    def __init__(self, name: str, scan: Scan, label: np.ndarray, label_map: LabelMap):
        if tuple(label.shape) != scan.shape:
            raise ValueError(f"{name}: label shape {tuple(label.shape)} differs from the scan's {scan.shape}")
        self.name, self.scan, self.label, self.label_map = name, scan, label, label_map

    def __repr__(self) -> str:
        return f"TestCase({self.name!r}, shape={self.scan.shape}, label_map={self.label_map.name!r})"


def grid_problems(records: Sequence[dict]) -> list[str]:
    """One line per record whose ``label`` file is not on its image's grid (headers only): the test
    scores on the scan grid, so truth and scan must share it."""
    problems = []
    for record in records:
        if "label" not in record:
            continue
        (image_affine, image_shape), (label_affine, label_shape) = header_grid(record["image"]), \
            header_grid(record["label"])
        if image_shape != label_shape or not same_grid(image_affine, label_affine):
            problems.append(f"{record['label']}: not on the grid of image {record['image']} (shape {label_shape} "
                            f"against {image_shape}); test scores on the scan grid, so resample the label to it")
    return problems


def read_truth(record: dict, label_map: LabelMap) -> tuple[np.ndarray, np.ndarray]:
    """The raw label volume of a manifest record and its affine, whatever form the label has."""
    if "label" in record:
        image = nib.load(str(record["label"]))
        return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
    if "segmentations" in record:
        folder = Path(record["segmentations"])
        if label_map.layout.get("masks"):
            return read_structure_masks(label_map, folder)
        return label_volume_from_masks(label_map, folder)
    return read_slice_masks(label_map, Path(record["slices"]), Path(record["image"]))


class TestScanDataset(torch.utils.data.Dataset):
    """Whole test scans of one dataset (manifest records) with their truth on the scan grid."""

    __test__ = False

    def __init__(self, records: Sequence[dict], label_map: LabelMap, preprocessing: Preprocessing):
        self.records, self.label_map, self.preprocessing = list(records), label_map, preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        scan = read_scan(record["image"])
        label, affine = read_truth(record, self.label_map)
        if tuple(label.shape) != scan.shape or not same_grid(affine, scan.affine):
            raise ValueError(f"{record.get('case', record['image'])}: the label is not on the grid of image "
                             f"{record['image']} (shape {tuple(label.shape)} against {scan.shape}); test scores "
                             "on the scan grid")
        name = str(record.get("case") or scan.name)
        return scan_item(TestCase(name, scan, label, self.label_map), self.preprocessing)


def scan_item(case: TestCase, preprocessing: Preprocessing) -> dict:
    """A test item: the network input and grid of ``case``'s scan, as ``segment`` prepares it."""
    image, grid = preprocessing(case.scan)
    return {"image": image, "grid": grid, "case": case}


def collate_test_scans(items: Sequence[dict]) -> dict:
    """Test items as a batch: a list per key (scans differ in shape)."""
    return {key: [item[key] for item in items] for key in ("image", "grid", "case")}
