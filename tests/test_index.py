"""``clipseg3d index`` on tiny fake dataset trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from clipseg3d.cli.index import main
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.index import LayoutError, index_dataset, write_manifest
from clipseg3d.data.label_readers import read_slice_masks
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.scans import read_scan
from clipseg3d.data.targets import LabelMapError


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


def test_pairs_lits_ct_org_abdomenct1k(tmp_path):
    lits = tree(tmp_path / "lits", "Training Batch 1/volume-0.nii", "Training Batch 1/segmentation-0.nii",
                "Training Batch 1/volume-1.nii", "Training Batch 1/segmentation-1.nii",
                "Training Batch 2/volume-10.nii", "Training Batch 2/segmentation-10.nii")
    assert [(r["case"], Path(r["label"]).name) for r in index_dataset("lits", lits)] == [
        ("0", "segmentation-0.nii"), ("1", "segmentation-1.nii"), ("10", "segmentation-10.nii")]
    ct_org = tree(tmp_path / "ct_org", "OrganSegmentations/volume-0.nii.gz", "OrganSegmentations/labels-0.nii.gz",
                  "OrganSegmentations/volume-139.nii.gz", "OrganSegmentations/labels-139.nii.gz")
    assert [(r["case"], Path(r["image"]).name, Path(r["label"]).name) for r in index_dataset("ct_org", ct_org)] == [
        ("0", "volume-0.nii.gz", "labels-0.nii.gz"), ("139", "volume-139.nii.gz", "labels-139.nii.gz")]
    abdomen = tree(tmp_path / "abdomenct1k", "Image/Case_00001_0000.nii.gz", "Mask/Case_00001.nii.gz",
                   "Image/Case_01062_0000.nii.gz", "Mask/Case_01062.nii.gz")
    records = index_dataset("abdomenct1k", abdomen)
    assert [(r["case"], r["image"], r["label"]) for r in records] == [
        (case, str(abdomen / f"Image/Case_{case}_0000.nii.gz"), str(abdomen / f"Mask/Case_{case}.nii.gz"))
        for case in ("00001", "01062")]


# -- datasets published as DICOM series ------------------------------------------------------------
ROWS, COLUMNS, SLICES = 6, 5, 12
#: Patient CT: air in row 0, body at 40 HU, liver 100 HU (slices 2-5, rows 1-3, columns 2-4), tumour 200 HU in it.
BODY = np.full((SLICES, ROWS, COLUMNS), 40, np.int16)
BODY[:, 0] = -1000
BODY[2:6, 1:4, 2:5] = 100
BODY[4, 2, 3:5] = 200


def write_dicom(folder: Path, volume: np.ndarray, name=lambda k: f"image_{k}", step: float = 2.0) -> Path:
    """``volume`` ([slice, row, column], int16) as one DICOM series, slice k at z = step * k."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k, plane in enumerate(volume):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = study, series, "CT", k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-10.0, -20.0, step * k], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept = [0.8, 0.7], abs(step), 1, 0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ROWS, COLUMNS, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / name(k), enforce_file_format=True)
    return folder


def loaded(manifest: list[dict], tmp_path: Path, classes: list[str]) -> dict:
    """The first record as the DataModule's validation pipeline gives it, at the scans' own spacing."""
    path = tmp_path / "manifest.jsonl"
    write_manifest(manifest, path, overwrite=True)
    data = CTDataModule(val_manifests=[str(path)], classes=classes, spacing=(0.7, 0.8, 2.0), crop_size=(2, 2, 2))
    data.setup("fit")
    return data.val_sets[0][0]


def assert_on_the_image(sample: dict, hu: set[int], channel: int = 0) -> None:
    """The target channel is set exactly where the windowed image holds one of the ``hu`` values."""
    image, target = sample["image"][0], sample["target"][channel].bool()
    expected = torch.zeros_like(target)
    for value in hu:
        expected |= torch.isclose(image, torch.tensor((value + 175) / 425))
    assert tuple(image.shape) == (COLUMNS, ROWS, SLICES) and expected.any() and torch.equal(target, expected)


