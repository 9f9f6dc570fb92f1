"""The scan report: volumes, lesions and world-coordinate centroids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipseg3d.catalog import ClassCatalog
from clipseg3d.inference.overlay import ALPHA, GAP_PX, class_colour, save_overlay_png
from clipseg3d.inference.report import build_report, write_report_atomic

# Oblique, flipped and anisotropic: i -> -x (0.8 mm), j -> -z (0.8 mm), k -> +y (2 mm).
AFFINE = np.array([
    [-0.8, 0.0, 0.0, 100.0],
    [0.0, 0.0, 2.0, -50.0],
    [0.0, -0.8, 0.0, 30.0],
    [0.0, 0.0, 0.0, 1.0],
])
VOXEL_ML = 0.8 * 0.8 * 2.0 / 1000.0
ROUNDING_ML = 0.5e-6  # the report rounds volumes to 6 decimals
ROUNDING_MM = 0.005  # and centroids to 2
NAMES = ["liver", "liver_tumor", "kidney_tumor"]


def _case():
    shape = (20, 20, 20)
    liver = np.zeros(shape, bool)
    liver[0:10, 0:10, 0:10] = True                    # 1000 voxels
    tumour = np.zeros(shape, bool)
    tumour[2:4, 4:6, 6:7] = True                      # 4 voxels, centroid (2.5, 4.5, 6)
    tumour[12:15, 12:15, 12:15] = True                # 27 voxels, centroid (13, 13, 13)
    masks = np.stack([liver, tumour, np.zeros(shape, bool)])
    probs = np.zeros(masks.shape, np.float16)
    probs[1][2:4, 4:6, 6:7] = 0.625
    probs[1][13, 13, 13] = 0.875
    probs[1][12, 12, 12] = 0.75
    return masks, probs


def test_report_volumes_lesions_and_world_centroids():
    masks, probs = _case()
    report = build_report(masks, NAMES, ClassCatalog.builtin(), AFFINE, probs=probs)
    json.dumps(report)  # JSON-able as it is
    assert report["scan"]["shape"] == [20, 20, 20]
    assert report["scan"]["spacing_mm"] == pytest.approx([0.8, 0.8, 2.0])
    liver = report["classes"]["liver"]
    assert liver["present"] and liver["voxels"] == 1000
    assert liver["volume_ml"] == pytest.approx(1000 * VOXEL_ML, abs=ROUNDING_ML)
    assert "lesions" not in liver
    tumour = report["classes"]["liver_tumor"]
    assert tumour["detected"] and tumour["lesion_count"] == 2 and tumour["label"] == 2
    assert tumour["volume_ml"] == pytest.approx(31 * VOXEL_ML, abs=ROUNDING_ML)
    big, small = tumour["lesions"]
    assert big["voxels"] == 27 and big["volume_ml"] == pytest.approx(27 * VOXEL_ML, abs=ROUNDING_ML)
    # world = (100 - 0.8 i, -50 + 2 k, 30 - 0.8 j)
    assert big["centroid_mm"] == pytest.approx([100 - 0.8 * 13, -50 + 2 * 13, 30 - 0.8 * 13], abs=ROUNDING_MM)
    assert small["centroid_mm"] == pytest.approx([100 - 0.8 * 2.5, -50 + 2 * 6, 30 - 0.8 * 4.5], abs=ROUNDING_MM)
    assert big["max_probability"] == pytest.approx(0.875) and small["max_probability"] == pytest.approx(0.625)
    none = report["classes"]["kidney_tumor"]
    assert not none["present"] and not none["detected"] and none["lesion_count"] == 0 and none["lesions"] == []
    assert report["detected_tumours"] == ["liver_tumor"]


def test_lesions_join_through_corners_and_equal_sizes_keep_voxel_order():
    tumour = np.zeros((10, 10, 10), bool)
    tumour[1, 1, 1] = tumour[2, 2, 2] = True   # one lesion through a corner
    tumour[8, 8, 8] = tumour[8, 8, 9] = True   # a second lesion of the same size, later in voxel order
    tumour[5, 0, 0] = True
    report = build_report({"liver_tumor": tumour}, ["liver_tumor"], ClassCatalog.builtin(), np.eye(4))
    lesions = report["classes"]["liver_tumor"]["lesions"]
    assert [lesion["voxels"] for lesion in lesions] == [2, 2, 1]
    assert [lesion["centroid_mm"] for lesion in lesions] == [[1.5, 1.5, 1.5], [8.0, 8.0, 8.5], [5.0, 0.0, 0.0]]


def test_report_from_dict_with_explicit_spacing_and_atomic_write(tmp_path):
    masks, _ = _case()
    report = build_report({name: masks[i] for i, name in enumerate(NAMES)}, NAMES, ClassCatalog.builtin(),
                          np.eye(4), spacing=(1.0, 1.0, 3.0))
    assert report["classes"]["liver"]["volume_ml"] == pytest.approx(3.0, abs=ROUNDING_ML)
    assert "max_probability" not in report["classes"]["liver_tumor"]["lesions"][0]
    path = write_report_atomic(report, tmp_path / "out" / "case.json")
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == ["case.json"]


# -- overlay ----------------------------------------------------------------------------------
def _phantom():
    """A 40^3, 2 mm volume at 37.5 HU (mid-grey in the default window) with an organ in the
    patient's right-anterior-superior octant and a tumour inside it (RAS voxel order)."""
    shape = (40, 40, 40)
    image = np.full(shape, 37.5, np.float32)
    organ = np.zeros(shape, bool)
    organ[24:36, 24:36, 24:36] = True
    tumour = np.zeros(shape, bool)
    tumour[24:28, 25:29, 24:28] = True       # off the organ centre: only slices through it show it
    absent = np.zeros(shape, bool)
    return image, {"liver": organ, "liver_tumor": tumour, "spleen": absent}


