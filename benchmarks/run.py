"""`make bench`: head cost relative to the backbone (32, 128, 512 classes), and phantom generation speed.

Prints markdown rows for BENCHMARKS.md. Ratios are measured in one run, so they hold on any
machine load; absolute seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import resource
import tempfile
import time
from pathlib import Path

from clipseg3d.cli.main import use_huge_pages

use_huge_pages()  # as the clipseg3d command does; before torch allocates (THP_MEM_ALLOC_ENABLE=0: without)

import torch  # noqa: E402

from clipseg3d.inference.heap import freed_memory_reused  # noqa: E402
from clipseg3d.models.backbones import SwinUNETRBackbone, UNetBackbone  # noqa: E402
from clipseg3d.models.head import DynamicHead  # noqa: E402
from clipseg3d.phantom import write_dataset  # noqa: E402


def peak_rss_gb() -> float:
    """This process's peak resident memory: ``VmHWM``, which (unlike ``ru_maxrss``) starts afresh at
    exec, so a child does not report the size of the process that started it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux reports KiB


def best_of(fn, repeats: int = 3) -> float:
    """The shortest of ``repeats`` timed calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sgemm_gflops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matrix-multiply speed now (GFLOP/s, torch's threads): a shared host
    shows here, whatever the load average says."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    return 2 * size ** 3 / best_of(lambda: a @ b, repeats) / 1e9


BACKBONES = {"unet": lambda swin_feature: UNetBackbone(num_res_units=1),  # the demo's U-Net
             "swinunetr": lambda swin_feature: SwinUNETRBackbone(feature_size=swin_feature)}


@torch.no_grad()
def head_rows(size: int = 96, class_counts: tuple[int, ...] = (32, 128, 512),
              backbones: tuple[str, ...] = ("unet", "swinunetr"), variants: tuple[str, ...] = ("class groups",),
              repeats: int = 5, swin_feature: int = 48, text_dim: int = 512) -> list[dict]:
    """Forward seconds of each backbone and of the dynamic head at each class count on one
    ``size``-cubed window, per head variant: ``class groups`` (the default inference path),
    ``one pass`` (all classes at once) and ``compiled`` (the fused kernel, compiled first)."""
    image = torch.rand(1, 1, size, size, size)
    rows = []
    for backbone in (BACKBONES[name](swin_feature) for name in backbones):
        backbone.eval()
        decoder_map, global_feature = backbone(image)
        backbone_s = float("inf")
        head = DynamicHead(backbone.out_channels, backbone.global_channels, text_dim).eval()
        heads = {name: head_variant(head, name) for name in variants}
        for classes in class_counts:
            # the backbone is timed again beside each head: on a shared machine the load changes meanwhile
            backbone_s = min(backbone_s, best_of(lambda: backbone(image), repeats=2))
            embeddings = torch.randn(classes, text_dim)
            for each in heads.values():  # warm-up (the compiled head compiles here)
                each(decoder_map, global_feature, embeddings)
            times = {name: best_of(lambda: each(decoder_map, global_feature, embeddings),
                                   repeats=repeats) for name, each in heads.items()}
            backbone_s = min(backbone_s, best_of(lambda: backbone(image), repeats=2))
            rows += [{"backbone": backbone.registry_name, "classes": classes, "head": name, "backbone_s": backbone_s,
                      "head_s": head_s} for name, head_s in times.items()]
    return rows


def head_variant(head: DynamicHead, name: str, chunk_voxels: int = 4096) -> DynamicHead:
    """``head`` itself (``class groups``), or a copy that runs all classes in one pass over
    4,096-voxel chunks (``one pass``: the working set grows with the class count), or a copy that
    runs the compiled kernel (``compiled``)."""
    if name == "class groups":
        return head
    other = copy.deepcopy(head)
    if name == "one pass":
        other.inference_blocks = lambda classes, voxels: (classes, min(chunk_voxels, voxels))
    elif name == "compiled":
        other.fused = True
    else:
        raise ValueError(f"unknown head variant {name!r}")
    return other


def print_head_rows(rows: list[dict]) -> None:
    print("| backbone | classes | head | backbone forward (s) | head forward (s) | head / backbone | head ms per class |"
          "\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backbone']} | {row['classes']} | {row['head']} | {row['backbone_s']:.2f} | {row['head_s']:.2f} | "
              f"{row['head_s'] / row['backbone_s']:.2f} | {1000 * row['head_s'] / row['classes']:.1f} |")


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
    parser.add_argument("--heads", nargs="+", default=["class groups", "compiled"],
                        choices=["class groups", "one pass", "compiled"], help="head variants to time")
    parser.add_argument("--backbones", nargs="+", default=["unet", "swinunetr"], choices=["unet", "swinunetr"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; sgemm {sgemm_gflops():.0f} GFLOP/s\n")
    with freed_memory_reused():  # as segment's sliding window runs them
        print_head_rows(head_rows(backbones=tuple(args.backbones), variants=tuple(args.heads)))
    print(f"\nsgemm at the end {sgemm_gflops():.0f} GFLOP/s")
    if not args.head_only:
        phantom_speed()
