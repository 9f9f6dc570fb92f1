"""`make bench`: head cost relative to the backbone, and phantom generation speed.

Prints markdown rows for BENCHMARKS.md. Ratios are measured in one run, so they hold on any
machine load; absolute seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from clipseg3d.models.backbones import SwinUNETRBackbone, UNetBackbone
from clipseg3d.models.head import DynamicHead
from clipseg3d.phantom import write_dataset


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def head_vs_backbone(size: int = 96) -> None:
    print("| backbone | classes | backbone forward (s) | head forward (s) | head / backbone |\n|---|---|---|---|---|")
    image = torch.rand(1, 1, size, size, size)
    for backbone in (UNetBackbone(), SwinUNETRBackbone(feature_size=48)):
        backbone.eval()
        decoder_map, global_feature = backbone(image)
        backbone_s = best_of(lambda: backbone(image), repeats=1 if isinstance(backbone, SwinUNETRBackbone) else 3)
        for classes in (32, 128):
            head = DynamicHead(backbone.out_channels, backbone.global_channels, 512).eval()
            embeddings = torch.randn(classes, 512)
            head_s = best_of(lambda: head(decoder_map, global_feature, embeddings))
            print(f"| {backbone.registry_name} | {classes} | {backbone_s:.2f} | {head_s:.2f} | "
                  f"{head_s / backbone_s:.2f} |")


def phantom_speed(cases: int = 20) -> None:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_dataset(Path(folder) / "bench", cases, seed=0)
        seconds = time.perf_counter() - start
    print(f"\n| phantom cases (default site, 3 mm) | seconds | goal |\n|---|---|---|\n| {cases} | {seconds:.1f} | < 30 |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}\n")
    head_vs_backbone()
    phantom_speed()
