"""``clipseg3d evaluate`` on segment-style folders built here, and on a real CT's labels."""

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from clipseg3d.catalog import load_catalog
from clipseg3d.cli.main import main
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.targets import build_targets

from conftest import shared_data

F32 = 8 * float(np.finfo(np.float32).eps)
SHAPE = (32, 16, 12)
AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])  # RAS: a larger first index is further to the patient's right
PREDICTED = {1: "right_kidney", 2: "left_kidney", 3: "kidney_tumor", 4: "liver"}


def save(array: np.ndarray, path: Path, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine), str(path))


def region(low, high, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    return mask


LEFT = region((2, 3, 3), (12, 13, 7))       # world x 2..11 mm: the patient's left (smaller RAS x)
RIGHT = region((20, 3, 3), (30, 13, 7))     # world x 20..29 mm: the patient's right
TUMOUR = region((21, 4, 4), (26, 9, 7))     # 75 voxels inside the right kidney


def write_case(pred_dir: Path, gt_dir: Path, case: str, tumour: bool) -> None:
    """Truth in KiTS19 values (1 kidney, 2 tumour); a segment-style prediction of it.

    Prediction: right kidney exact (its full mask in masks/, tumour voxels included); left kidney
    shifted one 3 mm slice (in masks/ only with a tumour, as segment writes it; else read from
    labels.nii.gz); the tumour exact plus one false-positive voxel; some liver, which KiTS19 does
    not label.
    """
    truth = np.zeros(SHAPE, np.uint8)
    truth[LEFT | RIGHT] = 1
    predicted_tumour = np.zeros(SHAPE, bool)
    if tumour:
        truth[TUMOUR] = 2
        predicted_tumour = TUMOUR.copy()
        predicted_tumour[28, 11, 3] = True
    save(truth, gt_dir / f"{case}.nii.gz")
    labels = np.zeros(SHAPE, np.uint8)
    labels[RIGHT] = 1
    labels[np.roll(LEFT, 1, axis=2)] = 2
    labels[predicted_tumour] = 3
    labels[region((14, 0, 0), (18, 4, 4))] = 4
    folder = pred_dir / case
    save(labels, folder / "labels.nii.gz")
    (folder / "classes.json").write_text(json.dumps({str(value): name for value, name in PREDICTED.items()}))
    save(RIGHT, folder / "masks" / "right_kidney.nii.gz")
    save(predicted_tumour, folder / "masks" / "kidney_tumor.nii.gz")
    if tumour:
        save(labels == 2, folder / "masks" / "left_kidney.nii.gz")


def read_rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as handle:
        return {(row["case"], row["class"]): row for row in csv.DictReader(handle)}


def evaluate(pred: Path, gt: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", "--pred", str(pred), "--gt", str(gt), "-o", str(out), *extra])


def test_evaluate_scores_segment_folders_against_a_kits19_label_volume(tmp_path, capsys):
    pred, gt, out = tmp_path / "seg", tmp_path / "labels", tmp_path / "eval"
    write_case(pred, gt, "a", tumour=True)
    write_case(pred, gt, "b", tumour=False)
    assert evaluate(pred, gt, out, "--label-map", "kits19") == 0
    assert sorted(path.name for path in out.iterdir()) == ["metrics.csv", "metrics.png", "summary.md"]
    rows = read_rows(out / "metrics.csv")
    assert sorted({name for _, name in rows}) == ["kidney_tumor", "left_kidney", "right_kidney"]
    right = rows["a", "right_kidney"]   # from its full mask: the tumour voxels count for the kidney
    assert (right["status"], float(right["dice"]), float(right["nsd"]), float(right["hd95_mm"])) == \
        ("present", 1.0, 1.0, 0.0)
    left = rows["b", "left_kidney"]     # from labels.nii.gz; the shifted box of test_metrics, at 2 mm
    assert float(left["dice"]) == pytest.approx(0.75, rel=F32)
    assert float(left["nsd"]) == pytest.approx(156 / 272, rel=F32)
    assert float(left["hd95_mm"]) == pytest.approx(3.0, rel=F32)
    assert float(left["nsd_tolerance_mm"]) == 2.0
    assert float(left["true_ml"]) == pytest.approx(400 * 3 / 1000)
    tumour = rows["a", "kidney_tumor"]
    assert float(tumour["dice"]) == pytest.approx(2 * 75 / (75 + 76), rel=F32)
    assert (tumour["tumour_in_truth"], tumour["detected"], tumour["true_lesions"], tumour["predicted_lesions"],
            tumour["lesion_hits"], tumour["false_positive_lesions"]) == ("True", "True", "1", "2", "1", "1")
    absent = rows["b", "kidney_tumor"]
    assert (absent["status"], absent["dice"], absent["nsd"], absent["hd95_mm"]) == ("absent", "", "", "")
    assert (absent["tumour_in_truth"], absent["detected"]) == ("False", "False")
    summary = (out / "summary.md").read_text()
    left_row = ("| left_kidney | organ | 2 | 0 | 0 | 0 | 2 | "
                "0.750 ± 0.000 (n=2) | 0.574 ± 0.000 (n=2) | 3.00 ± 0.00 (n=2) |")
    assert left_row in summary
    assert "| kidney_tumor | 1 | 1 | 1.000 | 1 | 1 | 1.000 | 1 | 1 | 1.000 | 2 | 1 | 0.500 | 0.500 |" in summary
    assert "predicted, not labelled by kits19: liver" in summary
    assert "Label map: kits19. Cases scored: 2; failed: 0." in summary
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")


def test_bad_cases_are_one_line_each_and_the_others_are_scored(tmp_path, capsys):
    pred, gt, out = tmp_path / "seg", tmp_path / "labels", tmp_path / "eval"
    for case in ("good", "missing", "grid", "value"):
        write_case(pred, gt, case, tumour=True)
    (gt / "missing.nii.gz").unlink()
    save(np.zeros((8, 8, 8)), gt / "grid.nii.gz")
    unknown = np.asanyarray(nib.load(str(gt / "value.nii.gz")).dataobj).copy()
    unknown[0, 0, 0] = 7
    save(unknown, gt / "value.nii.gz")
    assert evaluate(pred, gt, out, "--label-map", "kits19") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("clipseg3d evaluate: error:")]
    assert len(errors) == 4
    assert "case grid: grid mismatch" in errors[0]
    assert "case missing: no ground truth" in errors[1]
    assert "case value:" in errors[2] and "label value(s) [7]" in errors[2]
    assert "3 of 4 cases failed" in errors[3]
    assert {case for case, _ in read_rows(out / "metrics.csv")} == {"good"}
    assert "- missing: case missing: no ground truth" in (out / "summary.md").read_text()


def test_an_unknown_label_value_in_a_prediction_fails_its_case(tmp_path, capsys):
    pred, gt, out = tmp_path / "seg", tmp_path / "labels", tmp_path / "eval"
    write_case(pred, gt, "a", tumour=False)
    labels = np.asanyarray(nib.load(str(pred / "a" / "labels.nii.gz")).dataobj).copy()
    labels[0, 0, 0] = 9
    save(labels, pred / "a" / "labels.nii.gz")
    assert evaluate(pred, gt, out, "--label-map", "kits19") == 1
    assert "label value(s) [9] are not in classes.json" in capsys.readouterr().err


def test_without_a_label_map_the_truth_uses_the_predictions_numbering(tmp_path):
    pred, gt, out = tmp_path / "seg", tmp_path / "labels", tmp_path / "eval"
    write_case(pred, gt, "a", tumour=True)
    labels = np.asanyarray(nib.load(str(pred / "a" / "labels.nii.gz")).dataobj)
    save(labels, gt / "a.nii.gz")       # the prediction as truth: tumour voxels count for their parent
    assert evaluate(pred, gt, out) == 0
    rows = read_rows(out / "metrics.csv")
    assert {float(row["dice"]) for row in rows.values()} == {1.0}
    assert len(rows) == 4


@pytest.mark.parametrize("options, message", [
    (["--label-map", "no_such_dataset"], "unknown label map"),
    (["--detection-ml", "-1"], "--detection-ml"),
])
def test_unusable_options_exit_with_status_2(tmp_path, capsys, options, message):
    write_case(tmp_path / "seg", tmp_path / "labels", "a", tumour=False)
    with pytest.raises(SystemExit) as stop:
        evaluate(tmp_path / "seg", tmp_path / "labels", tmp_path / "eval", *options)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        evaluate(tmp_path / "nowhere", tmp_path / "labels", tmp_path / "eval")
    assert stop.value.code == 2


def test_evaluate_on_a_real_ct_with_one_organ_eroded(tmp_path):
    case = shared_data("totalseg-case")
    image = nib.load(str(case / "labels.nii.gz"))
    label, affine = np.asanyarray(image.dataobj), image.affine
    catalog = load_catalog()
    label_map = LabelMap.load("totalsegmentator_v2", catalog)
    names = label_map.labelled_classes
    targets, _, _ = build_targets(label_map, label, affine, names, catalog=catalog)
    liver = names.index("liver")
    eroded = ndimage.binary_erosion(targets[liver])
    targets[liver] = eroded
    labels = np.zeros(label.shape, np.uint8)
    for value, target in enumerate(targets, start=1):
        labels[target > 0] = value
    pred, gt, out = tmp_path / "seg", tmp_path / "labels", tmp_path / "eval"
    save(labels, pred / "s0" / "labels.nii.gz", affine)
    (pred / "s0" / "classes.json").write_text(json.dumps({str(v): n for v, n in enumerate(names, start=1)}))
    save(label, gt / "s0.nii.gz", affine)
    assert evaluate(pred, gt, out, "--label-map", "totalsegmentator_v2") == 0
    assert sorted(path.name for path in out.iterdir()) == ["metrics.csv", "metrics.png", "summary.md"]
    rows = read_rows(out / "metrics.csv")
    full = np.count_nonzero(label == label_map.value_of("liver"))
    row = rows["s0", "liver"]
    assert float(row["dice"]) == pytest.approx(2 * np.count_nonzero(eroded) / (np.count_nonzero(eroded) + full),
                                               rel=F32)
    # every eroded edge voxel is one 3 mm voxel from the removed rim: nothing within 2 mm
    assert float(row["nsd"]) == 0.0 and float(row["hd95_mm"]) >= 3.0 - F32
    others = [r for (_, name), r in rows.items() if name != "liver" and r["status"] == "present"]
    assert len(others) >= 10
    assert all((float(r["dice"]), float(r["nsd"]), float(r["hd95_mm"])) == (1.0, 1.0, 0.0) for r in others)
    assert {r["status"] for r in rows.values()} <= {"present", "absent"}
    assert math.isclose(float(row["true_ml"]), full * 27 / 1000)


def test_a_tumour_parent_without_its_mask_file_fails_its_case(tmp_path, capsys):
    pred, gt, out = tmp_path / "seg", tmp_path / "labels", tmp_path / "eval"
    write_case(pred, gt, "a", tumour=True)
    (pred / "a" / "masks" / "right_kidney.nii.gz").unlink()
    assert evaluate(pred, gt, out, "--label-map", "kits19") == 1
    assert "right_kidney.nii.gz is missing: kidney_tumor voxels in labels.nii.gz belong to right_kidney too" \
        in capsys.readouterr().err
