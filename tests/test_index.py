"""``clipseg3d index`` on tiny fake dataset trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clipseg3d.cli.index import main
from clipseg3d.data.index import LayoutError, index_dataset


def nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), path)
    return path


def tree(root: Path, *names: str) -> Path:
    for name in names:
        nifti(root / name)
    return root


def test_msd(tmp_path):
    root = tree(tmp_path / "Task09_Spleen", "imagesTr/spleen_2.nii.gz", "labelsTr/spleen_2.nii.gz",
                "imagesTr/spleen_10.nii.gz", "labelsTr/spleen_10.nii.gz", "imagesTs/spleen_1.nii.gz")
    (root / "imagesTr" / "._spleen_2.nii.gz").write_bytes(b"\0")  # macOS metadata file in the MSD tarballs
    records = index_dataset("msd_task09_spleen", root)
    assert records == [
        {"image": str(root / "imagesTr/spleen_10.nii.gz"), "label": str(root / "labelsTr/spleen_10.nii.gz"),
         "dataset": "msd_task09_spleen", "case": "spleen_10"},
        {"image": str(root / "imagesTr/spleen_2.nii.gz"), "label": str(root / "labelsTr/spleen_2.nii.gz"),
         "dataset": "msd_task09_spleen", "case": "spleen_2"},
    ]
    assert list(records[0]) == ["image", "label", "dataset", "case"]


def test_image_without_label(tmp_path):
    root = tree(tmp_path, "imagesTr/liver_0.nii.gz", "labelsTr/liver_0.nii.gz", "imagesTr/liver_1.nii.gz")
    with pytest.raises(LayoutError, match=r"liver_1\.nii\.gz has no label.*labelsTr/liver_1\.nii\.gz.*'msd'"):
        index_dataset("msd_task03_liver", root)
    records = index_dataset("msd_task03_liver", root, skip_unlabelled=True)
    assert [r["case"] for r in records] == ["liver_0"]


def test_pairs_btcv(tmp_path):
    root = tree(tmp_path / "Training", "img/img0001.nii.gz", "label/label0001.nii.gz",
                "img/img0002.nii.gz", "label/label0002.nii.gz")
    records = index_dataset("btcv", root)
    assert [(r["case"], Path(r["image"]).name, Path(r["label"]).name) for r in records] == [
        ("0001", "img0001.nii.gz", "label0001.nii.gz"), ("0002", "img0002.nii.gz", "label0002.nii.gz")]
    assert all(Path(r["image"]).is_absolute() and r["dataset"] == "btcv" for r in records)


def test_pairs_amos_keeps_ct_only(tmp_path):
    root = tree(tmp_path, "imagesTr/amos_0001.nii.gz", "labelsTr/amos_0001.nii.gz",
                "imagesVa/amos_0008.nii.gz", "labelsVa/amos_0008.nii.gz",
                "imagesTr/amos_0540.nii.gz", "labelsTr/amos_0540.nii.gz")  # 0540: MRI
    assert [r["case"] for r in index_dataset("amos22", root)] == ["0001", "0008"]


def test_nnunet_flare22(tmp_path):
    root = tree(tmp_path, "images/FLARE22_Tr_0001_0000.nii.gz", "labels/FLARE22_Tr_0001.nii.gz")
    (record,) = index_dataset("flare22", root)
    assert record["case"] == "FLARE22_Tr_0001" and record["label"].endswith("labels/FLARE22_Tr_0001.nii.gz")


def test_kits(tmp_path):
    root = tree(tmp_path / "data", "case_00000/imaging.nii.gz", "case_00000/segmentation.nii.gz",
                "case_00001/imaging.nii.gz", "case_00001/segmentation.nii.gz", "case_00210/imaging.nii.gz")
    with pytest.raises(LayoutError, match=r"case_00210/imaging\.nii\.gz has no label.*--skip-unlabelled"):
        index_dataset("kits19", root)
    records = index_dataset("kits19", root, skip_unlabelled=True)
    assert [(r["case"], Path(r["label"]).name) for r in records] == [
        ("case_00000", "segmentation.nii.gz"), ("case_00001", "segmentation.nii.gz")]
    kits21 = tree(tmp_path / "kits21", "case_00000/imaging.nii.gz", "case_00000/aggregated_MAJ_seg.nii.gz")
    assert index_dataset("kits21", kits21)[0]["label"].endswith("case_00000/aggregated_MAJ_seg.nii.gz")


def test_totalseg(tmp_path):
    root = tree(tmp_path, "s0000/ct.nii.gz", "s0000/segmentations/liver.nii.gz",
                "s0000/segmentations/spleen.nii.gz", "s0001/ct.nii.gz", "s0001/labels.nii.gz")
    (tmp_path / "meta.csv").write_text("image_id\n")
    records = index_dataset("totalsegmentator_v2", root)
    assert records == [
        {"image": str(root / "s0000/ct.nii.gz"), "segmentations": str(root / "s0000/segmentations"),
         "dataset": "totalsegmentator_v2", "case": "s0000"},
        {"image": str(root / "s0001/ct.nii.gz"), "label": str(root / "s0001/labels.nii.gz"),
         "dataset": "totalsegmentator_v2", "case": "s0001"},
    ]
    nifti(root / "s0002/ct.nii.gz")
    with pytest.raises(LayoutError, match=r"s0002/ct\.nii\.gz has no label.*s0002/segmentations"):
        index_dataset("totalsegmentator_v2", root)


def test_wrong_layout_says_what_it_expected(tmp_path):
    root = tree(tmp_path, "imagesTr/img0001.nii.gz", "labelsTr/img0001.nii.gz")
    with pytest.raises(LayoutError, match=rf"btcv: no image found; expected layout 'pairs'.*img/img\*\.nii\.gz"
                                          rf".*under {tmp_path}"):
        index_dataset("btcv", root)
    with pytest.raises(LayoutError, match=rf"folder {tmp_path}/other/imagesTr does not exist.*'msd'"):
        tree(tmp_path / "other", "x.nii.gz")
        index_dataset("msd_task09_spleen", tmp_path / "other")
    with pytest.raises(LayoutError, match=r"folder .*missing does not exist.*'kits'"):
        index_dataset("kits19", tmp_path / "missing")


def test_yaml_dataset(tmp_path):
    labelmap = tmp_path / "phantom" / "phantom.yaml"
    labelmap.parent.mkdir()
    labelmap.write_text("name: phantom\nsource: generated\nlabel_count: 1\nlayout: {kind: msd}\nlabels:\n  1: liver\n")
    tree(labelmap.parent, "imagesTr/p0.nii.gz", "labelsTr/p0.nii.gz")
    (record,) = index_dataset(str(labelmap), labelmap.parent)
    assert record["dataset"] == str(labelmap) and record["case"] == "p0"


def test_main_writes_atomically_and_refuses_to_overwrite(tmp_path, capsys):
    root = tree(tmp_path / "Task09_Spleen", "imagesTr/spleen_2.nii.gz", "labelsTr/spleen_2.nii.gz")
    out = tmp_path / "lists" / "spleen.jsonl"
    assert main(["msd_task09_spleen", str(root), "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [{"image": str(root / "imagesTr/spleen_2.nii.gz"), "label": str(root / "labelsTr/spleen_2.nii.gz"),
                      "dataset": "msd_task09_spleen", "case": "spleen_2"}]
    assert "wrote 1 cases" in capsys.readouterr().out
    out.write_text("keep\n")
    assert main(["msd_task09_spleen", str(root), "-o", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep\n"
    assert main(["msd_task09_spleen", str(root), "-o", str(out), "--overwrite"]) == 0
    assert out.read_text().count("\n") == 1
    assert os.listdir(out.parent) == ["spleen.jsonl"]
    assert main(["btcv", str(root), "-o", str(tmp_path / "btcv.jsonl")]) == 1
    assert "expected layout 'pairs'" in capsys.readouterr().err and not (tmp_path / "btcv.jsonl").exists()
