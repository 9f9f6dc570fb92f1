"""Checkpoints and configs of the earlier package layout still work: same segment outputs, old class paths."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import yaml

from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.cli.segment import main as segment_main

from conftest import REPO

LEGACY = REPO / "tests" / "data" / "legacy"


@pytest.mark.parametrize("name", ["base", "adapted"])
def test_a_legacy_checkpoint_segments_as_it_did(name, tmp_path):
    expected = LEGACY / f"{name}_segment"
    assert segment_main([str(LEGACY / "scan.nii.gz"), "--ckpt", str(LEGACY / f"{name}.ckpt"), "-o", str(tmp_path),
                         "--roi", "16", "16", "16", "--no-overlay", "--probabilities"]) == 0
    out = tmp_path / "scan"
    assert json.loads((out / "classes.json").read_text()) == json.loads((expected / "classes.json").read_text())
    labels = np.asarray(nib.load(out / "labels.nii.gz").dataobj)
    assert np.array_equal(labels, np.asarray(nib.load(expected / "labels.nii.gz").dataobj))
    assert labels.any()
    report, before = (json.loads((folder / "report.json").read_text()) for folder in (out, expected))
    assert report["classes"] == before["classes"]
    stored = sorted(path.name for path in (expected / "probabilities").iterdir())
    assert sorted(path.name for path in (out / "probabilities").iterdir()) == stored
    for file in stored:
        now = nib.load(out / "probabilities" / file).dataobj.get_unscaled().astype(int)
        then = nib.load(expected / "probabilities" / file).dataobj.get_unscaled().astype(int)
        # uint8 steps of 1/255 from float16 sums: a different summation order may move a voxel by one step
        assert np.abs(now - then).max() <= 1, file
        assert then.max() > 100 or file == "spleen.nii.gz"


def test_a_config_with_an_old_class_path_still_fits(tmp_path):
    config = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    config["model"]["backbone"]["class_path"] = "clipseg3d.backbones.UNetBackbone"
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = lightning_main(["--config", str(path), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert type(cli.model.model.backbone).__module__ == "clipseg3d.models.backbones"
    moved = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert any("clipseg3d.backbones has moved to clipseg3d.models.backbones" in line for line in moved), moved
