"""``clipseg3d test`` on a tiny.yaml checkpoint: the metric table, and a per-case table equal to
``clipseg3d segment`` + ``clipseg3d evaluate`` of the same synthetic test scans."""

import contextlib
import csv
import io
import math

import numpy as np
import pytest
import yaml
from scipy import ndimage

from clipseg3d.catalog import load_catalog
from clipseg3d.cli.main import main
from clipseg3d.data.synthetic import SyntheticDataModule, synthetic_volume
from clipseg3d.evaluation.detection import LesionCounts, PatientDetection
from clipseg3d.evaluation.metrics import ClassScore
from clipseg3d.evaluation.scoring import ClassResult
from clipseg3d.training.testing import collect_evaluation, metric_means

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = REPO / "experiments" / "tiny.yaml"
COMPARED = ("dice", "nsd", "hd95_mm", "true_ml", "predicted_ml")
EQUAL = ("status", "nsd_tolerance_mm", "tumour_in_truth", "detected", "true_lesions", "predicted_lesions",
         "lesion_hits", "false_positive_lesions")


def tiny_data() -> SyntheticDataModule:
    """The data module tiny.yaml configures (so its test scans are the ones ``clipseg3d test`` scores)."""
    config = yaml.safe_load(TINY.read_text())
    return SyntheticDataModule(classes=config["model"]["classes"], **config["data"]["init_args"])


