"""Peak memory and time of ``clipseg3d segment`` beside a plain float32 K-channel MONAI pipeline
and beside a validation pass.

A synthetic CT (512 x 512 x 300 voxels at 0.8 x 0.8 x 1.5 mm; ``--quick``: 256 x 256 x 150;
``--model-grid``: 320 x 320 x 200 already at the model's 1.5 mm, so that the validation batch and
``segment``'s model grid are the same volume) and a randomly initialised checkpoint (the demo
U-Net, channels 16..256 with 32 output channels, and the 32 built-in classes; 1.5 mm spacing,
96^3 windows, overlap 0.5) are written to a temporary folder. Each measurement runs in its own
process and reports that process's peak resident memory (``ru_maxrss``):

* ``segment``: the whole ``clipseg3d segment`` command (all default outputs written);
* ``streaming``: scan file -> masks on the scan grid the way ``segment`` does it (float16
  per-class accumulation, one class at a time back to the scan grid);
* ``monai``: scan file -> masks on the scan grid with a float32 K-channel ``SlidingWindowInferer``
  output, sigmoid, and MONAI's inverse of ``Orientation`` + ``Spacing`` on all K channels at once;
* ``validation``: ``trainer.validate`` of the training task over a manifest holding the scan and a
  label file (CTDataModule's val loader: K-channel uint8 targets; the task's streaming window and
  per-class Dice and loss).

Run ``python benchmarks/segment_memory.py [--quick | --model-grid] [--methods ...]``; prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from run import peak_rss_gb

MODEL_SPACING_MM = [1.5, 1.5, 1.5]
# scan shape and voxel size (mm) per size option
SCANS = {"full": ((512, 512, 300), (0.8, 0.8, 1.5)), "quick": ((256, 256, 150), (0.8, 0.8, 1.5)),
         "model-grid": ((320, 320, 200), tuple(MODEL_SPACING_MM))}
METHODS = ["segment", "streaming", "monai", "validation"]
ROI = [96, 96, 96]
OVERLAP = 0.5
EMBEDDING_DIM = 384


def write_scan(path: Path, shape: tuple[int, int, int], voxel_mm: tuple[float, float, float], seed: int = 0) -> None:
    """An elliptic body of soft tissue (40 HU) in air, with a few denser blobs and noise; beside it
    a label file (two boxes: AbdomenCT-1K's liver and spleen) and a one-case manifest."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 <= 1.0
    volume = np.where(body[..., None], np.int16(40), np.int16(-1000)).repeat(shape[2], axis=2)
    for _ in range(12):
        centre = rng.uniform(0.25, 0.75, 3) * shape
        radius = rng.uniform(0.04, 0.1) * shape[0]
        box = tuple(slice(max(int(c - radius), 0), int(c + radius)) for c in centre)
        volume[box] += np.int16(rng.integers(20, 150))
    volume += rng.normal(0, 10, shape).astype(np.int16)
    affine = np.diag([*voxel_mm, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), path)
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(int(0.3 * n), int(0.5 * n)) for n in shape)] = 1
    label[tuple(slice(int(0.55 * n), int(0.7 * n)) for n in shape)] = 3
    nib.save(nib.Nifti1Image(label, affine), path.with_name("label.nii"))
    record = {"image": path.name, "label": "label.nii", "dataset": "abdomenct1k", "case": "scan"}
    path.with_name("val.jsonl").write_text(json.dumps(record) + "\n")


def write_checkpoint(path: Path, seed: int = 0) -> None:
    """A clipseg3d checkpoint of the demo U-Net with random weights and class embeddings."""
    from clipseg3d.catalog import ClassCatalog
    from clipseg3d.models.backbones import UNetBackbone
    from clipseg3d.models.checkpoint import CHECKPOINT_KEY
    from clipseg3d.models.model import UniversalModel

    torch.manual_seed(seed)
    backbone = UNetBackbone(channels=(16, 32, 64, 128, 256), out_channels=32)
    entries = list(ClassCatalog.builtin())
    model = UniversalModel(backbone, entries, torch.randn(len(entries), EMBEDDING_DIM), "random")
    meta = model.metadata()
    meta["preprocessing"] = {"roi_size": ROI, "sw_overlap": OVERLAP, "spacing": MODEL_SPACING_MM,
                             "hu_window": [-175.0, 250.0], "orientation": "RAS"}
    state = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state_dict": state, CHECKPOINT_KEY: meta}, path)


