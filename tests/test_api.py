"""The Python API: ``import clipseg3d`` stays light, and ``clipseg3d.segment`` returns what
``clipseg3d segment`` writes for the same scan and checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import clipseg3d
from clipseg3d.cli.segment import main as segment_main
from clipseg3d.data.scans import read_scan
from test_inference_paths import CLASSES, MODEL_SPACING_MM, random_task, save_checkpoint, write_tiny_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_import_is_light_and_names_resolve_lazily():
    probe = ("import sys, clipseg3d; heavy = [m for m in ('torch', 'monai', 'lightning') if m in sys.modules]; "
             "print(heavy, sorted(clipseg3d.__all__))")
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert output.split("] ")[0] == "[" and "'segment'" in output
    from clipseg3d.data.preprocess import Preprocessing
    from clipseg3d.inference.sliding_window import StreamingInferer

    assert clipseg3d.Preprocessing is Preprocessing and clipseg3d.StreamingInferer is StreamingInferer
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        clipseg3d.nothing  # noqa: B018




@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_scan(tmp_path_factory.mktemp("scan"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    return save_checkpoint(random_task(), clipseg3d.Preprocessing(MODEL_SPACING_MM), path)


@pytest.fixture(scope="module")
def threshold(tiny_checkpoint, tiny_scan) -> float:
    """The median of each voxel's highest class probability, so the label map is neither empty nor full."""
    model = clipseg3d.load_model(tiny_checkpoint)
    scan = read_scan(tiny_scan["image"])
    result = clipseg3d.segment(scan.array, scan.affine, model, threshold=1.0)
    return float(np.median(np.max([p.astype(np.float32) for p in result.probabilities.values()], axis=0)))


def test_segment_returns_what_the_command_writes(tiny_checkpoint, tiny_scan, threshold, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = segment_main([str(tiny_scan["image"]), "--ckpt", str(tiny_checkpoint), "-o", str(tmp_path),
                             "--threshold", str(threshold), "--all-masks", "--probabilities", "--no-overlay"])
    assert code == 0, err.getvalue()
    folder = tmp_path / "ct"
    model = clipseg3d.load_model(tiny_checkpoint)
    assert not model.network.training and model.settings.preprocessing.spacing == (1.5, 1.5, 1.5)
    scan = read_scan(tiny_scan["image"])
    result = clipseg3d.segment(scan.array, scan.affine, model, threshold=threshold)
    assert result.class_names == CLASSES == list(json.loads((folder / "classes.json").read_text()).values())
    np.testing.assert_array_equal(result.label_map, np.asarray(nib.load(folder / "labels.nii.gz").dataobj))
    for name in CLASSES:
        written = np.asarray(nib.load(folder / "masks" / f"{name}.nii.gz").dataobj).astype(bool)
        assert result.masks[name].dtype == bool and result.masks[name].shape == scan.shape
        np.testing.assert_array_equal(result.masks[name], written)
        stored = nib.load(folder / "probabilities" / f"{name}.nii.gz").get_fdata()  # uint8 steps of 1/255
        probability = result.probabilities[name].astype(np.float32)
        np.testing.assert_allclose(probability, stored, rtol=0, atol=0.5 / 255 + 1e-3)
    assert 0 < np.count_nonzero(result.label_map) < result.label_map.size


def test_segment_narrows_the_classes_and_checks_its_inputs(tiny_checkpoint, tiny_scan):
    model = clipseg3d.load_model(tiny_checkpoint)
    scan = read_scan(tiny_scan["image"])
    result = clipseg3d.segment(scan.array, scan.affine, model, classes=["Spleen", "liver"], roi_size=(16, 16, 16))
    assert result.class_names == ["liver", "spleen"] and sorted(result.masks) == ["liver", "spleen"]
    assert result.label_map.max() <= 2
    with pytest.raises(ValueError, match="3-D image and a 4x4 affine"):
        clipseg3d.segment(scan.array[0], scan.affine, model)
    bare = clipseg3d.UniversalModel.from_metadata(torch.load(tiny_checkpoint, weights_only=True)["clipseg3d"])
    with pytest.raises(TypeError, match="a model from clipseg3d.load_model"):
        clipseg3d.segment(scan.array, scan.affine, bare)
