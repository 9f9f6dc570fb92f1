"""Speed of ``clipseg3d segment`` on a CPU, one means at a time, with Dice against the reference path.

A reference U-Net of the demo's size (16..256, the 32 built-in classes) is fitted on phantoms that
label all 32 classes at 1.5 mm for a fixed seed and step count, and a coarse one at 5 mm (the demo's
grid, for ``--fast``); both are cached under ``--cache`` so reruns skip the fits. A phantom CT of 512 x 512 x
300 voxels at 0.8 x 0.8 x 1.5 mm (``--quick``: 256 x 256 x 150 at the same voxel size) is segmented
once per row, each in its own process (seconds of the whole segment, peak RSS). Each row's label
map is compared with the reference row's: per-class Dice over the classes either one labels.

Run ``python benchmarks/segment_speed.py [--quick] [--rows NAME ...] [--threads N]``; prints a
markdown table and the load average at start and end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "segment_speed"
SCANS = {"full": (512, 512, 300), "quick": (256, 256, 150)}
VOXEL_MM = (0.8, 0.8, 1.5)
#: the reference path's overlap, said on each row it applies to (the checkpoints record the demo's 0.25)
OVERLAP_HALF = ["--overlap", "0.5"]
#: name -> (what changed, checkpoint, segment options)
ROWS = {
    "reference": ("reference: float32, overlap 0.5, one window per pass", "fine", OVERLAP_HALF),
    "overlap": ("overlap 0.25", "fine", ["--overlap", "0.25"]),
    "batch": ("4 windows per pass", "fine", [*OVERLAP_HALF, "--sw-batch", "4"]),
    "channels_last": ("channels-last windows (`--channels-last`)", "fine", [*OVERLAP_HALF, "--channels-last"]),
    "bfloat16": ("bfloat16 autocast (`--bfloat16`)", "fine", [*OVERLAP_HALF, "--bfloat16"]),
    "compile": ("compiled head (`--compile`)", "fine", [*OVERLAP_HALF, "--compile"]),
    "onnx": ("backbone in ONNX Runtime (`--onnx`)", "fine", [*OVERLAP_HALF, "--onnx"]),
    "openvino": ("backbone in OpenVINO (`--openvino`)", "fine", [*OVERLAP_HALF, "--openvino"]),
    "combined": ("overlap 0.25, channels-last, bfloat16, compiled head", "fine",
                 ["--overlap", "0.25", "--channels-last", "--bfloat16", "--compile"]),
    "combined_openvino": ("overlap 0.25, backbone in OpenVINO, bfloat16, compiled head", "fine",
                          ["--overlap", "0.25", "--openvino", "--bfloat16", "--compile"]),
    "combined_half": ("overlap 0.5, channels-last, bfloat16, compiled head", "fine",
                      [*OVERLAP_HALF, "--channels-last", "--bfloat16", "--compile"]),
    "float32_half": ("overlap 0.5, backbone in OpenVINO, compiled head (float32 only)", "fine",
                     [*OVERLAP_HALF, "--openvino", "--compile"]),
    "fast": ("`--fast` (the coarse checkpoint, its overlap 0.25)", "coarse", ["--fast"]),
}
#: the rows run by default (4 windows per pass gained nothing on a CPU: see BENCHMARKS.md)
DEFAULT_ROWS = [row for row in ROWS if row != "batch"]
#: name, cases and seed of the phantoms both references are fitted on (every built-in class labelled)
TRAINING_PHANTOMS = ("all_classes", 24, 11)
#: checkpoint name -> (spacing mm, crop size, fit steps, overrides of the demo's fit). At 1.5 mm a
#: crop holds parts of a few organs: the demo's recipe (lr 3e-3, Dice on every labelled pair)
#: learns to predict nothing there, so the fine fit scores Dice only on the crops that hold the class.
#: Its crops are the paper's 96^3 (144 mm), one a step: 64^3 crops (96 mm) could not tell left from right.
CHECKPOINTS = {"fine": (1.5, (96, 96, 96), 1200, ["--model.lr=1e-3", "--model.warmup_steps=50",
                                                  "--model.dice_on_empty=false", "--data.init_args.batch_size=1"]),
               "coarse": (5.0, (64, 64, 48), 1200, [])}


def load_average() -> str:
    """The load average, and the matrix-multiply speed (a shared host shows there, not in the load)."""
    from run import sgemm_gflops

    return f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])} (sgemm {sgemm_gflops():.0f} GFLOP/s)"


def builtin_classes() -> list[str]:
    from clipseg3d.catalog import ClassCatalog

    return [entry.name for entry in ClassCatalog.builtin()]


def training_manifests(cache: Path) -> list[Path]:
    """The references' training set: phantoms that label all 32 built-in classes (cached). The
    demo's datasets label its 8 organs and 2 tumours only, so a 32-class model fitted on them
    predicts noise for the other 22, and the noise, not the organs, sets the post-processing cost."""
    from clipseg3d.data.index import index_dataset, write_manifest
    from clipseg3d.phantom import write_dataset

    name, cases, seed = TRAINING_PHANTOMS
    manifest = cache / f"{name}.jsonl"
    if not manifest.exists():
        folder = write_dataset(cache / name, cases, seed, name=name, min_tumour_mm=12.0)
        write_manifest(index_dataset(str(folder / f"{name}.yaml"), folder), manifest, overwrite=True)
    return [manifest]


def fitted_checkpoint(name: str, cache: Path, steps: int | None, seed: int) -> Path:
    """The cached checkpoint ``name`` (fitted on :func:`training_manifests` when missing)."""
    from clipseg3d.cli import demo

    spacing, crop, default_steps, recipe = CHECKPOINTS[name]
    steps = steps or default_steps
    overrides = [f"--seed_everything={seed}", f"--trainer.max_steps={steps}",
                 f"--model.classes=[{','.join(builtin_classes())}]",
                 f"--data.init_args.spacing=[{spacing},{spacing},{spacing}]",
                 f"--data.init_args.crop_size=[{','.join(map(str, crop))}]", *recipe]
    recipe_tag = hashlib.sha256(" ".join([*recipe, *map(str, crop), *map(str, TRAINING_PHANTOMS)]).encode()).hexdigest()[:8]
    path = cache / f"unet_{spacing:g}mm_{steps}steps_seed{seed}_{recipe_tag}.ckpt"
    if path.exists():
        return path
    run = cache / f"fit_{name}"
    checkpoint = demo.fit(run, training_manifests(cache), overrides)
    shutil.move(checkpoint, path)
    return path


def write_ct(cache: Path, shape: tuple[int, int, int], seed: int = 7) -> Path:
    """A phantom CT of ``shape`` voxels at :data:`VOXEL_MM` (cached)."""
    from clipseg3d.phantom import write_dataset
    from clipseg3d.phantom.datasets import Site

    name = f"ct_{'x'.join(map(str, shape))}"
    folder = cache / name
    images = sorted((folder / "imagesTr").glob("*.nii.gz")) if folder.exists() else []
    if not images:
        site = Site(name, spacing=VOXEL_MM, fov_mm=tuple(n * mm for n, mm in zip(shape, VOXEL_MM)))
        write_dataset(folder, 1, seed, site=site, name="ct")
        images = sorted((folder / "imagesTr").glob("*.nii.gz"))
    return images[0]


# -- one row, in its own process -----------------------------------------------------------------
def run_row(row: str, scan: Path, checkpoint: Path, out: Path) -> dict:
    """Segment ``scan`` the way ``row`` says; seconds of the whole segment and peak RSS."""
    from run import peak_rss_gb

    from clipseg3d.cli import segment

    _, _, options = ROWS[row]
    args = segment.build_parser().parse_args([str(scan), "--ckpt", str(checkpoint), "-o", str(out), "--device", "cpu",
                                              "--no-overlay", "--overwrite", *options])
    start = time.perf_counter()
    segmenter = segment.load_segmenter(args)
    segmenter.inferer.progress = False
    done, _, failed = segment.run_scans(segmenter, [scan], args)
    if failed or not done:
        raise SystemExit(f"{row}: segment failed")
    return {"seconds": time.perf_counter() - start,
            "peak_rss_gb": peak_rss_gb()}


def measure(row: str, scan: Path, checkpoint: Path, out: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", row, "--scan", str(scan), "--ckpt", str(checkpoint),
               "--out", str(out), "--threads", str(threads)]
    process = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        return {"error": (process.stderr.strip().splitlines() or [f"exit code {process.returncode}"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


# -- Dice against the reference row -------------------------------------------------------------
def label_masks(folder: Path) -> dict[str, np.ndarray]:
    """Each class's voxels in a segment output's label map."""
    labels = np.asarray(nib.load(folder / "labels.nii.gz").dataobj)
    table = json.loads((folder / "classes.json").read_text())
    return {name: labels == int(value) for value, name in table.items()}


def truth_masks(scan: Path) -> dict[str, np.ndarray]:
    """Each class's voxels in the phantom's own label file (``labelsTr`` beside ``imagesTr``)."""
    labels = np.asarray(nib.load(scan.parent.parent / "labelsTr" / scan.name).dataobj)
    table = json.loads((scan.parent.parent / "dataset.json").read_text())["labels"]
    masks = {name: labels == int(value) for value, name in table.items() if name != "background"}
    return {name: mask for name, mask in masks.items() if mask.any()}


def truth_cell(masks: dict[str, np.ndarray] | None, truth: dict[str, np.ndarray]) -> str:
    """Mean Dice over the classes the phantom holds (a class the row misses counts 0)."""
    if masks is None:
        return ""
    empty = np.zeros(next(iter(truth.values())).shape, dtype=bool)
    scores = dice_by_class({name: masks.get(name, empty) for name in truth}, truth)
    return f"{np.mean(list(scores.values())):.3f} over {len(scores)} classes"


def dice_by_class(masks: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-class Dice over the classes that either side labels somewhere (a class empty in both is
    left out: it says nothing of the agreement)."""
    scores = {}
    for name in sorted(set(masks) | set(reference)):
        ours, theirs = masks.get(name), reference.get(name)
        ours_count = int(ours.sum()) if ours is not None else 0
        theirs_count = int(theirs.sum()) if theirs is not None else 0
        if ours_count + theirs_count:
            both = int(np.logical_and(ours, theirs).sum()) if ours is not None and theirs is not None else 0
            scores[name] = 2.0 * both / (ours_count + theirs_count)
    return scores


