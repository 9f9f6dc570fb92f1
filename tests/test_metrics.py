"""Dice, NSD and HD95 in physical spacing, absent classes, and the catalog's NSD tolerance field."""

import math

import numpy as np
import pytest

from clipseg3d.catalog import CatalogError, ClassCatalog, ClassEntry
from clipseg3d.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, nsd_tolerance, score_class

# MONAI returns float32 values; a few roundings of float32 at most separate them from the exact numbers.
F32 = 8 * float(np.finfo(np.float32).eps)
ANISOTROPIC = (1.0, 1.0, 3.0)  # the third axis is the coarse one


def box(shape=(20, 20, 10), low=(5, 5, 3), high=(15, 15, 7)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    return mask


def sphere(radius_mm: float, shape=(40, 40, 16), centre=(20, 20, 8), spacing=ANISOTROPIC) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    distance2 = sum(((axis - c) * step) ** 2 for axis, c, step in zip(grid, centre, spacing))
    return distance2 <= radius_mm ** 2


def test_a_sphere_shifted_one_coarse_slice_is_three_millimetres_off():
    truth = sphere(12.0)
    predicted = np.roll(truth, 1, axis=2)
    score = score_class(predicted, truth, ANISOTROPIC, tolerance_mm=3.0)
    # Each pole cap is a whole slice away from the other surface: the tail of the distances is 1 x 3 mm.
    assert score.status == "present"
    assert score.hd95_mm == pytest.approx(3.0, rel=F32)
    assert score.nsd == pytest.approx(1.0, rel=F32)
    # Shifting by one slice loses one voxel of every (x, y) column of the sphere.
    columns = np.count_nonzero(truth.any(axis=2))
    assert score.dice == pytest.approx(1 - columns / np.count_nonzero(truth), rel=F32)
    assert score_class(predicted, truth, ANISOTROPIC, tolerance_mm=5.0).nsd == pytest.approx(1.0, rel=F32)
    assert score_class(predicted, truth, ANISOTROPIC, tolerance_mm=2.9).nsd < 1.0


def test_ignoring_the_spacing_or_its_axis_order_gives_another_hd95():
    truth = sphere(12.0)
    predicted = np.roll(truth, 1, axis=2)
    assert score_class(predicted, truth, (1.0, 1.0, 1.0)).hd95_mm == pytest.approx(1.0, rel=F32)
    assert score_class(predicted, truth, (3.0, 1.0, 1.0)).hd95_mm == pytest.approx(1.0, rel=F32)


def test_a_box_shifted_one_slice_has_hand_counted_dice_and_nsd():
    # 10 x 10 x 4 box, 272 edge voxels. Shifted up one 3 mm slice, the prediction's edge voxels
    # lie at: 0 mm (108: the side rings of the three slices shared with the truth), 3 mm (the
    # 100 voxels of the new top face) and, on the old bottom face's 8 x 8 interior, min(3, d) mm
    # with d the in-plane distance to the side ring: 1 mm (28), 2 mm (20), 3 mm or more (16).
    # The truth's edges mirror these, so NSD = within-tolerance count / 272 in both directions.
    truth = box()
    predicted = np.roll(truth, 1, axis=2)
    expected = {1.5: (108 + 28) / 272, 2.5: (108 + 28 + 20) / 272, 3.0: 1.0}
    for tolerance, nsd in expected.items():
        score = score_class(predicted, truth, ANISOTROPIC, tolerance)
        assert score.nsd == pytest.approx(nsd, rel=F32), tolerance
    assert score.dice == pytest.approx(2 * 300 / 800, rel=F32)
    assert score.hd95_mm == pytest.approx(3.0, rel=F32)
    assert score.true_ml == pytest.approx(400 * 3.0 / 1000)
    assert score.nsd_tolerance_mm == 3.0


def test_identical_masks_score_perfectly():
    truth = sphere(10.0)
    score = score_class(truth.copy(), truth, ANISOTROPIC)
    assert (score.status, score.dice, score.nsd, score.hd95_mm) == ("present", 1.0, 1.0, 0.0)


def test_a_class_absent_from_truth_and_prediction_is_reported_absent_not_scored():
    empty = np.zeros((8, 8, 8), dtype=bool)
    score = score_class(empty, empty.copy(), ANISOTROPIC)
    assert score.status == "absent"
    assert (score.dice, score.nsd, score.hd95_mm) == (None, None, None)
    assert (score.true_ml, score.predicted_ml) == (0.0, 0.0)


@pytest.mark.parametrize("missing", ["prediction", "truth"])
def test_a_class_in_one_mask_only_scores_zero_and_no_distance(missing):
    present, empty = box(), np.zeros((20, 20, 10), dtype=bool)
    predicted, truth = (empty, present) if missing == "prediction" else (present, empty)
    score = score_class(predicted, truth, ANISOTROPIC)
    assert score.status == ("missed" if missing == "prediction" else "spurious")
    assert (score.dice, score.nsd) == (0.0, 0.0)
    assert math.isnan(score.hd95_mm)
    assert score.true_ml + score.predicted_ml == pytest.approx(400 * 3.0 / 1000)


def test_masks_on_different_grids_or_a_wrong_spacing_are_refused():
    with pytest.raises(ValueError, match="shape"):
        score_class(box(), box((20, 20, 11)), ANISOTROPIC)
    with pytest.raises(ValueError, match="spacing"):
        score_class(box(), box(), (1.0, 1.0))


def test_the_nsd_tolerance_is_a_class_field_with_a_default():
    entry = ClassEntry.from_dict({"name": "liver", "nsd_tolerance_mm": 5})
    assert entry.nsd_tolerance_mm == 5.0 and nsd_tolerance(entry) == 5.0
    assert ClassCatalog.builtin()["liver"].nsd_tolerance_mm is None
    assert nsd_tolerance(ClassCatalog.builtin()["liver"]) == DEFAULT_NSD_TOLERANCE_MM == 2.0
    plugin = ClassCatalog.from_mapping({"classes": [{"name": "thyroid", "nsd_tolerance_mm": 1.5}]}, source="plugin x")
    assert nsd_tolerance(plugin["thyroid"]) == 1.5


@pytest.mark.parametrize("bad", [0, -1.0, "2 mm", True, float("nan"), float("inf")])
def test_an_nsd_tolerance_that_is_no_positive_number_is_refused(bad):
    with pytest.raises(CatalogError, match="nsd_tolerance_mm"):
        ClassCatalog([ClassEntry.from_dict({"name": "liver", "nsd_tolerance_mm": bad}, source="plugin x")])
