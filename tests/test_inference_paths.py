"""Validation, ``predict`` and ``segment`` see the same input and give the same probabilities.

Each path loads the same NIfTI its own way: validation through CTDataModule's val loader (MONAI
LoadImaged + the preprocessing transforms + targets), predict through its ScanDataset, segment
through read_scan and the checkpoint's recorded preprocessing. The scan is anisotropic and
stored left-right and anterior-posterior flipped, so orientation and resampling both matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from clipseg3d.cli.segment import build_parser, load_segmenter
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.data.scans import Scan, read_scan
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.models.checkpoint import CHECKPOINT_KEY
from clipseg3d.training.task import UniversalSegmentation

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ["liver", "spleen", "pancreas"]
SHAPE = (40, 36, 30)
VOXEL_MM = (1.2, 0.9, 2.5)
MODEL_SPACING_MM = (1.5, 1.5, 1.5)
ROI = (16, 16, 16)
# Where the three paths may differ: float16 logits (spacing 2^-11 near 1) through a sigmoid.
PROBABILITY_TOLERANCE = 1e-3




def write_tiny_scan(folder: Path) -> dict[str, Path]:
    """A 40x36x30 CT (1.2 x 0.9 x 2.5 mm, LPS-flipped axes), soft tissue everywhere (so the
    validation loader's foreground crop keeps it whole), two organs, its label file and manifest."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32) for size in SHAPE], indexing="ij"))
    volume = 40.0 + rng.normal(0.0, 20.0, SHAPE)
    label = np.zeros(SHAPE, np.int16)
    for value, centre, radius, hu in ((1, (12, 14, 15), 9.0, 110.0), (3, (30, 24, 12), 6.0, -60.0)):
        inside = (((grid - np.array(centre)[:, None, None, None]) * np.array(VOXEL_MM)[:, None, None, None]) ** 2
                  ).sum(0) <= (radius * 1.5) ** 2
        volume[inside] += hu
        label[inside] = value
    volume[:, :, 20:] += np.linspace(0.0, 300.0, SHAPE[1])[None, :, None]  # beyond the HU window: clipped
    affine = np.diag([-VOXEL_MM[0], -VOXEL_MM[1], VOXEL_MM[2], 1.0])
    affine[:3, 3] = (30.0, 20.0, -40.0)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "label.nii.gz")
    record = {"image": "ct.nii.gz", "label": "label.nii.gz", "dataset": "abdomenct1k", "case": "ct"}
    (folder / "val.jsonl").write_text(json.dumps(record) + "\n")
    return {"image": folder / "ct.nii.gz", "manifest": folder / "val.jsonl"}


def random_task() -> UniversalSegmentation:
    """Random weights, moved away from their initial values so every class gives its own map."""
    torch.manual_seed(0)
    backbone = UNetBackbone(channels=(8, 16, 32), strides=(2, 2), out_channels=16, num_res_units=1)
    task = UniversalSegmentation(classes=CLASSES, backbone=backbone, head_hidden=32, roi_size=ROI, sw_overlap=0.5)
    with torch.no_grad():
        for param in task.model.head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return task.eval()


def save_checkpoint(task: UniversalSegmentation, preprocessing: Preprocessing, path: Path) -> Path:
    """The task's weights with the metadata training records (classes, preprocessing, window)."""
    meta = task.model.metadata()
    meta["preprocessing"] = {"roi_size": list(ROI), "sw_overlap": 0.5, **preprocessing.to_dict()}
    torch.save({"state_dict": task.state_dict(), CHECKPOINT_KEY: meta}, path)
    return path


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_scan(tmp_path_factory.mktemp("scan"))


@pytest.fixture(scope="module")
def data(tiny_scan) -> CTDataModule:
    return CTDataModule(val_manifests=[str(tiny_scan["manifest"])], classes=CLASSES, spacing=MODEL_SPACING_MM,
                        crop_size=ROI, predict_inputs=[str(tiny_scan["image"])])


@pytest.fixture(scope="module")
def task() -> UniversalSegmentation:
    return random_task()


