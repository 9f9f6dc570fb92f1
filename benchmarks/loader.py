"""Training loader throughput vs model step time at the demo config (goal: loader < 20% of a step).

Writes a few phantoms, builds the demo DataModule and model through the CLI, then times batches
drawn from the training loader (after the cache is filled) and full optimiser steps on one batch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from clipseg3d.cli.main import lightning_main
from clipseg3d.data.index import index_dataset, write_manifest
from clipseg3d.phantom import write_dataset

REPO = Path(__file__).resolve().parents[1]
ORGANS = ["spleen", "right_kidney", "left_kidney", "liver", "stomach", "aorta", "pancreas", "right_lung", "left_lung"]


def main(batches: int = 10, steps: int = 5) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = write_dataset(Path(folder) / "organs", 4, seed=0, classes=ORGANS, name="organs")
        manifest = Path(folder) / "organs.jsonl"
        write_manifest(index_dataset(str(data / "organs.yaml"), data), manifest)
        cli = lightning_main(["--config", str(REPO / "src" / "clipseg3d" / "configs" / "demo.yaml"),
                              f"--data.init_args.manifests=[{manifest}]"], run=False)
        cli.datamodule.setup("fit")
        iterator = iter(cli.datamodule.train_dataloader())
        batch = next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        loader_s = (time.perf_counter() - start) / batches
        model = cli.model
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
        step_s = sorted(times)[len(times) // 2]
    crops = tuple(batch["image"].shape)
    print("| config | batch | loader s/batch | model s/step | loader / step |\n|---|---|---|---|---|")
    print(f"| demo.yaml | {crops} | {loader_s:.3f} | {step_s:.3f} | {loader_s / step_s:.1%} |")


if __name__ == "__main__":
    main()
