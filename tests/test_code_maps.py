"""Cached int16 class-code maps give, bit for bit, what the dense K-channel targets gave: crops,
crop centres, validation targets and Dice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data.utils import set_rnd
from monai.transforms import (
    ClassesToIndicesd,
)
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dense_targets import DenseTargetsDataModule  # noqa: E402

from clipseg3d.data.code_maps import class_indices, targets_from_codes
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.targets import build_code_map, build_targets
from clipseg3d.files import load_torch_data
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.training.task import UniversalSegmentation

CLASSES = ["spleen", "right_kidney", "left_kidney", "liver", "kidney_tumor", "liver_tumor"]
SHAPE = (20, 12, 6)  # the last axis is padded up to the crop
CROP = (8, 8, 8)


# -- tiny cases of every label form ------------------------------------------------------------
def body() -> np.ndarray:
    image = np.full(SHAPE, -1000, np.int16)
    image[1:19, 1:11] = 40
    return image


def kidneys() -> np.ndarray:
    """Merged kidney (1) on both sides of the body, a tumour (2) in each: paired tumour parents."""
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 3:8, 1:5] = 1
    label[13:18, 4:9, 1:5] = 1
    label[3, 4, 2] = label[15:17, 5, 2:4] = 2
    return label


def liver() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[4:15, 2:10, 1:5] = 1
    label[8:11, 4:7, 2:4] = 2  # tumour inside the liver: liver too
    return label


def save(volume: np.ndarray, path, affine=np.eye(4)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)
    return str(path)


def write_dicom(folder, volume: np.ndarray) -> str:
    """``volume`` ([slice, row, column]) as a DICOM series of 1 mm voxels."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for k, plane in enumerate(volume):
        ds = DicomDataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.InstanceNumber = CTImageStorage, generate_uid(), "CT", k + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k)], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept = [1.0, 1.0], 1.0, 1, 0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *plane.shape, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = plane.astype(np.int16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return str(folder)


def manifest(folder, records: list[dict]) -> str:
    path = folder / f"{records[0]['dataset']}.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("forms")
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    kits = [{"image": save(body(), root / f"kits{i}" / "ct.nii.gz", las), "dataset": "kits19", "case": f"k{i}",
             "label": save(np.roll(kidneys(), i, axis=1), root / f"kits{i}" / "label.nii.gz", las)} for i in range(2)]
    lits = [{"image": save(body(), root / "lits" / "ct.nii.gz"), "label": save(liver(), root / "lits" / "seg.nii.gz"),
             "dataset": "lits", "case": "l0"}]
    masks = root / "total" / "segmentations"
    for name, volume in {"spleen": liver() == 2, "kidney_right": kidneys() == 1, "liver": liver() > 0}.items():
        save(volume.astype(np.uint8), masks / f"{name}.nii.gz")  # overlapping masks
    total = [{"image": save(body(), root / "total" / "ct.nii.gz"), "segmentations": str(masks),
              "dataset": "totalsegmentator_v2", "case": "t0"}]
    slices = root / "chaos" / "Ground"
    slices.mkdir(parents=True)
    planes = np.moveaxis(liver() > 0, 2, 0)  # [slice, row, column] of a series along the last axis
    for k, plane in enumerate(planes):
        Image.fromarray(np.where(plane, 255, 0).astype(np.uint8)).save(slices / f"liver_GT_{k:03d}.png")
    chaos = [{"image": write_dicom(root / "chaos" / "DICOM_anon", np.moveaxis(body(), 2, 0)), "slices": str(slices),
              "dataset": "chaos_ct", "case": "c0"}]
    return [manifest(root, records) for records in (kits, lits, total, chaos)]


def datamodules(**kwargs) -> tuple[CTDataModule, CTDataModule]:
    settings = dict(classes=CLASSES, spacing=(1.0, 1.0, 1.0), crop_size=CROP, samples_per_volume=2,
                    max_crop_centres=40, positive_fraction=0.8, cache="memory", **kwargs)
    modules = CTDataModule(**settings), DenseTargetsDataModule(**settings)
    for module in modules:
        module.setup("fit")
    return modules


# -- the code map itself ---------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "volume", "with_image"), [("kits19", kidneys, True), ("kits19", kidneys, False),
                                                            ("lits", liver, True), ("btcv", liver, False)])
def test_code_map_holds_the_dense_targets(name, volume, with_image):
    label_map, affine = LabelMap.load(name), np.diag([-1.5, 1.0, 2.0, 1.0])
    image = body() if with_image else None
    targets, labelled, report = build_targets(label_map, volume(), affine, CLASSES, image=image)
    codes, table, code_labelled, code_report = build_code_map(label_map, volume(), affine, CLASSES, image=image)
    assert codes.dtype == np.int16 and codes.shape == SHAPE and table.dtype == np.uint8 and not table[0].any()
    assert np.array_equal(np.moveaxis(table[codes], -1, 0), targets) and targets.any(axis=(1, 2, 3)).sum() >= 2
    assert np.array_equal(code_labelled, labelled) and code_report == report
    if name == "kits19":  # the tumour counts for the kidney on its own side: the side bit is kept
        assert report["midline_x"] is not None and len(np.unique(codes[volume() == 2])) == 2


