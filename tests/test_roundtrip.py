"""`clipseg3d phantom` -> `clipseg3d index` -> `clipseg3d fit` round trip through the CT DataModule."""

import json

from clipseg3d.cli import main
from conftest import REPO


def test_phantom_index_fit_round_trip(tmp_path):
    data = tmp_path / "liver"
    assert main(["phantom", "--out", str(data), "--cases", "3", "--seed", "5", "--spacing", "6", "6", "6",
                 "--name", "liver"]) == 0
    manifest = tmp_path / "liver.jsonl"
    assert main(["index", str(data / "liver.yaml"), str(data), "-o", str(manifest)]) == 0
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 3 and all(record["dataset"].endswith("liver.yaml") for record in records)
    assert main(["fit", "--config", str(REPO / "experiments" / "tiny.yaml"), "--trainer.max_steps=2",
                 "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path / 'run'}",
                 "--data=clipseg3d.data.datamodule.CTDataModule", f"--data.init_args.manifests=[{manifest}]",
                 "--data.init_args.spacing=[6,6,6]", "--data.init_args.crop_size=[32,32,32]",
                 "--data.init_args.samples_per_volume=1", "--data.init_args.batch_size=1",
                 "--data.init_args.val_fraction=0.34"]) == 0