def read_rows(path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as handle:
        return {(row["case"], row["class"]): row for row in csv.DictReader(handle)}


def close(a: str, b: str) -> bool:
    if a == "" or b == "":
        return a == b
    x, y = float(a), float(b)
    return (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-3 * max(1.0, abs(x))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny.yaml fitted through the command, long enough (80 steps, every class labelled in every
    training volume) that several classes of the test scans score well above 0."""
    folder = tmp_path_factory.mktemp("fit")
    assert main(["fit", "--config", str(TINY), "--trainer.max_steps=80", "--trainer.max_epochs=-1",
                 "--model.lr=3e-3", "--data.init_args.num_datasets=1",
                 "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={folder}",
                 "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]) == 0
    (path,) = folder.rglob("*.ckpt")
    return path


@pytest.fixture(scope="module")
def test_run(checkpoint, tmp_path_factory):
    """``clipseg3d test`` of the checkpoint: what it printed and the folder of its reports."""
    folder = tmp_path_factory.mktemp("test")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["test", "--config", str(TINY), f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={folder}",
                     "--trainer.enable_progress_bar=false"]) == 0
    return printed.getvalue(), folder / "test"


def test_test_prints_the_metric_table_and_equals_segment_then_evaluate(checkpoint, test_run, tmp_path):
    printed, reports = test_run
    for key in ("test/dice/liver", "test/nsd/liver", "test/dice/liver_tumor", "test/nsd_mean",
                "test/tumour_sensitivity/liver_tumor", "test/lesion_recall/liver_tumor"):
        assert key in printed
    tested = read_rows(reports / "metrics.csv")
    assert (reports / "summary.md").exists() and (reports / "metrics.png").exists()

    data = tiny_data()
    cases = tmp_path / "cases"
    data.write_test_cases(cases)
    assert main(["segment", str(cases / "imagesTs"), "--ckpt", str(checkpoint), "-o", str(tmp_path / "seg"),
                 "--no-overlay"]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "seg"), "--gt", str(cases / "labelsTs"), "--label-map",
                 str(cases / "synthetic.yaml"), "-o", str(tmp_path / "scores")]) == 0
    evaluated = read_rows(tmp_path / "scores" / "metrics.csv")

    names = [case.name for case in data.test_cases]
    assert sorted(tested) == sorted(evaluated) == sorted((case, name) for case in names for name in data.class_names)
    for key, row in tested.items():
        other = evaluated[key]
        assert {column: row[column] for column in EQUAL} == {column: other[column] for column in EQUAL}, key
        assert all(close(row[column], other[column]) for column in COMPARED), (key, row, other)
    # the scores compared are not trivial: several (case, class) rows have Dice and NSD well above 0,
    # and the truth has every class in every scan
    good = [key for key, row in tested.items() if float(row["dice"]) > 0.5 and float(row["nsd"]) > 0.5]
    assert len(good) >= 3, sorted((key, row["dice"], row["nsd"]) for key, row in tested.items())
    assert len({name for _, name in good}) >= 2, good
    assert all(float(row["true_ml"]) > 0 and row["status"] in ("present", "missed") for row in tested.values()
               if row["kind"] == "tumour")


def test_ct_datamodule_scores_the_scans_of_test_manifests_on_their_grid(checkpoint, test_run, tmp_path):
    """The same scans through CTDataModule's ``test_manifests``: the same truth on the scan grid."""
    manifest = tiny_data().write_test_cases(tmp_path / "cases")
    folder = tmp_path / "ct"
    assert main(["test", "--config", str(TINY), f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={folder}",
                 "--trainer.enable_progress_bar=false", "--data=clipseg3d.data.datamodule.CTDataModule",
                 f"--data.init_args.test_manifests=[{manifest}]", "--data.init_args.crop_size=[32,32,32]",
                 "--data.init_args.hu_window=[0,1]"]) == 0
    through_ct, synthetic = read_rows(folder / "test" / "metrics.csv"), read_rows(test_run[1] / "metrics.csv")
    assert sorted(through_ct) == sorted(synthetic)
    assert all(close(row["true_ml"], synthetic[key]["true_ml"]) for key, row in through_ct.items())


def test_the_logged_means_leave_out_what_cannot_be_computed():
    """An absent class gets no mean (never 0 or 1); detection rates count patients and lesions."""
    absent = ClassScore("absent", None, None, None, 2.0, 0.0, 0.0)
    present = ClassScore("present", 0.5, 0.75, 3.0, 2.0, 1.0, 1.0)
    missed = ClassScore("missed", 0.0, 0.0, float("nan"), 2.0, 1.0, 0.0)
    results = [ClassResult("a", "liver", "organ", present), ClassResult("b", "liver", "organ", missed),
               ClassResult("a", "spleen", "organ", absent), ClassResult("b", "spleen", "organ", absent),
               ClassResult("a", "liver_tumor", "tumour", present, PatientDetection(True, True, 1.0),
                           LesionCounts(2, 2, 1, 1)),
               ClassResult("b", "liver_tumor", "tumour", absent, PatientDetection(False, False, 0.0),
                           LesionCounts(0, 0, 0, 0))]
    means = metric_means(collect_evaluation(results, ["phantoms"]))
    assert not any("spleen" in key for key in means)
    assert means == pytest.approx({"dice/liver": 0.25, "nsd/liver": 0.375, "hd95/liver": 3.0, "dice/liver_tumor": 0.5,
                                   "nsd/liver_tumor": 0.75, "hd95/liver_tumor": 3.0,
                                   "tumour_sensitivity/liver_tumor": 1.0, "tumour_specificity/liver_tumor": 1.0,
                                   "lesion_recall/liver_tumor": 0.5, "lesion_precision/liver_tumor": 0.5,
                                   "fp_lesions_per_scan/liver_tumor": 0.5, "dice_mean": 0.375, "nsd_mean": 0.5625},
                                  rel=1e-12)


def test_synthetic_pairs_lie_on_their_sides_and_intensities_stay_in_the_window():
    """The right class of every left/right pair lies at the larger RAS x (as post-processing assigns
    sides), for tiny.yaml's classes and the whole catalog; intensities are in the window [0, 1]."""
    catalog = load_catalog(with_plugins=False)
    for names in (yaml.safe_load(TINY.read_text())["model"]["classes"], catalog.names):
        image, targets = synthetic_volume(names, (24, 24, 24), np.random.default_rng(3), catalog)
        assert 0.0 <= image.min() and image.max() <= 1.0
        masks = dict(zip(names, targets))
        pairs = [(name, catalog[name].partner) for name in names
                 if catalog[name].side == "right" and catalog[name].partner in masks]
        assert pairs
        for right, left in pairs:
            right_x, left_x = (ndimage.center_of_mass(masks[name])[0] for name in (right, left))
            assert right_x > 12 > left_x, (right, right_x, left, left_x)
