"""The demo's held-out scoring: Dice, per-patient tumour detection on each scan's own grid, goals."""

import json

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.cli import demo
from clipseg3d.data.labelmap import LabelMap

CLASSES = ["spleen", "right_kidney", "liver", "liver_tumor", "kidney_tumor"]
SPACING = 4.0  # one voxel is 0.064 ml: one predicted voxel is under the 0.1 ml detection threshold, two are over


def write_nifti(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([SPACING] * 3 + [1.0])), path)


def write_case(root, case, truth, predicted_labels, tumour_masks):
    """A label file and a ``clipseg3d segment``-like output folder (tumours in their own mask files)."""
    write_nifti(root / "labels" / f"{case}.nii.gz", truth)
    folder = root / "seg" / case
    write_nifti(folder / "labels.nii.gz", predicted_labels)
    (folder / "classes.json").write_text(json.dumps({str(value): name for value, name in enumerate(CLASSES, start=1)}))
    for name, mask in tumour_masks.items():
        write_nifti(folder / "masks" / f"{name}.nii.gz", mask)
    return folder


@pytest.fixture
def label_map(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("name: toy\nlabel_count: 5\nlayout: {kind: msd}\nlabels:\n"
                    + "".join(f"  {value}: {name}\n" for value, name in enumerate(CLASSES, start=1)))
    return LabelMap.load(path)


def test_held_out_scoring_counts_detection_by_volume_on_the_scan_grid(tmp_path, label_map, capsys):
    shape = (20, 20, 10)
    truth = np.zeros(shape, np.uint8)
    truth[2:6, 2:6, 2:6] = 1                      # spleen, 64 voxels
    truth[10:18, 2:10, 2:8] = 3                   # liver
    truth[12:14, 4:6, 4:6] = 4                    # liver tumour, 8 voxels
    truth[2:8, 12:18, 2:8] = 2                    # right kidney
    truth[3:5, 13:15, 3:5] = 5                    # kidney tumour
    predicted = np.zeros(shape, np.uint8)
    predicted[2:6, 2:6, 2:4] = 1                  # half the spleen: Dice 2*32/(32+64)
    predicted[10:18, 2:10, 2:8] = 3
    liver_tumour = np.zeros(shape, bool)
    liver_tumour[12:14, 4, 4] = True              # two voxels on the lesion: 0.128 ml, detected
    liver_tumour[17, 9, 7] = True                 # and one apart from it: a false-positive lesion
    kidney_tumour = np.zeros(shape, bool)
    kidney_tumour[3, 13, 3] = True                # one voxel on the lesion: a hit, but 0.064 ml, not detected
    first = write_case(tmp_path, "a", truth, predicted, {"liver_tumor": liver_tumour, "kidney_tumor": kidney_tumour})
    clean_truth = np.where(truth >= 4, 3 - (truth == 5), truth)  # the same body without tumours
    stray = np.zeros(shape, bool)
    stray[15, 5, 5] = True                        # one voxel: 0.064 ml, the scan stays negative
    second = write_case(tmp_path, "b", clean_truth, predicted, {"liver_tumor": stray})

    tallies = {}
    scores = demo.score(first, tmp_path / "labels" / "a.nii.gz", label_map, CLASSES, tallies)
    demo.score(second, tmp_path / "labels" / "b.nii.gz", label_map, CLASSES, tallies)

    assert scores["spleen"] == pytest.approx(64 / 96, rel=1e-6)
    assert scores["liver_tumor"] == pytest.approx(2 * 2 / (3 + 8), rel=1e-6)
    liver, kidney = tallies["liver_tumor"], tallies["kidney_tumor"]
    assert (liver.detected, liver.patients_with_tumour, liver.cleared, liver.patients_without_tumour) == (1, 1, 1, 1)
    assert (liver.hits, liver.true_lesions, liver.false_positives) == (1, 1, 2)
    assert (kidney.detected, kidney.patients_with_tumour, kidney.cleared, kidney.hits) == (0, 1, 1, 1)
    demo.print_detection(tallies)
    table = capsys.readouterr().out
    assert "| liver_tumor | 1/1 (1.00) | 1/1 (1.00) | 1/1 (1.00) | 2 |" in table
    assert "| kidney_tumor | 0/1 (0.00) | 1/1 (1.00) | 1/1 (1.00) | 0 |" in table


def test_goals_report_the_mean_the_lowest_class_and_the_liver_tumour_sensitivity(capsys):
    rows = {name: [0.9, 0.9] for name in demo.GOAL_CLASSES}
    rows["aorta"] = [0.5, 0.8]
    tallies = {"liver_tumor": demo.DetectionTally(patients_with_tumour=3, detected=2)}
    demo.print_goals(rows, tallies)
    lines = capsys.readouterr().out.split("\n")[1:4]
    mean = (7 * 0.9 + 0.65) / 8
    assert lines[0].endswith(f": {mean:.3f} (goal >= 0.85: met)")
    assert lines[1] == "lowest Dice: aorta 0.650 (goal >= 0.6: met)"
    assert lines[2] == "liver_tumor sensitivity: 0.67 (goal >= 0.67: met)"
    demo.print_goals(rows, {})
    assert "liver_tumor sensitivity: n/a (goal >= 0.67: missed)" in capsys.readouterr().out