# -- measured runs (each in its own process) ---------------------------------------------------
def report_stage(times: dict) -> None:
    """Tell the parent what is done so far (kept when a later stage fails)."""
    print("STAGE " + json.dumps({**times, "peak_rss_gb": peak_rss_gb()}), flush=True)


def run_segment(scan: Path, checkpoint: Path, out: Path) -> dict:
    from clipseg3d.cli.segment import main

    start = time.perf_counter()
    code = main([str(scan), "--ckpt", str(checkpoint), "-o", str(out), "--device", "cpu"])
    if code:
        raise SystemExit(f"segment failed with exit code {code}")
    return {"seconds": time.perf_counter() - start}


def run_streaming(scan_path: Path, checkpoint: Path) -> dict:
    from clipseg3d.data.scans import read_scan
    from clipseg3d.inference.masks import scan_masks
    from clipseg3d.inference.pipeline import CheckpointSettings, model_grid_probabilities
    from clipseg3d.inference.postprocess import PostprocessConfig
    from clipseg3d.inference.sliding_window import StreamingInferer
    from clipseg3d.models.checkpoint import load_model

    model, meta = load_model(checkpoint)
    settings = CheckpointSettings.from_dict(meta["preprocessing"])
    times = {}
    start = time.perf_counter()
    scan = read_scan(scan_path)
    image, grid = settings.preprocessing(scan)
    times["preprocess"] = time.perf_counter() - start
    inferer = StreamingInferer(settings.roi_size, settings.overlap)
    probabilities = model_grid_probabilities(model, image, model.class_names, inferer)
    times["windows"] = time.perf_counter() - start - times["preprocess"]
    report_stage(times)
    masks, _ = scan_masks(grid, probabilities, model.class_names, model.catalog, PostprocessConfig())
    times["mask_voxels"] = int(sum(np.count_nonzero(mask) for mask in masks.values()))
    times["seconds"] = time.perf_counter() - start
    times["to_scan"] = times["seconds"] - times["windows"] - times["preprocess"]
    return times


def run_monai(scan_path: Path, checkpoint: Path) -> dict:
    from monai.data import MetaTensor
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing

    from clipseg3d.data.scans import read_scan
    from clipseg3d.models.checkpoint import load_model

    model, meta = load_model(checkpoint)
    times = {}
    start = time.perf_counter()
    scan = read_scan(scan_path)
    spatial = Compose([Orientation(axcodes="RAS", labels=None),
                       Spacing(pixdim=MODEL_SPACING_MM, mode="bilinear", padding_mode="border", dtype=np.float32)])
    image = spatial(MetaTensor(torch.from_numpy(scan.array)[None], affine=torch.as_tensor(scan.affine)))
    low, high = meta["preprocessing"]["hu_window"]
    image = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    times["preprocess"] = time.perf_counter() - start
    inferer = SlidingWindowInferer(ROI, sw_batch_size=1, overlap=OVERLAP, mode="gaussian")
    with torch.inference_mode():
        probabilities = torch.sigmoid_(inferer(image[None], model).as_tensor())[0]
    times["windows"] = time.perf_counter() - start - times["preprocess"]
    report_stage(times)
    probabilities = MetaTensor(probabilities, meta=image.meta, applied_operations=image.applied_operations)
    on_scan = spatial.inverse(probabilities)  # [K, *scan shape] float32
    times["mask_voxels"] = int((on_scan >= 0.5).sum())
    times["seconds"] = time.perf_counter() - start
    times["to_scan"] = times["seconds"] - times["windows"] - times["preprocess"]
    return times


