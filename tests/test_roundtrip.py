"""`clipseg3d phantom` -> `index` -> `fit` -> `predict` round trip through the CT DataModule."""

import json

import nibabel as nib
import numpy as np

from clipseg3d.cli.main import main

from conftest import REPO


def test_phantom_index_fit_round_trip(tmp_path):
    data = tmp_path / "liver"
    assert main(["phantom", "--out", str(data), "--cases", "3", "--seed", "5", "--spacing", "6", "6", "6",
                 "--name", "liver"]) == 0
    manifest = tmp_path / "liver.jsonl"
    assert main(["index", str(data / "liver.yaml"), str(data), "-o", str(manifest)]) == 0
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 3 and all(record["dataset"].endswith("liver.yaml") for record in records)
    data_args = ["--data=clipseg3d.data.datamodule.CTDataModule", f"--data.init_args.manifests=[{manifest}]",
                 "--data.init_args.spacing=[6,6,6]", "--data.init_args.crop_size=[32,32,32]",
                 "--data.init_args.samples_per_volume=1", "--data.init_args.batch_size=1",
                 "--data.init_args.val_fraction=0.34"]
    assert main(["fit", "--config", str(REPO / "experiments" / "tiny.yaml"), "--trainer.max_steps=2",
                 "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path / 'run'}", *data_args]) == 0

    # Batch prediction through the writer callback gives segment's outputs on the scan's grid.
    (checkpoint,) = (tmp_path / "run").rglob("*.ckpt")
    scan = records[0]["image"]
    assert main(["predict", "--config", str(REPO / "experiments" / "tiny.yaml"),
                 "--config", str(REPO / "experiments" / "predict.yaml"), *data_args,
                 f"--data.init_args.predict_inputs=[{scan}]", f"--ckpt_path={checkpoint}",
                 f"--trainer.default_root_dir={tmp_path / 'predict'}",
                 f"--trainer.callbacks.init_args.output_dir={tmp_path / 'predictions'}"]) == 0
    written = tmp_path / "predictions" / records[0]["case"]
    labels = nib.load(written / "labels.nii.gz")
    source = nib.load(scan)
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine, atol=1e-4)
    assert (written / "report.json").exists()
