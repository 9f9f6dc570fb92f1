"""Post-processing rules on constructed masks with known answers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scipy import ndimage

import clipseg3d.inference.threads as threads_module
from clipseg3d.catalog import ClassCatalog
from clipseg3d.inference.postprocess import (
    PostprocessConfig,
    assign_pair_sides,
    body_midline_x,
    connected_components,
    keep_largest_component,
    merge_label_map,
    postprocess,
    remove_small_components,
    restrict_to_parents,
    threshold,
    voxels_for_volume,
)
from clipseg3d.inference.threads import each_in_threads

RAS = np.diag([2.0, 2.0, 2.0, 1.0])
LAS = np.diag([-2.0, 2.0, 2.0, 1.0])  # array axis 0 runs towards the patient's left

# Invented names: the rules must follow the entries, whatever the classes are called.
CATALOG = ClassCatalog.from_mapping({"classes": [
    {"name": "blob_organ", "kind": "organ"},
    {"name": "east_part", "kind": "organ", "side": "right", "partner": "west_part"},
    {"name": "west_part", "kind": "organ", "side": "left", "partner": "east_part"},
    {"name": "lump", "kind": "tumour", "parents": ["blob_organ"]},
    {"name": "pair_lump", "kind": "tumour", "parents": ["east_part", "west_part"]},
]})


def cube(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_threshold_default_and_per_class_override():
    probs = np.array([[0.2, 0.5, 0.7], [0.2, 0.5, 0.7]], dtype=np.float16).reshape(2, 3, 1, 1)
    masks = threshold(probs, {"b": 0.6}, ["a", "b"])
    assert masks.dtype == bool
    assert masks[0].ravel().tolist() == [False, True, True]
    assert masks[1].ravel().tolist() == [False, False, True]
    assert threshold(probs, 0.1, ["a", "b"]).sum() == 6
    with pytest.raises(ValueError, match="unknown class"):
        threshold(probs, {"c": 0.3}, ["a", "b"])


def test_keep_largest_component_keeps_the_bigger_blob():
    big = cube((20, 20, 20), (1, 1, 1), (4, 4, 4))        # 27 voxels
    small = cube((20, 20, 20), (10, 10, 10), (12, 12, 12))  # 8 voxels
    kept = keep_largest_component(big | small)
    assert kept.sum() == 27
    assert np.array_equal(kept, big)
    assert not keep_largest_component(np.zeros((4, 4, 4), bool)).any()


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    mask[4, 0, 4] = True
    assert keep_largest_component(mask).sum() == 2


def test_equal_size_components_keep_the_later_ones_however_many():
    """40 blobs along axis 0, of 5 and 3 voxels in turn: the three largest kept are the last
    three 5-voxel blobs (an unstable sort of the sizes picks others)."""
    mask = np.zeros((240, 1, 1), bool)
    for blob in range(40):
        mask[6 * blob: 6 * blob + (5 if blob % 2 == 0 else 3)] = True
    kept = keep_largest_component(mask, count=3)
    assert np.flatnonzero(kept[:, 0, 0]).tolist() == [6 * blob + i for blob in (34, 36, 38) for i in range(5)]
    labels, sizes, box = connected_components(mask)
    assert sizes.tolist() == [0] + [5, 3] * 20 and box == (slice(0, 237), slice(0, 1), slice(0, 1))


def test_connected_components_of_an_empty_mask():
    labels, sizes, box = connected_components(np.zeros((3, 4, 5), bool))
    assert labels.size == 0 and sizes.tolist() == [0]
    assert not keep_largest_component(np.zeros((3, 4, 5), bool), count=2).any()


def test_small_components_count_corner_neighbours_and_keep_one_at_the_limit():
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = True     # one component through corners: 3 voxels
    mask[7, 7, 7] = mask[7, 7, 8] = True                     # 2 voxels
    kept = remove_small_components(mask, 0.003, (1.0, 1.0, 1.0))   # 3 voxels of 1 mm^3 = 0.003 mL
    assert np.flatnonzero(kept).tolist() == [111, 222, 333]


def test_remove_small_components_uses_millilitres_with_anisotropic_spacing():
    shape = (40, 40, 40)
    spacing = (0.5, 0.5, 4.0)  # 1 mm^3 per voxel
    larger = cube(shape, (0, 0, 0), (10, 10, 6))    # 600 voxels = 0.6 mL
    smaller = cube(shape, (20, 20, 20), (30, 30, 24))  # 400 voxels = 0.4 mL
    kept = remove_small_components(larger | smaller, 0.5, spacing)
    assert np.array_equal(kept, larger)
    # at 2 mm^3 per voxel both pass 0.5 mL, at 0.5 mm^3 neither does
    assert remove_small_components(larger | smaller, 0.5, (1.0, 1.0, 2.0)).sum() == 1000
    assert remove_small_components(larger | smaller, 0.5, (0.5, 1.0, 1.0)).sum() == 0


def test_voxels_for_volume_is_the_volume_predicate_at_its_edge():
    """The fewest voxels whose ``count * voxel_ml >= minimum``, where the rounded quotient's ceiling is
    one too many (1.341 mL of 0.36 mm^3 voxels) or one too few (0.11 mL of 11 mm^3 voxels)."""
    assert voxels_for_volume(0.5, (0.8, 0.8, 1.5)) == 521  # 520 voxels hold 0.4992 mL
    assert voxels_for_volume(0.0, (1.0, 1.0, 1.0)) == 0
    for minimum, spacing, count in [(1.341, (0.3, 0.5, 2.4), 3725), (0.11, (5.0, 4.4, 0.5), 11)]:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        assert voxels_for_volume(minimum, spacing) == count
        assert count * voxel_ml >= minimum > (count - 1) * voxel_ml


def test_largest_component_of_a_minimum_size_equals_small_removal_then_largest():
    """One labelling gives what the two rules give in turn, on random blobs of many sizes."""
    rng = np.random.default_rng(3)
    mask = ndimage.binary_opening(rng.random((40, 40, 40)) > 0.55)
    for minimum in (1, 5, 30, 10**6):
        expected = keep_largest_component(remove_small_components(mask, minimum / 1000.0, (1.0, 1.0, 1.0)))
        assert np.array_equal(keep_largest_component(mask, min_voxels=minimum), expected)
    assert keep_largest_component(mask).sum() > 30  # the sizes straddle the minimums


def _swapped_pair(shape=(30, 10, 10)):
    """A blob at high axis-0 index labelled 'left' and one at low index labelled 'right', plus a stray."""
    high = cube(shape, (20, 2, 2), (26, 8, 8))
    low = cube(shape, (3, 2, 2), (9, 8, 8))
    stray = cube(shape, (14, 0, 0), (15, 1, 1))
    return low, high | stray, high, low, stray


def test_pair_sides_follow_ras_x_not_array_order():
    right, left, high, low, _ = _swapped_pair()
    # RAS: high index = larger x = patient right, so the labels were swapped
    new_right, new_left = assign_pair_sides(right, left, RAS)
    assert np.array_equal(new_right, high) and np.array_equal(new_left, low)
    # LAS: high index = smaller x = patient left, so the same labels were right (the stray goes)
    new_right, new_left = assign_pair_sides(right, left, LAS)
    assert np.array_equal(new_right, low) and np.array_equal(new_left, high)


def test_pair_sides_with_given_midline():
    right, left, high, low, _ = _swapped_pair()
    # both centroids (x = 11 and 45 mm) lie right of a midline at x = 0
    new_right, new_left = assign_pair_sides(right, left, RAS, midline_x=0.0)
    assert np.array_equal(new_right, high | low) and not new_left.any()


def test_pair_forming_one_component_keeps_voxel_labels():
    shape = (20, 6, 6)
    right = cube(shape, (0, 0, 0), (10, 6, 6))
    left = cube(shape, (10, 0, 0), (20, 6, 6))
    new_right, new_left = assign_pair_sides(right, left, RAS)
    assert np.array_equal(new_right, right) and np.array_equal(new_left, left)


def test_touching_pair_keeps_voxel_labels_beside_a_stray():
    """Two organs touching form one component; a stray made the second-largest one must not
    send the touching pair wholly to one side."""
    shape = (30, 6, 6)
    right, left = cube(shape, (14, 0, 0), (24, 6, 6)), cube(shape, (4, 0, 0), (14, 6, 6))
    stray = cube(shape, (27, 0, 0), (29, 2, 2))
    for midline in (None, 28.0):
        new_right, new_left = assign_pair_sides(right, left | stray, RAS, midline_x=midline)
        assert np.array_equal(new_right, right) and np.array_equal(new_left, left), midline


def test_restrict_to_parents_in_mm_with_anisotropic_spacing():
    shape = (40, 40, 40)
    spacing = (1.0, 1.0, 4.0)
    organ = cube(shape, (10, 10, 10), (20, 20, 20))
    inside = cube(shape, (12, 12, 12), (14, 14, 14))
    near_x = cube(shape, (25, 12, 12), (27, 14, 14))   # 6..7 mm beyond the organ along x
    far_x = cube(shape, (33, 12, 12), (35, 14, 14))    # 14..15 mm beyond
    near_z = cube(shape, (12, 12, 21), (14, 14, 22))   # 2 slices = 8 mm beyond along z
    far_z = cube(shape, (12, 12, 23), (14, 14, 24))    # 4 slices = 16 mm beyond
    tumour = inside | near_x | far_x | near_z | far_z
    kept = restrict_to_parents(tumour, organ, spacing, dilation_mm=10.0)
    assert np.array_equal(kept, inside | near_x | near_z)
    # a lesion straddling the limit is trimmed voxel by voxel: x = 20..29 is 1..10 mm away
    straddle = cube(shape, (20, 12, 12), (35, 14, 14))
    kept = restrict_to_parents(straddle, organ, spacing, dilation_mm=10.0)
    assert kept[:, 12, 12].nonzero()[0].tolist() == list(range(20, 30))


def test_postprocess_applies_catalog_rules_to_a_stack():
    shape = (40, 20, 20)
    spacing = (2.0, 2.0, 2.0)
    organ_main = cube(shape, (2, 2, 2), (10, 10, 10))
    organ_stray = cube(shape, (30, 15, 15), (32, 17, 17))
    high = cube(shape, (28, 2, 2), (34, 8, 8))
    low = cube(shape, (12, 2, 2), (18, 8, 8))
    lump_in = cube(shape, (4, 4, 4), (6, 6, 6))
    lump_out = cube(shape, (4, 15, 15), (6, 17, 17))   # 10 voxels = 20 mm from the organ
    pair_lump = cube(shape, (30, 3, 3), (31, 4, 4))
    names = CATALOG.names
    stack = np.stack([organ_main | organ_stray, low, high, lump_in | lump_out, pair_lump])
    out = postprocess(stack, CATALOG, names, spacing, RAS,
                      PostprocessConfig(min_component_ml=0.0, tumour_dilation_mm=5.0))
    assert isinstance(out, np.ndarray) and out.shape == stack.shape and out.dtype == bool
    assert np.array_equal(out[0], organ_main)
    assert np.array_equal(out[1], high) and np.array_equal(out[2], low)   # east = right = larger x
    assert np.array_equal(out[3], lump_in)
    assert np.array_equal(out[4], pair_lump)


def test_each_in_threads_keeps_the_order_and_runs_at_most_one_item_per_thread_ahead(monkeypatch):
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    lock, running, most = threading.Lock(), [0], [0]

    def square(item: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (item % 4))  # later items often finish first
        with lock:
            running[0] -= 1
        return item * item

    assert list(each_in_threads(square, list(range(12)))) == [item * item for item in range(12)]
    assert 2 <= most[0] <= 3  # items run side by side, never more than three at once
    assert list(each_in_threads(square, [5])) == [25]


def test_postprocess_on_threads_equals_one_thread(monkeypatch):
    shape = (40, 20, 20)
    names = CATALOG.names
    rng = np.random.default_rng(3)
    given = {name: rng.random(shape) > 0.7 for name in names}  # many components of every size
    config = PostprocessConfig(min_component_ml=0.02, min_lesion_ml=0.03, tumour_dilation_mm=2.0)
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    threaded = postprocess(dict(given), CATALOG, names, (1.0, 1.0, 1.0), RAS, config)
    monkeypatch.setattr(threads_module, "MAX_THREADS", 1)
    single = postprocess(dict(given), CATALOG, names, (1.0, 1.0, 1.0), RAS, config)
    assert all(np.array_equal(threaded[name], single[name]) for name in names)
    assert all(0 < threaded[name].sum() < given[name].sum() for name in names)


def test_postprocess_in_place_replaces_the_dict_entries_with_the_same_results():
    shape = (40, 20, 20)
    organ_main, organ_stray = cube(shape, (2, 2, 2), (10, 10, 10)), cube(shape, (30, 15, 15), (32, 17, 17))
    lump = cube(shape, (4, 4, 4), (6, 6, 6)) | cube(shape, (4, 15, 15), (6, 17, 17))
    names = ["blob_organ", "lump"]
    config = PostprocessConfig(min_component_ml=0.0, tumour_dilation_mm=5.0)
    given = {"blob_organ": organ_main | organ_stray, "lump": lump}
    copied = postprocess(dict(given), CATALOG, names, (2.0, 2.0, 2.0), RAS, config)
    before = {name: mask.copy() for name, mask in given.items()}
    result = postprocess(given, CATALOG, names, (2.0, 2.0, 2.0), RAS, config, in_place=True)
    assert result is given
    assert all(np.array_equal(result[name], copied[name]) for name in names)
    assert np.array_equal(result["blob_organ"], organ_main) and not np.array_equal(result["lump"], before["lump"])


def test_postprocess_thresholds_probabilities_and_keeps_dicts():
    shape = (20, 20, 20)
    organ = cube(shape, (2, 2, 2), (10, 10, 10))
    noise = cube(shape, (15, 15, 15), (16, 16, 16))
    probs = np.zeros((2, *shape), np.float16)
    probs[0][organ] = 0.9
    probs[0][noise] = 0.9
    probs[1][cube(shape, (3, 3, 3), (5, 5, 5))] = 0.6
    names = ["blob_organ", "lump"]
    config = PostprocessConfig(thresholds={"lump": 0.7}, min_component_ml=0.005, keep_largest=False)
    out = postprocess(probs, CATALOG, names, (1.0, 1.0, 1.0), RAS, config)
    assert np.array_equal(out[0], organ)      # the 1-voxel (0.001 mL) noise is removed
    assert not out[1].any()                   # 0.6 < the class threshold 0.7
    as_dict = postprocess({name: out[i] for i, name in enumerate(names)}, CATALOG, names,
                          (1.0, 1.0, 1.0), RAS, config)
    assert isinstance(as_dict, dict) and np.array_equal(as_dict["blob_organ"], organ)


def test_postprocess_multi_component_exemption_and_builtin_catalog():
    catalog = ClassCatalog.builtin()
    shape = (20, 20, 20)
    two = cube(shape, (1, 1, 1), (5, 5, 5)) | cube(shape, (10, 10, 10), (12, 12, 12))
    names = ["liver", "colon"]
    out = postprocess({"liver": two, "colon": two}, catalog, names, (1.0, 1.0, 1.0), RAS,
                      PostprocessConfig(min_component_ml=0.0, multi_component=("colon",)))
    assert out["liver"].sum() == 64 and out["colon"].sum() == 72


def test_merge_label_map_paints_tumours_over_organs():
    catalog = ClassCatalog.builtin()
    shape = (10, 10, 10)
    liver = cube(shape, (0, 0, 0), (6, 6, 6))
    tumour = cube(shape, (2, 2, 2), (4, 4, 4))
    spleen = cube(shape, (8, 8, 8), (10, 10, 10))
    names = ["liver_tumor", "liver", "spleen"]   # the tumour comes first in class order
    label_map, table = merge_label_map({"liver_tumor": tumour, "liver": liver, "spleen": spleen}, names, catalog)
    assert table == {1: "liver_tumor", 2: "liver", 3: "spleen"}
    assert label_map.dtype == np.uint8
    assert np.count_nonzero(label_map == 1) == 8
    assert np.count_nonzero(label_map == 2) == 216 - 8
    assert np.count_nonzero(label_map == 3) == 8
    assert label_map[3, 3, 3] == 1 and label_map[0, 0, 0] == 2 and label_map[7, 7, 7] == 0


def test_body_midline_x():
    image = np.full((10, 4, 4), -1000.0, np.float32)
    image[6:10] = 40.0                               # body at indices 6..9, centre 7.5
    assert body_midline_x(image, RAS) == pytest.approx(15.0)
    assert body_midline_x(image, LAS) == pytest.approx(-15.0)


def test_relations_to_classes_outside_the_model_are_ignored():
    """A model with one kidney and the kidney tumour: partner and second parent are absent."""
    full = ClassCatalog.builtin()
    model_catalog = ClassCatalog._unchecked([full["right_kidney"], full["kidney_tumor"]])
    kidney = np.zeros((20, 20, 20), bool)
    kidney[4:12, 4:12, 4:12] = True
    kidney[16:18, 16:18, 16:18] = True  # a stray component
    tumour = np.zeros_like(kidney)
    tumour[6:9, 6:9, 6:9] = True
    tumour[0:2, 18:20, 0:2] = True  # far outside the kidney
    out = postprocess({"right_kidney": kidney, "kidney_tumor": tumour}, model_catalog,
                      ["right_kidney", "kidney_tumor"], (1.0, 1.0, 1.0), np.eye(4),
                      PostprocessConfig(min_component_ml=0.0, tumour_dilation_mm=1.0))
    assert out["right_kidney"].sum() == 8 ** 3
    assert out["kidney_tumor"].sum() == 27
    label_map, table = merge_label_map(out, ["right_kidney", "kidney_tumor"], model_catalog)
    assert table == {1: "right_kidney", 2: "kidney_tumor"} and (label_map == 2).sum() == 27
