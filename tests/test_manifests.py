"""Manifests are checked when the DataModule sets up: every bad record on one line, before training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.data.datamodule import CTDataModule, ManifestError, read_manifest
from test_index import BODY, write_dicom

REPO = Path(__file__).resolve().parents[1]


def nifti(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), path)
    return str(path)


def record(image: str, label: str, case: str, dataset: str = "msd_task09_spleen") -> str:
    return json.dumps({"image": image, "label": label, "dataset": dataset, "case": case})


@pytest.fixture
def bad_manifest(tmp_path) -> Path:
    """Lines 1 and 5 are fine; 2 lacks an image, 3 is not JSON, 4 lacks both files, 6 lacks a key."""
    good = [nifti(tmp_path / f"imagesTr/s{k}.nii.gz") for k in (0, 1)], \
        [nifti(tmp_path / f"labelsTr/s{k}.nii.gz") for k in (0, 1)]
    lines = [record(good[0][0], good[1][0], "s0"),
             record(str(tmp_path / "imagesTr/gone.nii.gz"), good[1][1], "gone"),
             '{"image": "imagesTr/s1.nii.gz", "label": ',
             record("imagesTr/none.nii.gz", "labelsTr/none.nii.gz", "none"),
             "",
             record("imagesTr/s1.nii.gz", "labelsTr/s1.nii.gz", "s1"),
             json.dumps({"image": good[0][1], "dataset": "msd_task09_spleen"})]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def expected_lines(path: Path) -> list[str]:
    root = path.parent
    return [f"{path}:2: image {root}/imagesTr/gone.nii.gz not found",
            f"{path}:3: not JSON (Expecting value)",
            f"{path}:4: image {root}/imagesTr/none.nii.gz not found; label {root}/labelsTr/none.nii.gz not found",
            (f"{path}:7: a record needs 'image', one of ['label', 'segmentations', 'slices'] and 'dataset' "
             "(has ['dataset', 'image'])")]


def test_setup_lists_every_bad_record_before_building_a_dataset(bad_manifest):
    data = CTDataModule(manifests=[str(bad_manifest)], classes=["spleen"])
    with pytest.raises(ManifestError) as caught:
        data.setup("fit")
    lines = str(caught.value).splitlines()
    assert lines[0].startswith("4 problems in the manifests") and lines[1:] == expected_lines(bad_manifest)
    assert not hasattr(data, "train_sets")


def test_problems_of_every_manifest_and_unknown_datasets_are_reported_together(bad_manifest, tmp_path):
    other = tmp_path / "val.jsonl"
    other.write_text(record("missing.nii.gz", "missing-label.nii.gz", "m") + "\n")
    data = CTDataModule(manifests=[str(bad_manifest)], val_manifests=[str(other)], classes=["spleen"])
    with pytest.raises(ManifestError) as caught:
        data.setup("fit")
    lines = str(caught.value).splitlines()
    assert len(lines) == 6 and lines[-1] == (f"{other}:1: image {tmp_path}/missing.nii.gz not found; "
                                             f"label {tmp_path}/missing-label.nii.gz not found")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(record("imagesTr/s0.nii.gz", "labelsTr/s0.nii.gz", "s0", dataset="no_such_dataset") + "\n")
    with pytest.raises(ManifestError, match=rf"{unknown}: dataset 'no_such_dataset': .*no_such_dataset"):
        CTDataModule(manifests=[str(unknown)], classes=["spleen"]).setup("fit")


def test_a_good_manifest_reads_with_paths_resolved_against_its_folder(tmp_path):
    nifti(tmp_path / "imagesTr/s0.nii.gz")
    nifti(tmp_path / "labelsTr/s0.nii.gz")
    path = tmp_path / "manifest.jsonl"
    path.write_text(record("imagesTr/s0.nii.gz", "labelsTr/s0.nii.gz", "s0") + "\n\n")
    assert read_manifest(path) == [{"image": str(tmp_path / "imagesTr/s0.nii.gz"),
                                    "label": str(tmp_path / "labelsTr/s0.nii.gz"),
                                    "dataset": "msd_task09_spleen", "case": "s0"}]
    with pytest.raises(ManifestError, match=r"missing\.jsonl: manifest not found"):
        read_manifest(tmp_path / "missing.jsonl")


def test_fit_with_a_bad_manifest_stops_before_training_with_the_lines_last(bad_manifest, tmp_path):
    command = [sys.executable, "-m", "clipseg3d.cli.main", "fit", "--config", str(REPO / "experiments/tiny.yaml"),
               "--data=clipseg3d.data.datamodule.CTDataModule", f"--data.init_args.manifests=[{bad_manifest}]",
               f"--trainer.default_root_dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-4:] == expected_lines(bad_manifest), done.stderr[-3000:]
    assert "error: 4 problems in the manifests" in lines[-5]
    assert len(lines) < 20 and "Traceback" not in done.stderr and "Epoch" not in done.stdout + done.stderr


def test_a_label_whose_header_puts_it_elsewhere_than_its_image_is_a_bad_record(tmp_path):
    image = nifti(tmp_path / "imagesTr/s0.nii.gz")
    shifted = tmp_path / "s0-label.nii.gz"
    affine = np.eye(4)
    affine[:3, 3] = (0, 0, 50)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), affine), shifted)
    series = write_dicom(tmp_path / "PANCREAS_0001/study/series", BODY)  # a DICOM image, a label with origin 0
    flat = tmp_path / "label0001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 12), np.uint8), np.diag([0.7, 0.8, 2.0, 1.0])), flat)
    path = tmp_path / "manifest.jsonl"
    path.write_text(record(image, str(shifted), "s0") + "\n" + record(str(series), str(flat), "0001") + "\n")
    with pytest.raises(ManifestError) as caught:
        CTDataModule(manifests=[str(path)], classes=["spleen"]).setup("fit")
    lines = str(caught.value).splitlines()[1:]
    assert lines[0].startswith(f"{path}:1: label {shifted} (RAS box [[0.0, 0.0, 50.0], [1.0, 1.0, 51.0]] mm) does "
                               f"not cover the region of image {image} ([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]] mm)")
    assert lines[1].startswith(f"{path}:2: label {flat} (RAS box [[0.0, 0.0, 0.0], [2.8, 4.0, 22.0]] mm) does not "
                               f"cover the region of image {series} ([[7.2, 16.0, 0.0], [10.0, 20.0, 22.0]] mm)")