def dice_cell(scores: dict[str, float] | None) -> str:
    if scores is None:
        return ""
    if not scores:
        return "n/a (no class labelled by either)"
    worst = min(scores, key=scores.get)
    return f"{np.mean(list(scores.values())):.3f} over {len(scores)} classes (lowest {worst} {scores[worst]:.3f})"


def window_means(size: int = 96, repeats: int = 2) -> None:
    """One forward of the demo U-Net + 32-class head per window: float32, channels-last, bfloat16
    autocast, 2 windows per pass, the compiled head, and the last three together, then the
    backbone in OpenVINO (float32 and bfloat16) where it is installed; interleaved after a
    warm-up round (which also compiles), best of ``repeats``."""
    import importlib.util

    import torch

    from clipseg3d.inference.onnx_backbone import openvino_backbone
    from clipseg3d.inference.sliding_window import cpu_runs_bfloat16
    from clipseg3d.models.backbones import UNetBackbone
    from clipseg3d.models.head import DynamicHead

    torch.manual_seed(0)
    backbone = UNetBackbone(num_res_units=1).eval()
    head = DynamicHead(backbone.out_channels, backbone.global_channels, 384).eval()
    embeddings = torch.randn(32, 384)

    def network(windows: torch.Tensor) -> torch.Tensor:
        return head(*backbone(windows), embeddings)

    one, two = torch.rand(1, 1, size, size, size), torch.rand(2, 1, size, size, size)
    def fused(run):
        def with_fused_head():
            head.fused = True
            try:
                return run()
            finally:
                head.fused = False
        return with_fused_head

    last = one.contiguous(memory_format=torch.channels_last_3d)
    means = {"float32 (reference)": (lambda: network(one), 1),
             "channels-last windows": (lambda: network(last), 1),
             "bfloat16 autocast": (lambda: torch.autocast("cpu", dtype=torch.bfloat16)(network)(one), 1),
             "2 windows per pass (per window)": (lambda: network(two), 2),
             "compiled head": (fused(lambda: network(one)), 1),
             "channels-last, bfloat16, compiled head": (
                 fused(lambda: torch.autocast("cpu", dtype=torch.bfloat16)(network)(last)), 1)}

    def in_openvino(bfloat16: bool):
        runtime = openvino_backbone(backbone, (size,) * 3, bfloat16=bfloat16)

        def run() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                return head(*runtime(one), embeddings)
        return run

    bfloat16 = cpu_runs_bfloat16()
    if importlib.util.find_spec("openvino") is not None:
        means["backbone in OpenVINO"] = (in_openvino(bfloat16=False), 1)
        if bfloat16:
            means["backbone in OpenVINO, bfloat16"] = (in_openvino(bfloat16=True), 1)
    if not bfloat16:  # about 100x float32's time: segment runs float32 there
        print("this CPU has no bfloat16 convolutions: the bfloat16 means are left out")
        means = {name: mean for name, mean in means.items() if "bfloat16" not in name}
    times: dict[str, float] = {name: float("inf") for name in means}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, (run, windows) in means.items():
                start = time.perf_counter()
                run()
                times[name] = min(times[name], (time.perf_counter() - start) / windows)
    print("| means | s per window | vs float32 |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} | {seconds / times['float32 (reference)']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256 x 150 voxels instead of 512 x 512 x 300")
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, help="fit steps of both checkpoints (default: "
                        + ", ".join(f"{name} {steps}" for name, (_, _, steps, _) in CHECKPOINTS.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=["per-row", *CHECKPOINTS], default="per-row",
                        help="one checkpoint for every row (its own reference path) instead of each row's")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"checkpoints and phantoms (default {CACHE})")
    parser.add_argument("--windows", action="store_true", help="only the per-window comparison of the means")
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    for hidden in ("--scan", "--ckpt", "--out"):
        parser.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        from clipseg3d.cli.main import use_huge_pages

        use_huge_pages()  # as the clipseg3d command does
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(run_row(args.child, args.scan, args.ckpt, args.out)))
        return
    started_load = load_average()
    if args.windows:
        import torch

        torch.set_num_threads(args.threads)
        window_means()
        print(f"\nload average at start {started_load}, at end {load_average()}")
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    scan = write_ct(args.cache, SCANS["quick" if args.quick else "full"])
    rows = ["reference"] + [row for row in args.rows if row != "reference"]
    chosen = {row: ROWS[row][1] if args.model == "per-row" else args.model for row in rows}
    checkpoints = {name: fitted_checkpoint(name, args.cache, args.steps, args.seed) for name in sorted(set(chosen.values()))}
    print(f"scan {scan.name}, {args.threads} threads, checkpoints {sorted(set(chosen.values()))}; load average at "
          f"start {started_load}\n")
    print("| what changed | time (s) | peak RSS (GB) | Dice vs reference: mean over classes (lowest) "
          "| Dice vs the phantom's labels |\n|---|---|---|---|---|")
    reference, truth = None, truth_masks(scan)
    for row in rows:
        out = args.cache / "outputs" / row
        result = measure(row, scan, checkpoints[chosen[row]], out, args.threads)
        masks = label_masks(next(out.iterdir())) if "error" not in result else None
        reference = masks if reference is None else reference
        scores = dice_by_class(masks, reference) if masks is not None and reference is not None else None
        if scores is not None:
            (out.parent / f"{row}_dice.json").write_text(json.dumps(scores, indent=1) + "\n")
        time_cell = f"failed: {result['error']}" if "error" in result else f"{result['seconds']:.1f}"
        rss = f"{result['peak_rss_gb']:.2f}" if "peak_rss_gb" in result else ""
        print(f"| {ROWS[row][0]} | {time_cell} | {rss} | {dice_cell(scores)} | {truth_cell(masks, truth)} |", flush=True)
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