def _colour_hits(pixels: np.ndarray, colour) -> np.ndarray:
    expected = np.round((1 - ALPHA) * 127.5 + ALPHA * np.asarray(colour, float))
    return np.all(np.abs(pixels.astype(int) - expected) <= 1, axis=-1)


def test_overlay_draws_each_class_in_radiological_orientation(tmp_path):
    image, masks = _phantom()
    names = list(masks)
    path = save_overlay_png(image, masks, names, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "case.png",
                            catalog=ClassCatalog.builtin(), panel_px=120)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[1] == 3 * 120 + 2 * GAP_PX and pixels.shape[0] > 120
    organ_colour, tumour_colour, absent_colour = (class_colour(i) for i in range(3))
    for panel in range(3):
        view = pixels[:120, panel * (120 + GAP_PX): panel * (120 + GAP_PX) + 120]
        organ_rows, organ_cols = np.nonzero(_colour_hits(view, organ_colour))
        # the slices cross the tumour, so every panel shows it, ringed by the organ
        assert _colour_hits(view, tumour_colour).sum() >= 36
        assert organ_rows.size > 100
        # right, anterior and superior all map to the top-left of every panel
        assert organ_rows.mean() < 60 and organ_cols.mean() < 60
    assert not _colour_hits(pixels[:120], absent_colour).any()
    # the legend has a swatch for each present class and none for the absent one
    legend = pixels[120:]
    assert legend[np.all(legend == organ_colour, axis=-1)].size and legend[np.all(legend == tumour_colour, axis=-1)].size
    assert not np.all(legend == absent_colour, axis=-1).any()


def test_overlay_is_independent_of_voxel_order(tmp_path):
    image, masks = _phantom()
    names = list(masks)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    las = ras.copy()
    las[0, 0], las[0, 3] = -2.0, 78.0   # index i in LAS is index 39 - i in RAS: same world positions
    first = save_overlay_png(image, masks, names, ras, tmp_path / "ras.png", catalog=ClassCatalog.builtin(),
                             panel_px=120)
    second = save_overlay_png(image[::-1], {name: mask[::-1] for name, mask in masks.items()}, names, las,
                              tmp_path / "las.png", catalog=ClassCatalog.builtin(), panel_px=120)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
