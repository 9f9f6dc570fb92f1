"""``clipseg3d segment --ckpt FILE.pth``: a released weight file imported in memory, as
``clipseg3d import-weights`` imports it (synthetic files, see tests/test_import_weights.py)."""

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from clipseg3d.inference.outputs import read_record
from test_import_weights import (
    imported_notes,
    run,
    save_release,
    synthetic_state,
    two_threads,
    unet_ckpt,
    unet_release,
)

__all__ = ["two_threads", "unet_ckpt", "unet_release"]  # fixtures shared with the import tests


def run_segment(argv: list) -> tuple[int, str]:
    """``clipseg3d segment ARGS`` in-process: exit status and stderr."""
    code, _, err = run(["segment", *argv])
    return code, err


def test_segment_runs_the_imported_weights_with_batched_windows(unet_ckpt, tmp_path):
    volume = np.random.default_rng(0).uniform(-200, 300, (56, 32, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / "ct.nii.gz")
    args = [tmp_path / "ct.nii.gz", "--ckpt", unet_ckpt, "--roi", "32", "32", "32", "--overlap", "0", "--no-overlay",
            "--probabilities", "--classes", "liver", "spleen"]
    runs = {}
    for batch in ("1", "2"):  # two windows along the first axis
        code, err = run_segment([*args, "-o", tmp_path / batch, "--sw-batch", batch])
        assert code == 0, err
        runs[batch] = nib.load(tmp_path / batch / "ct" / "probabilities" / "liver.nii.gz").get_fdata()
    assert runs["1"].shape == volume.shape
    assert np.abs(runs["1"] - runs["2"]).max() <= 1.0 / 255 + 1e-6  # one quantisation step at most


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    volume = np.random.default_rng(1).uniform(-200, 300, (32, 32, 32)).astype(np.float32)
    path = tmp_path_factory.mktemp("small-ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), path)
    return path


def test_segment_imports_a_released_file_on_the_fly_as_import_weights_does(unet_release, unet_ckpt, small_ct,
                                                                            tmp_path):
    source, _ = unet_release
    options = ["--roi", 32, 32, 32, "--overlap", 0, "--no-overlay", "--probabilities", "--classes", "liver", "spleen"]
    code, err = run_segment([small_ct, "--ckpt", source, "-o", tmp_path / "pth", *options])
    assert code == 0, err
    assert err.count("imported in memory") == 1 and len(imported_notes(source, err)) == 1
    code, err = run_segment([small_ct, "--ckpt", unet_ckpt, "-o", tmp_path / "ckpt", *options])
    assert code == 0 and "imported in memory" not in err, err
    for name in ("liver", "spleen"):  # the same model either way
        on_the_fly, saved = (nib.load(tmp_path / run / "ct" / "probabilities" / f"{name}.nii.gz").get_fdata()
                             for run in ("pth", "ckpt"))
        assert on_the_fly.shape == (32, 32, 32) and np.array_equal(on_the_fly, saved)
    record = read_record(tmp_path / "pth" / "ct")
    assert record["checkpoint_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    code, err = run_segment([small_ct, "--ckpt", source, "-o", tmp_path / "pth", *options])
    assert code == 0 and "skip: ct: already done" in err, err


def test_segment_passes_text_embeddings_to_the_import(unet_release, unet_ckpt, small_ct, tmp_path):
    _, state = unet_release
    source = save_release(tmp_path / "no-table.pth", {k: v for k, v in state.items() if k != "module.organ_embedding"})
    options = ["-o", tmp_path / "out", "--roi", 32, 32, 32, "--no-overlay", "--classes", "liver"]
    code, err = run_segment([small_ct, "--ckpt", source, *options])
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip().splitlines() == ["clipseg3d segment: error: the file has no organ_embedding table: pass "
                                        "--text-embeddings txt_encoding.pth"]
    torch.save(state["module.organ_embedding"].half(), tmp_path / "txt_encoding.pth")
    code, err = run_segment([small_ct, "--ckpt", source, "--text-embeddings", tmp_path / "txt_encoding.pth",
                             *options])
    assert code == 0 and len(imported_notes(source, err)) == 1, err
    code, err = run_segment([small_ct, "--ckpt", unet_ckpt, "--text-embeddings", tmp_path / "txt_encoding.pth",
                             "-o", tmp_path / "other"])
    assert code == 2 and "--text-embeddings applies to released weight files only" in err
    assert len(err.strip().splitlines()) == 1


def test_segment_names_a_file_that_is_neither_checkpoint_nor_released_weights(small_ct, tmp_path):
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pth")
    code, err = run_segment([small_ct, "--ckpt", tmp_path / "other.pth", "-o", tmp_path / "out"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip().splitlines() == [f"clipseg3d segment: error: {tmp_path / 'other.pth'}: neither a clipseg3d "
                                        "checkpoint nor released Universal Model / SuPreM weights (unknown weight "
                                        "layout: 1 key(s) match no released layout, first: layer.weight)"]


def test_segment_sends_a_file_of_another_class_count_to_import_weights(small_ct, tmp_path):
    source = save_release(tmp_path / "supervised_suprem_unet_2100.pth", synthetic_state("suprem_unet_25cls_expected"))
    code, err = run_segment([small_ct, "--ckpt", source, "-o", tmp_path / "out"])
    assert code == 2 and not (tmp_path / "out").exists()
    assert err.strip().splitlines() == [f"clipseg3d segment: error: {source}: the file has 25 classes, not the "
                                        "original 32; import it once with clipseg3d import-weights --class-names "
                                        "NAMES.yaml and segment with that checkpoint"]