@pytest.fixture(scope="module")
def tiny_checkpoint(task, data, tmp_path_factory) -> Path:
    return save_checkpoint(task, data.preprocessing, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")


def test_preprocessing_transforms_and_call_give_the_same_image(tiny_scan):
    preprocessing = Preprocessing(MODEL_SPACING_MM)
    loaded = Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
                      *preprocessing.transforms("image")])({"image": str(tiny_scan["image"])})["image"]
    image, grid = preprocessing(read_scan(tiny_scan["image"]))
    assert image.dtype == torch.float32 and tuple(image.shape[1:]) == grid.shape == (32, 22, 49)
    torch.testing.assert_close(image, loaded.as_tensor().float(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grid.affine, loaded.affine.numpy(), rtol=1e-6, atol=1e-6 * 40)
    assert 0.0 <= float(image.min()) and float(image.max()) == 1.0  # clipped to the window


def test_preprocessing_reads_old_checkpoint_records():
    old = {"roi_size": [96, 96, 96], "sw_overlap": 0.5}
    assert Preprocessing.from_dict(old) == Preprocessing(None)
    recorded = Preprocessing((1.5, 1.5, 2.0), (-100.0, 200.0))
    assert Preprocessing.from_dict({**old, **recorded.to_dict()}) == recorded
    assert recorded.to_dict() == {"spacing": [1.5, 1.5, 2.0], "hu_window": [-100.0, 200.0], "orientation": "RAS",
                                  "foreground_margin": None}
    boxed = Preprocessing((1.5, 1.5, 2.0), foreground_margin=4)
    assert Preprocessing.from_dict({**old, **boxed.to_dict()}) == boxed


def test_inference_sees_the_body_box_that_training_crops_from():
    array = np.full((30, 28, 20), -1000.0, dtype=np.float32)
    array[8:20, 5:15, 4:12] = 40.0  # the body
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    scan = Scan(array=array, affine=affine, path=Path("body.nii.gz"), kind="nifti")
    image, grid = Preprocessing(None, foreground_margin=2)(scan)
    assert tuple(image.shape[1:]) == (16, 14, 12) and float(image.min()) == 0.0
    whole, whole_grid = Preprocessing(None)(scan)
    assert tuple(whole.shape[1:]) == scan.shape
    # the box is the whole scan's grid cropped: the same voxels, and the way back reaches every scan voxel
    ras = np.flip(array, axis=0)
    box = ras[8:24, 3:17, 2:14]
    torch.testing.assert_close(image[0], torch.from_numpy(np.clip((box + 175.0) / 425.0, 0, 1).copy()))
    back = grid.to_scan(image[0])
    assert tuple(back.shape) == scan.shape
    torch.testing.assert_close(back[8:20, 5:15, 4:12], torch.full((12, 10, 8), 215.0 / 425.0))


def test_validation_predict_and_segment_give_the_same_probabilities(tiny_scan, data, task, tiny_checkpoint,
                                                                    tmp_path):
    data.setup("validate")
    (val_batch,) = list(data.val_dataloader())
    (predict_batch,) = list(data.predict_dataloader())
    with torch.no_grad():
        validation = [logits.float().sigmoid() for logits in task.infer_logits(val_batch["image"])]
        (predicted,) = task.predict_step(predict_batch, 0)
    args = build_parser().parse_args([str(tiny_scan["image"]), "--ckpt", str(tiny_checkpoint), "-o",
                                      str(tmp_path / "out"), "--device", "cpu"])
    segmented, grid = load_segmenter(args).probabilities(read_scan(tiny_scan["image"]))
    assert predict_batch["grid"][0].shape == grid.shape == tuple(val_batch["image"].shape[2:])
    np.testing.assert_allclose(predict_batch["grid"][0].affine, grid.affine, rtol=1e-6, atol=1e-6 * 40)
    assert len(validation) == len(predicted) == len(segmented) == len(CLASSES)
    for k, name in enumerate(CLASSES):
        assert predicted[k].dtype == segmented[k].dtype == torch.float16
        reference = segmented[k].float()
        assert float(reference.max() - reference.min()) > 0.05, f"{name}: a flat map would prove nothing"
        torch.testing.assert_close(validation[k], reference, rtol=0, atol=PROBABILITY_TOLERANCE)
        torch.testing.assert_close(predicted[k].float(), reference, rtol=0, atol=PROBABILITY_TOLERANCE)