def run_validation(folder: Path, checkpoint: Path) -> dict:
    import lightning as L

    from clipseg3d.data.datamodule import CTDataModule
    from clipseg3d.training.task import UniversalSegmentation

    task = UniversalSegmentation(init_from=str(checkpoint), roi_size=tuple(ROI), sw_overlap=OVERLAP)
    data = CTDataModule(val_manifests=[str(folder / "val.jsonl")], classes=task.class_names,
                        spacing=tuple(MODEL_SPACING_MM), crop_size=tuple(ROI))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False)
    start = time.perf_counter()
    (scores,) = trainer.validate(task, datamodule=data, verbose=False)
    return {"seconds": time.perf_counter() - start, "dice_mean": float(scores.get("val/dice_mean", float("nan")))}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    scan, checkpoint = folder / "scan.nii", folder / "model.ckpt"
    if args.child == "segment":
        result = run_segment(scan, checkpoint, folder / "out")
    elif args.child == "streaming":
        result = run_streaming(scan, checkpoint)
    elif args.child == "validation":
        result = run_validation(folder, checkpoint)
    else:
        result = run_monai(scan, checkpoint)
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result))


def measure(method: str, folder: Path, threads: int, memory_limit_gb: float) -> dict:
    """Run one method in a child process whose address space is capped, so that a pipeline that
    does not fit fails with a memory error instead of waking the kernel's OOM killer."""
    command = [sys.executable, __file__, "--child", method, "--folder", str(folder), "--threads", str(threads)]
    limit = int(memory_limit_gb * 1024 ** 3)

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    process = subprocess.run(command, capture_output=True, text=True, preexec_fn=cap_memory)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    stages = [json.loads(line[len("STAGE "):]) for line in process.stdout.splitlines() if line.startswith("STAGE ")]
    windows_peak = {"windows_peak_rss_gb": stages[-1]["peak_rss_gb"]} if stages else {}
    if process.returncode or not lines:
        error = (process.stderr.strip().splitlines() or [f"exit code {process.returncode}"])[-1]
        return {**(stages[-1] if stages else {}), **windows_peak, "error": error}
    return {**json.loads(lines[-1][len("RESULT "):]), **windows_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="256 x 256 x 150 voxels instead of 512 x 512 x 300")
    size.add_argument("--model-grid", action="store_true", help="320 x 320 x 200 voxels at the model's 1.5 mm")
    parser.add_argument("--methods", nargs="+", default=["segment", "streaming", "monai"], choices=METHODS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    total_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    parser.add_argument("--memory-limit-gb", type=float, default=round(0.75 * total_gb, 1),
                        help="address-space cap per measured process (default: 75%% of physical memory)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape, voxel_mm = SCANS["quick" if args.quick else "model-grid" if args.model_grid else "full"]
    with tempfile.TemporaryDirectory(prefix="clipseg3d-bench-") as temp:
        folder = Path(temp)
        write_scan(folder / "scan.nii", shape, voxel_mm)
        write_checkpoint(folder / "model.ckpt")
        scan_text = f"{shape[0]}x{shape[1]}x{shape[2]} @ {'x'.join(map(str, voxel_mm))} mm"
        print("| scan | classes | method | threads | time (s) | windows (s) | to scan grid (s) "
              "| peak RSS after windows (GB) | peak RSS (GB) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for method in args.methods:
            result = measure(method, folder, args.threads, args.memory_limit_gb)
            cells = [f"{result[key]:.1f}" if key in result else "" for key in ("seconds", "windows", "to_scan")]
            cells.append(f"{result['windows_peak_rss_gb']:.2f}" if "windows_peak_rss_gb" in result else "")
            if "error" in result:
                cells[0] = f"failed: {result['error']}"
                cells.append("")
            else:
                cells.append(f"{result['peak_rss_gb']:.2f}")
            print(f"| {scan_text} | 32 | {method} | {args.threads} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
