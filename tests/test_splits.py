"""Seeded split files: written once by ``clipseg3d index --split``, read by fit, test and ``evaluate --split``."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.cli.main import main
from clipseg3d.data.datamodule import CTDataModule, ManifestError
from clipseg3d.data.splits import SplitError, make_split, read_split, split_path

CASES = [f"spleen_{i}" for i in range(10)]
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def test_a_split_depends_on_the_case_ids_and_the_seed_only():
    split = make_split(CASES, (0.7, 0.1, 0.2), seed=0)
    assert [len(split[part]) for part in ("train", "val", "test")] == [7, 1, 2]
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(CASES)
    assert make_split(list(reversed(CASES)), (0.7, 0.1, 0.2), seed=0) == split
    others = [make_split(CASES, (0.7, 0.1, 0.2), seed=seed)["test"] for seed in range(1, 6)]
    assert any(test != split["test"] for test in others)
    with pytest.raises(SplitError, match="sum to 1"):
        make_split(CASES, (0.7, 0.1, 0.1), seed=0)


@pytest.fixture
def dataset(tmp_path):
    """An MSD-layout spleen dataset of ten 6x5x4 cases: a spleen box, one voxel wider in each case."""
    root = tmp_path / "Task09_Spleen"
    for i, case in enumerate(CASES):
        label = np.zeros((6, 5, 4), np.uint8)
        label[1:3 + i % 3, 1:4, 1:3] = 1
        for folder, array in (("imagesTr", np.where(label > 0, 60.0, -100.0).astype(np.float32)),
                              ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, AFFINE), str(root / folder / f"{case}.nii.gz"))
    return root


def index(root, manifest, *extra) -> int:
    return main(["index", "msd_task09_spleen", str(root), "-o", str(manifest), *map(str, extra)])


def test_index_writes_the_split_once_and_refuses_a_different_one(dataset, tmp_path, capsys):
    manifest = tmp_path / "spleen.jsonl"
    assert index(dataset, manifest, "--split", 0.6, 0.2, 0.2, "--seed", 3) == 0
    path = split_path(manifest)
    assert path == tmp_path / "spleen.split.json"
    assert f"6 train, 2 val, 2 test; seed 3) to {path}" in capsys.readouterr().out
    written = json.loads(path.read_text())
    assert written["seed"] == 3 and written["fractions"] == [0.6, 0.2, 0.2]
    assert read_split(path) == make_split(CASES, (0.6, 0.2, 0.2), 3)

    manifest.unlink()  # a new manifest beside the split file of another seed: nothing is written
    assert index(dataset, manifest, "--split", 0.6, 0.2, 0.2, "--seed", 4) == 1
    assert "spleen.split.json exists and assigns the cases differently; pass --overwrite" in capsys.readouterr().err
    assert not manifest.exists() and read_split(path) == make_split(CASES, (0.6, 0.2, 0.2), 3)
    assert index(dataset, manifest, "--split", 0.6, 0.2, 0.2, "--seed", 3) == 0  # the same split: fine
    assert index(dataset, manifest, "--split", 0.6, 0.2, 0.2, "--seed", 4, "--overwrite") == 0
    assert read_split(path) == make_split(CASES, (0.6, 0.2, 0.2), 4)

    with pytest.raises(SystemExit) as exit_info:
        index(dataset, tmp_path / "other.jsonl", "--split", 0.5, 0.5, 0.5)
    assert exit_info.value.code == 2 and "--split: split fractions [0.5, 0.5, 0.5]" in capsys.readouterr().err


def test_fit_and_test_read_the_parts_of_the_split_file(dataset, tmp_path):
    manifest = tmp_path / "spleen.jsonl"
    assert index(dataset, manifest, "--split", 0.6, 0.2, 0.2, "--seed", 1) == 0
    parts = read_split(split_path(manifest))
    settings = {"manifests": [str(manifest)], "splits": True, "classes": ["spleen"], "spacing": (2.0, 2.0, 3.0),
                "crop_size": (4, 4, 4)}
    data = CTDataModule(**settings)
    data.setup("fit")
    assert data.train_sets["msd_task09_spleen"][1] == 6 and sum(len(part) for part in data.val_sets) == 2
    data.setup("test")
    (test_set,) = data.test_sets
    assert [record["case"] for record in test_set.records] == parts["test"]
    item = test_set[0]
    assert item["case"].name == parts["test"][0] and item["case"].label.shape == (6, 5, 4)

    split_path(manifest).unlink()
    with pytest.raises(ManifestError, match="spleen.split.json: no such split file; write it with clipseg3d index"):
        CTDataModule(**settings).setup("test")
    with pytest.raises(ManifestError, match="clipseg3d test needs test scans"):
        CTDataModule(manifests=[str(manifest)], classes=["spleen"]).setup("test")


def write_prediction(pred_dir, case: str, mask: np.ndarray) -> None:
    folder = pred_dir / case
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), str(folder / "labels.nii.gz"))
    (folder / "classes.json").write_text(json.dumps({"1": "spleen"}))


def test_evaluate_scores_only_the_test_cases_and_fails_on_a_missing_one(dataset, tmp_path, capsys):
    manifest = tmp_path / "spleen.jsonl"
    assert index(dataset, manifest, "--split", 0.6, 0.2, 0.2, "--seed", 2) == 0
    parts = read_split(split_path(manifest))
    pred = tmp_path / "pred"
    for case in CASES:
        truth = np.asanyarray(nib.load(dataset / "labelsTr" / f"{case}.nii.gz").dataobj) > 0
        write_prediction(pred, case, truth)
    args = ["evaluate", "--pred", str(pred), "--gt", str(dataset / "labelsTr"), "--label-map", "msd_task09_spleen",
            "--split", str(split_path(manifest))]
    assert main([*args, "-o", str(tmp_path / "scores")]) == 0
    with open(tmp_path / "scores" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["case"] for row in rows) == parts["test"] and all(float(row["dice"]) == 1.0 for row in rows)

    missing = parts["test"][0]
    for path in sorted((pred / missing).iterdir()):
        path.unlink()
    (pred / missing).rmdir()
    assert main([*args, "-o", str(tmp_path / "scores2")]) == 1
    assert f"case {missing}: {pred / missing}: no labels.nii.gz" in capsys.readouterr().err
