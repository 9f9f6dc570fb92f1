"""`make bench`: head cost relative to the backbone (32, 128, 512 classes), and phantom generation speed.

Prints markdown rows for BENCHMARKS.md. Ratios are measured in one run, so they hold on any
machine load; absolute seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from clipseg3d.models.backbones import SwinUNETRBackbone, UNetBackbone
from clipseg3d.models.head import DynamicHead
from clipseg3d.phantom import write_dataset


def best_of(fn, repeats: int = 3) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def head_vs_backbone(size: int = 96, class_counts: tuple[int, ...] = (32, 128, 512),
                     backbones: tuple[str, ...] = ("unet", "swinunetr"), one_pass: bool = False) -> None:
    """Forward time of each backbone and of the dynamic head at each class count, on one window."""
    print("| backbone | classes | head | backbone forward (s) | head forward (s) | head / backbone | head ms per class |"
          "\n|---|---|---|---|---|---|---|")
    image = torch.rand(1, 1, size, size, size)
    made = {"unet": lambda: UNetBackbone(num_res_units=1), "swinunetr": lambda: SwinUNETRBackbone(feature_size=48)}
    for backbone in (made[name]() for name in backbones):  # the U-Net: the demo's
        backbone.eval()
        decoder_map, global_feature = backbone(image)
        backbone_s = float("inf")
        head = DynamicHead(backbone.out_channels, backbone.global_channels, 512).eval()
        for classes in class_counts:
            # the backbone is timed again beside each head: on a shared machine the load changes meanwhile
            backbone_s = min(backbone_s, best_of(lambda: backbone(image), repeats=1))
            embeddings = torch.randn(classes, 512)
            heads = {"class groups": head}
            if one_pass:
                heads["one pass"] = one_pass_head(head)
            times = {name: best_of(lambda: each(decoder_map, global_feature, embeddings),
                                   repeats=3 if classes < 512 else 1) for name, each in heads.items()}
            backbone_s = min(backbone_s, best_of(lambda: backbone(image), repeats=1))
            for name, head_s in times.items():
                print(f"| {backbone.registry_name} | {classes} | {name} | {backbone_s:.2f} | {head_s:.2f} | "
                      f"{head_s / backbone_s:.2f} | {1000 * head_s / classes:.1f} |", flush=True)


def one_pass_head(head: DynamicHead, chunk_voxels: int = 4096) -> DynamicHead:
    """A copy of ``head`` that runs all classes in one pass over 4,096-voxel chunks (the working set
    grows with the class count), for comparison."""
    other = copy.deepcopy(head)
    other.inference_blocks = lambda classes, voxels: (classes, min(chunk_voxels, voxels))
    return other


def phantom_speed(cases: int = 20) -> None:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_dataset(Path(folder) / "bench", cases, seed=0)
        seconds = time.perf_counter() - start
    print(f"\n| phantom cases (default site, 3 mm) | seconds | goal |\n|---|---|---|\n| {cases} | {seconds:.1f} | < 30 |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--head-only", action="store_true", help="skip the phantom generation row")
    parser.add_argument("--one-pass", action="store_true", help="also time the head with all classes in one pass")
    parser.add_argument("--backbones", nargs="+", default=["unet", "swinunetr"], choices=["unet", "swinunetr"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}\n")
    head_vs_backbone(backbones=tuple(args.backbones), one_pass=args.one_pass)
    if not args.head_only:
        phantom_speed()
