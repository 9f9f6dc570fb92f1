"""The CT DataModule's training crops are reproducible from its seed, in the main process and in workers."""

import pytest
import torch

from clipseg3d.cli.main import main
from clipseg3d.data.datamodule import CTDataModule


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crops")
    assert main(["phantom", "--out", str(folder / "data"), "--cases", "2", "--seed", "4", "--spacing", "6", "6", "6",
                 "--name", "crops"]) == 0
    assert main(["index", str(folder / "data" / "crops.yaml"), str(folder / "data"), "-o",
                 str(folder / "crops.jsonl")]) == 0
    return str(folder / "crops.jsonl")


def crops(manifest: str, seed: int, workers: int, batches: int = 4) -> list[torch.Tensor]:
    data = CTDataModule(manifests=[manifest], classes=["liver", "spleen"], spacing=(6.0, 6.0, 6.0),
                        crop_size=(16, 16, 16), samples_per_volume=1, batch_size=1, samples_per_epoch=batches,
                        val_fraction=0.0, num_workers=workers, seed=seed)
    data.setup("fit")
    torch.manual_seed(0)  # the loader's worker seeds come from torch's generator, as under seed_everything
    return [batch["image"] for batch in data.train_dataloader()]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_gives_the_same_crops_and_workers_do_not_repeat_each_other(manifest, workers):
    first, again, other = crops(manifest, 0, workers), crops(manifest, 0, workers), crops(manifest, 1, workers)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # consecutive batches come from different workers when workers > 0; none is a copy of another
    assert not any(torch.equal(a, b) for i, a in enumerate(first) for b in first[i + 1:])
