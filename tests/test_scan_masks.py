"""Masks on the scan grid from model-grid probabilities: each class moved back on its box only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.data.scans import Scan
from clipseg3d.inference.masks import occupied_boxes, scan_masks
from clipseg3d.inference.postprocess import PostprocessConfig

CLASSES = ["liver", "spleen", "liver_tumor", "stomach"]


def grid_and_probabilities():
    """A permuted, flipped, anisotropic scan grid and smooth blobs on its model grid (one class empty)."""
    affine = np.array([[-0.8, 0, 0, 10], [0, 0, -1.5, 20], [0, 0.7, 0, -5], [0, 0, 0, 1.0]])
    scan = Scan(array=np.zeros((61, 40, 47), np.float32), affine=affine, path=Path("scan.nii.gz"), kind="nifti")
    _, grid = Preprocessing((1.3, 1.1, 2.0))(scan)
    rng = np.random.default_rng(0)
    probabilities = []
    for centre, peak in (((10, 12, 6), 0.9), ((17, 15, 9), 0.8), ((12, 14, 7), 0.7), ((5, 5, 5), 0.4)):
        volume = np.zeros(grid.shape, np.float32)
        volume[centre] = 1.0
        volume = ndimage.gaussian_filter(volume, 3.0)
        volume = peak * volume / volume.max() + rng.uniform(0, 0.05, grid.shape)  # no class is 0 anywhere
        probabilities.append(torch.from_numpy(volume.astype(np.float16)))
    return grid, probabilities


def test_masks_from_boxes_equal_masks_from_whole_volumes():
    grid, probabilities = grid_and_probabilities()
    catalog, config = ClassCatalog.builtin(), PostprocessConfig(thresholds={"spleen": 0.3})
    whole: dict[str, torch.Tensor] = {}
    reference, reference_tumours = scan_masks(grid, list(probabilities), CLASSES, catalog, config,
                                              save_probability=lambda name, volume: whole.setdefault(name, volume))
    boxed, tumours = scan_masks(grid, list(probabilities), CLASSES, catalog, config)
    for name in CLASSES:
        np.testing.assert_array_equal(boxed[name], reference[name], err_msg=name)
        assert boxed[name].shape == tuple(grid.scan_shape)
    counts = {name: int(reference[name].sum()) for name in CLASSES}
    assert counts["liver"] > 500 and counts["spleen"] > 500 and counts["liver_tumor"] > 50
    assert counts["stomach"] == 0  # peak 0.45 < 0.5: its box is empty
    wide_spleen, _ = scan_masks(grid, list(probabilities), ["spleen"], catalog, config)
    assert (wide_spleen["spleen"] & reference["liver"]).sum() > 100  # alone, the spleen overlaps the liver
    assert not (boxed["spleen"] & boxed["liver"]).any()  # with it, each voxel went to one of them
    # the tumour's probabilities agree wherever a lesion can read them (inside its mask)
    inside = reference["liver_tumor"]
    np.testing.assert_array_equal(tumours[2][inside], reference_tumours[2][inside])
    # whole volumes were above threshold near their peaks only: the boxes are small
    assert whole["liver"].shape == tuple(grid.scan_shape)
    assert float((whole["liver"] >= 0.5).float().mean()) < 0.2


def test_occupied_boxes_hold_every_voxel_and_leave_the_space_between_specks_out():
    mask = np.zeros((70, 50, 40), bool)
    mask[2:4, 3:5, 1:3] = True       # a speck in one corner
    mask[60:66, 40:47, 30:38] = True  # a blob in the other, across a cube face (z = 1 + 32)
    boxes = occupied_boxes(mask, tile=32)
    covered = np.zeros_like(mask)
    for box in boxes:
        covered[box] = True
    assert not (mask & ~covered).any()
    assert sorted(int(covered[box].size) for box in boxes) == [8, 6 * 7 * 3, 6 * 7 * 5]  # tight in each cube
    assert covered.sum() == mask.sum()
    assert occupied_boxes(np.zeros((5, 5, 5), bool)) == []