def test_class_indices_are_monais_on_the_dense_targets():
    label_map = LabelMap.load("kits19")
    targets, _, _ = build_targets(label_map, kidneys(), np.eye(4), CLASSES, image=body())
    codes, table, _, _ = build_code_map(label_map, kidneys(), np.eye(4), CLASSES, image=body())
    for most in (None, 7, 1):
        dense = ClassesToIndicesd(keys="target", num_classes=len(CLASSES), max_samples_per_class=most)(
            {"target": torch.from_numpy(targets)})["target_cls_indices"]
        found = class_indices(torch.from_numpy(codes)[None], torch.from_numpy(table), most)
        assert [len(i) for i in found] == [len(i) for i in dense] and sum(len(i) for i in found) > 0
        assert all(torch.equal(a, torch.as_tensor(b)) and a.dtype == torch.int64 for a, b in zip(found, dense))


# -- through the DataModule, for every label form --------------------------------------------------
def test_cached_items_hold_codes_and_crop_centres_only(manifests):
    codes_module, dense_module = datamodules(manifests=manifests, val_fraction=0.0)
    for name, (dataset, _) in codes_module.train_sets.items():
        cached, dense = dataset.data[0], dense_module.train_sets[name][0].data[0]
        arrays = {key: (value.dtype, tuple(value.shape)) for key, value in cached.items()
                  if isinstance(value, torch.Tensor)}
        size = tuple(cached["image"].shape[1:])
        assert arrays == {"image": (torch.float32, (1, *size)), "codes": (torch.int16, (1, *size)),
                          "code_table": (torch.uint8, (cached["code_table"].shape[0], len(CLASSES))),
                          "labelled": (torch.bool, (len(CLASSES),))}, name
        assert cached["codes"].nbytes == 2 * np.prod(size)
        assert torch.equal(cached["image"], dense["image"]) and torch.equal(cached["labelled"], dense["labelled"])
        assert torch.equal(targets_from_codes(cached["codes"], cached["code_table"]), dense["target"]), name
        assert dense["target"].any(), name
        indices = cached["class_indices"]
        assert len(indices) == len(CLASSES) and all(i.dtype == torch.int64 for i in indices)
        assert all(torch.equal(a, torch.as_tensor(b)) for a, b in zip(indices, dense["target_cls_indices"])), name


def test_training_crops_are_the_dense_ones_bit_for_bit(manifests):
    codes_module, dense_module = datamodules(manifests=manifests, val_fraction=0.0)
    for name, (dataset, count) in codes_module.train_sets.items():
        dense = dense_module.train_sets[name][0]
        set_rnd(dataset, seed=3)
        set_rnd(dense, seed=3)
        labelled_voxels = 0
        for draw in range(6):
            for ours, theirs in zip(dataset[draw % count], dense[draw % count], strict=True):
                assert set(ours) == set(theirs) and ours["target"].dtype == torch.uint8
                assert ours["target"].shape == (len(CLASSES), *CROP)
                for key in ("image", "target", "labelled"):
                    assert torch.equal(ours[key], theirs[key]), (name, draw, key)
                labelled_voxels += int(ours["target"].sum())
        assert labelled_voxels > 0, name


def test_validation_gives_the_dense_targets_and_dice(manifests, tmp_path):
    codes_module, dense_module = datamodules(val_manifests=manifests)
    for ours, theirs in zip(codes_module.val_sets, dense_module.val_sets, strict=True):
        assert "target" not in ours.data[0] and "codes" in ours.data[0]
        assert torch.equal(ours[0]["target"], theirs[0]["target"])
    scores = []
    for module in (codes_module, dense_module):
        L.seed_everything(0)
        model = UniversalSegmentation(classes=CLASSES, roi_size=CROP, head_hidden=16, backbone=UNetBackbone(
            channels=(8, 16, 32), strides=(2, 2), out_channels=8, num_res_units=0))
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        scores.append(trainer.validate(model, module, verbose=False)[0])
    assert scores[0] == scores[1] and scores[0]["val/dice_mean"] > 0
    assert {"val/dice/right_kidney", "val/dice/liver", "val/dice/liver_tumor"} <= set(scores[0])


def test_disk_cache_holds_codes(manifests, tmp_path):
    module = CTDataModule(manifests=manifests[:1], classes=CLASSES, spacing=(1.0, 1.0, 1.0), crop_size=CROP,
                          cache="disk", cache_dir=str(tmp_path / "cache"), val_fraction=0.5)
    module.setup("fit")
    (dataset, _), = module.train_sets.values()
    crops = dataset[0]
    files = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1 and all(crop["target"].shape == (len(CLASSES), *CROP) for crop in crops)
    cached = load_torch_data(files[0])
    assert "target" not in cached and cached["codes"].dtype == torch.int16 and len(cached["class_indices"]) == 6
