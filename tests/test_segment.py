"""``clipseg3d segment`` and the prediction writer, end to end on real scans with a briefly trained model."""

import contextlib
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose, Orientation, Spacing
from PIL import Image

from clipseg3d.catalog import ClassCatalog
from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.cli.segment import main, output_names
from clipseg3d.data.datamodule import FOREGROUND_MARGIN, CTDataModule
from clipseg3d.data.preprocess import ModelGrid, Preprocessing
from clipseg3d.data.scans import Scan, read_scan
from clipseg3d.inference.masks import nested_classes
from clipseg3d.inference.overlay import (
    GAP_PX,
    LEGEND_COLUMN_PX,
    LEGEND_ROW_PX,
    class_colour,
)
from clipseg3d.inference.pipeline import (
    CheckpointSettings,
    OutputSettings,
    model_grid_probabilities,
    write_scan_outputs,
)
from clipseg3d.inference.postprocess import class_depth
from clipseg3d.inference.sliding_window import StreamingInferer, flip_averaged
from clipseg3d.inference.writer import SegmentationWriter
from clipseg3d.models.checkpoint import load_model

from conftest import REPO, shared_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CT_SPACING_MM = [4.0, 4.0, 4.0]


def run_segment(args: list[str]) -> tuple[int, str]:
    """``clipseg3d segment ARGS`` in-process; returns the exit code and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    return code, err.getvalue()


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory) -> Path:
    """The tiny config trained for a few steps on generated volumes."""
    folder = tmp_path_factory.mktemp("train")
    cli = lightning_main(["--config", str(REPO / "experiments" / "tiny.yaml"), "--trainer.max_steps=20",
                          "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0",
                          f"--trainer.default_root_dir={folder}", "--trainer.enable_progress_bar=false",
                          "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false"], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    path = folder / "tiny.ckpt"
    cli.trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ct_checkpoint(synthetic_checkpoint, tmp_path_factory) -> Path:
    """The same weights with the preprocessing a CT-trained checkpoint records (coarse 4 mm keeps tests fast)."""
    checkpoint = torch.load(synthetic_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["clipseg3d"]["preprocessing"].update(spacing=CT_SPACING_MM, hu_window=[-175.0, 250.0],
                                                    orientation="RAS", foreground_margin=FOREGROUND_MARGIN)
    path = tmp_path_factory.mktemp("ckpt") / "ct.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def threshold(ct_checkpoint) -> float:
    """0.5, or lower where the barely trained model is less confident, so that some class is present."""
    model, meta = load_model(ct_checkpoint)
    recorded = CheckpointSettings.from_dict(meta["preprocessing"])
    assert recorded.preprocessing == Preprocessing(tuple(CT_SPACING_MM), (-175.0, 250.0),
                                                   foreground_margin=FOREGROUND_MARGIN)
    image, _ = recorded.preprocessing(read_scan(shared_data("totalseg-case") / "ct.nii.gz"))
    probabilities = model_grid_probabilities(model, image, model.class_names, StreamingInferer(recorded.roi_size))
    top = torch.stack(probabilities).float().amax(0)
    return float(min(0.5, torch.quantile(top.flatten(), 0.98)))


@pytest.fixture(scope="module")
def batch_run(ct_checkpoint, threshold, tmp_path_factory):
    """One run over the NIfTI case, the DICOM series and a corrupt file."""
    ct = shared_data("totalseg-case") / "ct.nii.gz"
    dicom = shared_data("dicom-liver-3slice")
    inputs = tmp_path_factory.mktemp("inputs")
    bad = inputs / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b this is not a NIfTI file")
    out = tmp_path_factory.mktemp("runs") / "out"
    code, stderr = run_segment([ct, dicom, bad, "--ckpt", ct_checkpoint, "-o", out, "--threshold", threshold,
                                "--probabilities", "--dicom-seg"])
    return {"code": code, "stderr": stderr, "out": out, "ct": ct, "dicom": dicom, "bad": bad}


# -- units ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0.5, 0.25])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_float16_streaming_aggregation_equals_monai_sliding_window(mode, overlap):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv3d(4, 5, 3, padding=1)).eval()

    def predictor(x):
        return 20 * net(x)

    image = torch.rand(1, 1, 40, 27, 13)  # the last side is smaller than the window: padded and cropped back
    with torch.no_grad():
        expected = SlidingWindowInferer((16, 16, 16), sw_batch_size=3, overlap=overlap, mode=mode)(image, predictor)
        streamed = StreamingInferer((16, 16, 16), overlap, sw_batch_size=2, mode=mode)(image, predictor)
    assert all(channel.dtype == torch.float16 for channel in streamed)
    result = torch.stack(streamed)[None].float()
    assert result.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 5
    torch.testing.assert_close(result, expected, rtol=2e-3, atol=2e-3 * scale)


def test_model_grid_back_to_scan_equals_monai_inverse():
    # an oblique-free but permuted and flipped voxel order, like many DICOM series
    affine = np.array([[-0.8, 0, 0, 10], [0, 0, -1.5, 20], [0, 0.7, 0, -5], [0, 0, 0, 1.0]])
    scan = Scan(array=np.random.default_rng(0).uniform(-500, 500, (31, 20, 17)).astype(np.float32), affine=affine,
                path=Path("scan.nii.gz"), kind="nifti")
    image, grid = Preprocessing((1.3, 1.1, 2.0))(scan)
    assert image.shape[1:] == grid.shape and float(image.min()) >= 0 and float(image.max()) <= 1
    spatial = Compose([Orientation(axcodes="RAS", labels=None),
                       Spacing(pixdim=(1.3, 1.1, 2.0), mode="bilinear", padding_mode="border", dtype=np.float32)])
    forward = spatial(MetaTensor(torch.from_numpy(scan.array)[None], affine=torch.as_tensor(affine)))
    np.testing.assert_allclose(grid.affine, forward.affine.numpy(), atol=1e-6)
    channel = torch.rand(grid.shape)
    expected = spatial.inverse(MetaTensor(channel[None], meta=forward.meta,
                                          applied_operations=[dict(op) for op in forward.applied_operations]))
    result = grid.to_scan(channel)
    assert result.shape == scan.shape
    torch.testing.assert_close(result, expected[0].as_tensor(), atol=1e-5, rtol=0)


def test_model_grid_box_back_to_scan_is_the_whole_volume_there():
    """On a permuted, flipped and resampled grid, each box's values are bit for bit the whole
    volume's, and no scan voxel outside the box reaches the box's threshold."""
    affine = np.array([[-0.8, 0, 0, 10], [0, 0, -1.5, 20], [0, 0.7, 0, -5], [0, 0, 0, 1.0]])
    scan = Scan(array=np.zeros((31, 20, 17), np.float32), affine=affine, path=Path("scan.nii.gz"), kind="nifti")
    _, grid = Preprocessing((1.3, 1.1, 2.0))(scan)
    channel = torch.rand(grid.shape, generator=torch.Generator().manual_seed(0)).half() * 0.5
    rng = np.random.default_rng(1)
    for _ in range(10):
        corner = [int(rng.integers(0, size)) for size in grid.shape]
        model_box = tuple(slice(start, int(rng.integers(start + 1, size + 1))) for start, size in zip(corner, grid.shape))
        raised = channel.clone()
        raised[model_box] += 0.5  # every voxel of the box above 0.5, every other one below
        part, box = grid.to_scan_box(raised, model_box)
        outside = grid.to_scan(raised)
        assert torch.equal(part, outside[box])
        outside[box] = 0
        assert float(outside.max()) < 0.5


def test_flip_averaging_leaves_the_left_right_axis_alone():
    def ramps(x):  # a window-position-dependent "model": channel d is the coordinate along spatial axis d
        grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32) for size in x.shape[2:]], indexing="ij")
        return torch.stack(grids)[None].expand(x.shape[0], -1, -1, -1, -1).clone()

    averaged = flip_averaged(ramps, (3, 4))(torch.zeros(1, 1, 4, 6, 8))
    torch.testing.assert_close(averaged[0, 0], ramps(torch.zeros(1, 1, 4, 6, 8))[0, 0])  # left-right kept
    torch.testing.assert_close(averaged[0, 1], torch.full((4, 6, 8), 2.5))  # mean of 0..5
    torch.testing.assert_close(averaged[0, 2], torch.full((4, 6, 8), 3.5))  # mean of 0..7


def test_output_names_disambiguate_clashing_scan_names():
    scans = [Path("/data/a/CT"), Path("/data/b/CT"), Path("/data/ct.nii.gz"), Path("/data/x/y.nii.gz")]
    assert output_names(scans) == ["a_CT", "b_CT", "ct", "y"]
    assert output_names([Path("/d/ct.nii"), Path("/d/ct.nii.gz")]) == ["ct", "ct_2"]  # no parent tells them apart


def test_depth_and_nesting_come_from_the_catalog_even_without_every_parent():
    catalog = ClassCatalog.builtin().subset(["right_kidney", "kidney_tumor", "liver", "spleen"])
    assert [class_depth(name, catalog) for name in catalog.names] == [0, 1, 0, 0]
    assert nested_classes(catalog.names, catalog) == ["right_kidney", "kidney_tumor"]
    assert nested_classes(["liver", "kidney_tumor"], catalog) == []


def test_model_grid_refuses_an_oblique_mapping():
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    grid = ModelGrid(affine=rotation, shape=(4, 4, 4), scan_affine=np.eye(4), scan_shape=(4, 4, 4))
    with pytest.raises(ValueError, match="axis-aligned"):
        grid.to_scan(torch.zeros(4, 4, 4))


def test_scan_outputs_resolve_overlaps_by_depth_and_keep_tumours_in_their_parent(tmp_path):
    catalog = ClassCatalog.builtin()
    names = ["liver", "stomach", "liver_tumor"]
    shape = (40, 30, 20)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    scan = Scan(array=np.zeros(shape, np.float32), affine=affine, path=tmp_path / "phantom.nii.gz", kind="nifti")
    grid = ModelGrid(affine=affine, shape=shape, scan_affine=affine, scan_shape=shape)
    liver, stomach, tumour = (torch.zeros(shape) for _ in names)
    liver[5:25, 5:25, 5:15] = 0.9
    stomach[20:35, 5:25, 5:15] = 0.8
    stomach[20:25, 5:10, 5:15] = 0.95  # here the stomach is more probable than the liver
    tumour[8:12, 8:12, 8:12] = 0.7
    report = write_scan_outputs(tmp_path / "out", scan, grid, [liver, stomach, tumour], names, catalog,
                                OutputSettings(overlay=False))
    labels = np.asarray(nib.load(tmp_path / "out" / "labels.nii.gz").dataobj)
    liver_mask = np.asarray(nib.load(tmp_path / "out" / "masks" / "liver.nii.gz").dataobj).astype(bool)
    expected_liver = np.zeros(shape, bool)
    expected_liver[5:25, 5:25, 5:15] = True
    expected_liver[20:25, 5:10, 5:15] = False
    np.testing.assert_array_equal(liver_mask, expected_liver)  # includes the tumour voxels
    assert np.count_nonzero(labels == 2) == 15 * 20 * 10 - 5 * 15 * 10  # stomach minus where the liver won
    assert np.count_nonzero(labels == 3) == 4 * 4 * 4
    assert np.count_nonzero(labels == 1) == expected_liver.sum() - 64
    assert sorted(path.name for path in (tmp_path / "out" / "masks").iterdir()) == ["liver.nii.gz",
                                                                                     "liver_tumor.nii.gz"]
    assert report["classes"]["liver"]["voxels"] == expected_liver.sum()
    # tumour probabilities are kept as uint8 0..255
    assert report["classes"]["liver_tumor"]["lesions"][0]["max_probability"] == pytest.approx(0.7, abs=1 / 255)


# -- end to end -----------------------------------------------------------------------------------
def _present(report: dict) -> list[str]:
    return [name for name, result in report["classes"].items() if result["present"]]


def test_bad_scan_is_reported_on_one_line_and_the_others_finish(batch_run):
    assert batch_run["code"] == 1
    errors = [line for line in batch_run["stderr"].splitlines() if "error:" in line]
    assert len(errors) == 2 and str(batch_run["bad"]) in errors[0], batch_run["stderr"]
    assert errors[1].endswith(f"error: 1 of 3 scans failed (listed above); 2 segmented, 0 already done; "
                              f"outputs in {batch_run['out']}")
    out = batch_run["out"]
    assert sorted(path.name for path in out.iterdir()) == ["ct", "dicom-liver-3slice"]  # no partial folders left


@pytest.mark.parametrize("scan_key", ["ct", "dicom"])
def test_outputs_share_the_input_grid_and_report_matches_them(batch_run, scan_key):
    source = read_scan(batch_run[scan_key])
    folder = batch_run["out"] / ("ct" if scan_key == "ct" else "dicom-liver-3slice")
    labels = nib.load(folder / "labels.nii.gz")
    assert labels.shape == source.shape
    np.testing.assert_allclose(labels.affine, source.affine, atol=1e-4)
    if scan_key == "ct":
        np.testing.assert_allclose(labels.affine, nib.load(batch_run["ct"]).affine, atol=1e-4)
    label_data = np.asarray(labels.dataobj)
    table = {int(key): name for key, name in json.loads((folder / "classes.json").read_text()).items()}
    report = json.loads((folder / "report.json").read_text())
    assert report["input"] == os.path.abspath(batch_run[scan_key]) and report["class_names"] == list(table.values())
    assert _present(report), "some class must be present at the chosen threshold"
    assert {path.stem.removesuffix(".nii") for path in (folder / "masks").iterdir()} == {"liver", "liver_tumor"}
    voxel_ml = float(np.prod(labels.header.get_zooms()[:3])) / 1000
    for label, name in table.items():
        mask_file = folder / "masks" / f"{name}.nii.gz"
        mask = np.asarray(nib.load(mask_file).dataobj) > 0 if mask_file.exists() else label_data == label
        assert report["classes"][name]["voxels"] == int(mask.sum()), name
        assert report["classes"][name]["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-5)
    for name in table.values():
        probability = nib.load(folder / "probabilities" / f"{name}.nii.gz")
        assert probability.get_data_dtype() == np.uint8 and probability.shape == source.shape
        values = probability.get_fdata()
        assert 0.0 <= values.min() and values.max() <= 1.0 + 1e-6  # 255 x the float32 slope 1/255
        if report["classes"][name]["present"]:
            assert values.max() >= report["settings"]["threshold"] - 1 / 255


@pytest.mark.parametrize("scan_key", ["ct", "dicom"])
def test_overlay_shows_the_present_classes_colours(batch_run, scan_key):
    folder = batch_run["out"] / ("ct" if scan_key == "ct" else "dicom-liver-3slice")
    report = json.loads((folder / "report.json").read_text())
    present = _present(report)
    pixels = np.asarray(Image.open(folder / "overlay.png").convert("RGB")).astype(int)
    legend_rows = -(-len(present) // max(1, pixels.shape[1] // LEGEND_COLUMN_PX))
    panels = pixels[: pixels.shape[0] - legend_rows * LEGEND_ROW_PX - GAP_PX]
    # grey CT pixels have equal channels; a blended mask pixel differs by 0.45 x its class colour's differences
    differences = np.stack([panels[..., 0] - panels[..., 1], panels[..., 1] - panels[..., 2]], -1)
    coloured = differences[np.abs(differences).max(-1) > 2]
    assert len(coloured) > 0
    expected = np.array([[0.45 * (colour[0] - colour[1]), 0.45 * (colour[1] - colour[2])]
                         for colour in (class_colour(report["classes"][name]["label"] - 1) for name in present)])
    distance = np.abs(coloured[:, None, :] - expected[None]).max(-1).min(-1)
    assert np.all(distance <= 2.0)


def test_dicom_series_gets_a_dicom_seg_of_the_present_classes(batch_run):
    folder = batch_run["out"] / "dicom-liver-3slice"
    report = json.loads((folder / "report.json").read_text())
    seg = pydicom.dcmread(folder / "seg.dcm")
    assert seg.Modality == "SEG"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == _present(report)
    assert not (batch_run["out"] / "ct" / "seg.dcm").exists()
    assert "not a DICOM series" in batch_run["stderr"]


def test_rerun_skips_finished_scans_and_overwrite_redoes_them(batch_run, ct_checkpoint, threshold):
    labels = batch_run["out"] / "ct" / "labels.nii.gz"
    before = labels.stat().st_mtime_ns
    args = [batch_run["ct"], "--ckpt", ct_checkpoint, "-o", batch_run["out"], "--threshold", threshold]
    code, stderr = run_segment(args)
    assert code == 0 and "0 segmented, 1 already done" in stderr
    assert labels.stat().st_mtime_ns == before
    code, stderr = run_segment(args + ["--overwrite", "--no-overlay"])
    assert code == 0 and "1 segmented" in stderr
    assert labels.stat().st_mtime_ns != before
    assert not (batch_run["out"] / "ct" / "overlay.png").exists()  # the folder was replaced as a whole


def test_output_folder_inside_an_input_folder_is_refused(tmp_path, ct_checkpoint):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    (inputs / "ct.nii.gz").symlink_to(shared_data("totalseg-case") / "ct.nii.gz")
    for out in (inputs / "segmentations", inputs):
        code, stderr = run_segment([inputs, "--ckpt", ct_checkpoint, "-o", out])
        assert code == 2 and "inside the input folder" in stderr
    assert sorted(path.name for path in inputs.iterdir()) == ["ct.nii.gz"]
    code, stderr = run_segment([inputs / "ct.nii.gz", "--ckpt", ct_checkpoint, "-o", tmp_path])
    assert code == 2 and "lies inside the output folder" in stderr


def test_classes_option_predicts_only_the_chosen_classes(tmp_path, ct_checkpoint, threshold):
    ct = shared_data("totalseg-case") / "ct.nii.gz"
    code, stderr = run_segment([ct, "--ckpt", ct_checkpoint, "-o", tmp_path / "out", "--classes", "Liver",
                                "liver tumor", "--all-masks", "--no-overlay", "--threshold", threshold])
    assert code == 0, stderr
    folder = tmp_path / "out" / "ct"
    assert json.loads((folder / "classes.json").read_text()) == {"1": "liver", "2": "liver_tumor"}
    assert sorted(path.name for path in (folder / "masks").iterdir()) == ["liver.nii.gz", "liver_tumor.nii.gz"]
    code, stderr = run_segment([ct, "--ckpt", ct_checkpoint, "-o", tmp_path / "other", "--classes", "heart"])
    assert code == 2 and "--classes: no class matches 'heart'" in stderr and not (tmp_path / "other").exists()


def test_prediction_writer_writes_what_segment_writes(tmp_path, ct_checkpoint, threshold):
    import lightning as L

    from clipseg3d.training.task import UniversalSegmentation

    ct = shared_data("totalseg-case") / "ct.nii.gz"
    code, stderr = run_segment([ct, "--ckpt", ct_checkpoint, "-o", tmp_path / "segment", "--no-overlay",
                                "--threshold", threshold])
    assert code == 0, stderr
    model, meta = load_model(ct_checkpoint)
    task = UniversalSegmentation.load_from_checkpoint(ct_checkpoint, map_location="cpu",
                                                      backbone=model.backbone)
    data = CTDataModule(classes=task.class_names, spacing=CT_SPACING_MM, predict_inputs=[str(ct)])
    assert data.preprocessing == CheckpointSettings.from_dict(meta["preprocessing"]).preprocessing
    writer = SegmentationWriter(str(tmp_path / "predict"), threshold=threshold, overlay=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[writer], enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(task, datamodule=data, return_predictions=False)
    written = np.asarray(nib.load(tmp_path / "predict" / "ct" / "labels.nii.gz").dataobj)
    expected = np.asarray(nib.load(tmp_path / "segment" / "ct" / "labels.nii.gz").dataobj)
    assert written.shape == expected.shape and np.count_nonzero(expected) > 0
    np.testing.assert_array_equal(written, expected)  # the same inferer and the same preprocessing
    report = json.loads((tmp_path / "predict" / "ct" / "report.json").read_text())
    assert report["class_names"] == task.class_names