def test_nih_pancreas_dicom_series_with_nifti_labels(tmp_path):
    series = tmp_path / "manifest-1599750808610/Pancreas-CT/PANCREAS_0001/11-24-2015-PANCREAS0001-Pancreas-18957"
    image = write_dicom(series / "Pancreas-99667", BODY, name=lambda k: f"1-{k + 1:03d}.dcm")
    write_dicom(tmp_path / "manifest-1599750808610/Pancreas-CT/PANCREAS_0002/study/series", BODY)
    scan = read_scan(image)
    labels = tmp_path / "TCIA_pancreas_labels-02-05-2017"
    labels.mkdir()
    nib.save(nib.Nifti1Image((scan.array == 100).astype(np.uint8), scan.affine), labels / "label0001.nii.gz")
    (record,) = index_dataset("nih_pancreas", tmp_path, skip_unlabelled=True)
    assert record == {"image": str(image), "label": str(labels / "label0001.nii.gz"), "dataset": "nih_pancreas",
                      "case": "0001"}
    assert_on_the_image(loaded([record], tmp_path, ["pancreas"]), {100})


def write_chaos_case(case: Path) -> None:
    """Slices named in the order opposite to their positions; masks named as CHAOS names them."""
    write_dicom(case / "DICOM_anon", BODY[::-1], name=lambda k: f"i{k:04d},0000b.dcm", step=-2.0)
    (case / "Ground").mkdir()
    for k, plane in enumerate(BODY[::-1]):
        Image.fromarray(np.where(plane >= 100, 255, 0).astype(np.uint8)).save(case / "Ground" / f"liver_GT_{k:03d}.png")


def test_chaos_ct_dicom_series_with_png_slice_masks(tmp_path):
    for case in ("1", "10"):
        write_chaos_case(tmp_path / "Train_Sets/CT" / case)
    write_dicom(tmp_path / "Train_Sets/MR/2/T2SPIR/DICOM_anon", BODY)
    records = index_dataset("chaos_ct", tmp_path)
    assert [(r["case"], r["image"], r["slices"]) for r in records] == [
        (case, str(tmp_path / f"Train_Sets/CT/{case}/DICOM_anon"), str(tmp_path / f"Train_Sets/CT/{case}/Ground"))
        for case in ("1", "10")]
    assert_on_the_image(loaded(records, tmp_path, ["liver"]), {100, 200})
    case = tmp_path / "Train_Sets/CT/10"
    (case / "Ground/liver_GT_011.png").unlink()
    with pytest.raises(LabelMapError, match=r"Ground: 11 PNG masks for the 12 slices of .*10/DICOM_anon"):
        read_slice_masks(LabelMap.load("chaos_ct"), case / "Ground", case / "DICOM_anon")
    Image.fromarray(np.full((ROWS, COLUMNS), 128, np.uint8)).save(case / "Ground/liver_GT_011.png")
    with pytest.raises(LabelMapError, match=r"liver_GT_011\.png: grey value\(s\) \[128\] are not in layout"):
        read_slice_masks(LabelMap.load("chaos_ct"), case / "Ground", case / "DICOM_anon")


def test_ircadb_dicom_series_with_dicom_structure_masks(tmp_path):
    patient = tmp_path / "3Dircadb1" / "3Dircadb1.1"
    write_dicom(patient / "PATIENT_DICOM", BODY)
    (patient / "PATIENT_DICOM.zip").write_bytes(b"PK")
    for structure, mask in {"liver": BODY >= 100, "livertumor01": BODY == 200, "portalvein": BODY == 40}.items():
        write_dicom(patient / "MASKS_DICOM" / structure, mask.astype(np.int16) * 255)
    write_dicom(tmp_path / "3Dircadb1" / "3Dircadb1.2" / "PATIENT_DICOM", BODY)
    with pytest.raises(LayoutError, match=r"3Dircadb1\.2/PATIENT_DICOM has no label.*3Dircadb1\.2/MASKS_DICOM"):
        index_dataset("ircadb", tmp_path)
    (record,) = index_dataset("ircadb", tmp_path, skip_unlabelled=True)
    assert record == {"image": str(patient / "PATIENT_DICOM"), "segmentations": str(patient / "MASKS_DICOM"),
                      "dataset": "ircadb", "case": "3Dircadb1.1"}
    sample = loaded([record], tmp_path, ["liver", "liver_tumor"])
    assert sample["labelled"].tolist() == [True, True]
    assert_on_the_image(sample, {100, 200}, channel=0)
    assert_on_the_image(sample, {200}, channel=1)


def test_an_image_folder_without_dicom_files_is_refused(tmp_path):
    write_chaos_case(tmp_path / "Train_Sets/CT/1")
    for path in (tmp_path / "Train_Sets/CT/1/DICOM_anon").iterdir():
        path.write_bytes(b"not DICOM")
    with pytest.raises(LayoutError, match=r"image folder .*CT/1/DICOM_anon holds no DICOM series files"):
        index_dataset("chaos_ct", tmp_path)
