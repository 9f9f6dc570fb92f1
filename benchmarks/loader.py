"""Training loader throughput vs model step time (goal: loader < 20% of a step), and what the
training cache holds per case.

Demo row: a few phantoms through the demo DataModule and model (built by the CLI). Scale rows: 1.5 mm
phantoms with all 32 built-in classes, 96^3 crops, the paper's U-Net; the DataModule that caches
K-channel uint8 targets (before) and the one that caches an int16 class-code map (after), measured in
the same run: cache bytes per case, cache fill time per case, loader time per batch (after the cache
is filled), model step time and their ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from dense_targets import DenseTargetsDataModule

from clipseg3d.cli.main import lightning_main
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.index import index_dataset, write_manifest
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.phantom import write_dataset
from clipseg3d.training.task import UniversalSegmentation

REPO = Path(__file__).resolve().parents[1]
ORGANS = ["spleen", "right_kidney", "left_kidney", "liver", "stomach", "aorta", "pancreas", "right_lung", "left_lung"]
HEADER = "| config | batch | loader s/batch | model s/step | loader / step |\n|---|---|---|---|---|"
SCALE_HEADER = ("| 1.5 mm, 32 classes, 96^3 crops | cache MB/case | cache fill s/case | loader s/batch | model s/step "
                "| loader / step |\n|---|---|---|---|---|---|")


def loader_seconds(datamodule, batches: int) -> tuple[float, dict]:
    """Seconds per training batch once the cache is filled, and the last batch."""
    iterator = iter(datamodule.train_dataloader())
    batch = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    return (time.perf_counter() - start) / batches, batch


def step_seconds(model, batch: dict, steps: int) -> float:
    """Median seconds of a full optimiser step on ``batch``."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.loss(model(batch["image"]), batch["target"], batch["labelled"])
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def nbytes(value) -> int:
    """Bytes of the tensors in a cached item (lists and dicts walked)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(nbytes(item) for item in value)
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    return 0


def demo_row(folder: Path, batches: int, steps: int) -> str:
    data = write_dataset(folder / "organs", 4, seed=0, classes=ORGANS, name="organs")
    manifest = folder / "organs.jsonl"
    write_manifest(index_dataset(str(data / "organs.yaml"), data), manifest)
    cli = lightning_main(["--config", str(REPO / "src" / "clipseg3d" / "configs" / "demo.yaml"),
                          f"--data.init_args.manifests=[{manifest}]"], run=False)
    cli.datamodule.setup("fit")
    loader_s, batch = loader_seconds(cli.datamodule, batches)
    step_s = step_seconds(cli.model, batch, steps)
    return f"| demo.yaml | {tuple(batch['image'].shape)} | {loader_s:.3f} | {step_s:.3f} | {loader_s / step_s:.1%} |"


def scale_rows(folder: Path, cases: int, batches: int, steps: int) -> list[str]:
    """Before and after rows at 1.5 mm with 32 classes (``cases`` - 1 training cases, one validation case)."""
    data = write_dataset(folder / "p15", cases, seed=0, spacing=(1.5, 1.5, 1.5), name="p15")
    manifest = folder / "p15.jsonl"
    write_manifest(index_dataset(str(data / "p15.yaml"), data), manifest)
    settings = dict(manifests=[str(manifest)], classes=None, spacing=(1.5, 1.5, 1.5), crop_size=(96, 96, 96),
                    samples_per_volume=2, batch_size=2, cache="memory", val_fraction=1 / cases, seed=0,
                    samples_per_epoch=batches + 1)
    model = UniversalSegmentation(classes=None, roi_size=(96, 96, 96), backbone=UNetBackbone(
        channels=(32, 64, 128, 256, 320), strides=(2, 2, 2, 2), out_channels=48, num_res_units=2))
    measured = []
    for name, module_class in (("K-channel uint8 targets (before)", DenseTargetsDataModule),
                               ("int16 class-code map (after)", CTDataModule)):
        datamodule = module_class(**settings)
        start = time.perf_counter()
        datamodule.setup("fit")
        fill_s = (time.perf_counter() - start) / cases
        (train, count), = datamodule.train_sets.values()
        cache_mb = sum(nbytes(train.data[i]) for i in range(count)) / count / 2**20
        loader_s, batch = loader_seconds(datamodule, batches)
        measured.append((name, cache_mb, fill_s, loader_s))
        del datamodule, train
    step_s = step_seconds(model, batch, steps)
    return [f"| {name} | {cache_mb:.0f} | {fill_s:.1f} | {loader_s:.3f} | {step_s:.2f} | {loader_s / step_s:.1%} |"
            for name, cache_mb, fill_s, loader_s in measured]


def main(batches: int = 10, steps: int = 5, scale: bool = True) -> None:
    with tempfile.TemporaryDirectory() as folder:
        print(HEADER)
        print(demo_row(Path(folder), batches, steps))
        if scale:
            print(SCALE_HEADER)
            print("\n".join(scale_rows(Path(folder), cases=3, batches=5, steps=3)))


if __name__ == "__main__":
    main(scale="--demo-only" not in sys.argv[1:])
