"""``clipseg3d segment``: segment CT scans with a trained checkpoint and write the results.

Per scan: read (NIfTI or DICOM series) -> the checkpoint's preprocessing -> sliding window ->
sigmoid probabilities -> back onto the scan's own grid -> post-processing -> outputs in
``OUT/<scan name>/`` (see :mod:`clipseg3d.inference.pipeline`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from clipseg3d.catalog import CatalogError
from clipseg3d.data.scans import ScanError, find_scans, read_scan, scan_stem
from clipseg3d.inference.outputs import partial_folder, publish_folder
from clipseg3d.inference.pipeline import CheckpointSettings, OutputSettings, Segmenter
from clipseg3d.inference.postprocess import PostprocessConfig
from clipseg3d.inference.sliding_window import StreamingInferer
from clipseg3d.models.checkpoint import CheckpointError, load_model


class SegmentError(ValueError):
    """A command line that cannot be carried out (bad options, output folder, checkpoint)."""


def output_names(scans: Sequence[Path]) -> list[str]:
    """A distinct output folder name per scan: its stem, prefixed by parent folders where stems clash."""
    depth = [0] * len(scans)

    def candidate(index: int) -> str:
        path = Path(scans[index])
        parents = [part for part in path.parent.parts if part not in ("/", "")]
        return "_".join(parents[len(parents) - depth[index]:] + [scan_stem(path)]) if depth[index] else scan_stem(path)

    while True:
        names = [candidate(index) for index in range(len(scans))]
        clashing = [index for index, name in enumerate(names) if names.count(name) > 1
                    and depth[index] < len(Path(scans[index]).parent.parts)]
        if not clashing:
            break
        for index in clashing:
            depth[index] += 1
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def check_output_folder(output_dir: Path, inputs: Sequence[Path], scans: Sequence[Path]) -> None:
    """Refuse an output folder inside (or equal to) an input folder, or one that holds an input."""
    def spellings(path: Path) -> set[Path]:  # as given and with links resolved
        return {Path(os.path.abspath(path)), Path(path).resolve()}

    outs = spellings(output_dir)
    for folder in (Path(item) for item in list(inputs) + list(scans) if Path(item).is_dir()):
        if any(out == name or name in out.parents for out in outs for name in spellings(folder)):
            raise SegmentError(f"output folder {output_dir} is inside the input folder {folder}; choose another -o")
    for scan in scans:
        if any(out in name.parents for out in outs for name in spellings(scan)):
            raise SegmentError(f"input {scan} lies inside the output folder {output_dir}; choose another -o")


def one_line(err: BaseException, path: Path) -> str:
    """An error as one line that names the scan."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, ScanError):
        text = f"{type(err).__name__}: {text}"
    return text if str(path) in text else f"{path}: {text}"


# -- the command --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipseg3d segment", description="Segment CT scans (NIfTI files, folders of them, DICOM series "
        "folders) with a trained checkpoint; writes OUT/<scan>/labels.nii.gz, classes.json, masks/, report.json, "
        "overlay.png.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    parser.add_argument("--ckpt", required=True, type=Path, help="trained clipseg3d checkpoint")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (one subfolder per scan)")
    parser.add_argument("--classes", nargs="+", metavar="NAME", help="segment only these classes (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--roi", nargs=3, type=int, metavar=("X", "Y", "Z"), help="window size (default: checkpoint's)")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: checkpoint's)")
    parser.add_argument("--sw-batch", type=int, default=1, metavar="N", help="windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="average over flips (anterior-posterior, superior-inferior)")
    parser.add_argument("--probabilities", action="store_true", help="write probabilities/<class>.nii.gz (uint8, "
                        "scale slope 1/255)")
    parser.add_argument("--all-masks", action="store_true", help="write masks/<class>.nii.gz for every class "
                        "(default: only classes that overlap: tumours and their parents)")
    parser.add_argument("--dicom-seg", action="store_true", help="also write seg.dcm for DICOM inputs")
    parser.add_argument("--overwrite", action="store_true", help="redo scans whose output folder exists")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    parser.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    return parser


def load_segmenter(args: argparse.Namespace) -> Segmenter:
    """The model and run settings from parsed arguments; raises :class:`SegmentError` on bad options."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SegmentError("--device cuda: no CUDA device is available")
    try:
        model, meta = load_model(args.ckpt, map_location=device)
        class_names = model.class_names
        if args.classes:
            wanted = set(model.catalog.resolve(args.classes))
            class_names = [name for name in model.class_names if name in wanted]
    except (CheckpointError, CatalogError) as err:
        raise SegmentError(str(err)) from err
    recorded = CheckpointSettings.from_dict(meta.get("preprocessing"))
    roi_size = tuple(args.roi or recorded.roi_size)
    multiple = model.backbone.size_multiple
    if any(size < 1 or size % multiple for size in roi_size):
        raise SegmentError(f"--roi {' '.join(map(str, roi_size))}: the {model.backbone.registry_name} backbone "
                           f"needs window sizes that are positive multiples of {multiple}")
    overlap = float(args.overlap if args.overlap is not None else recorded.overlap)
    if not 0.0 <= overlap < 1.0:
        raise SegmentError(f"--overlap {overlap}: must be in [0, 1)")
    if args.sw_batch < 1:
        raise SegmentError(f"--sw-batch {args.sw_batch}: must be at least 1")
    if not 0.0 < args.threshold <= 1.0:
        raise SegmentError(f"--threshold {args.threshold}: must be in (0, 1]")
    preprocessing = recorded.preprocessing
    settings = OutputSettings(postprocess=PostprocessConfig(default_threshold=args.threshold),
                              all_masks=args.all_masks, probabilities=args.probabilities,
                              dicom_seg=args.dicom_seg, overlay=not args.no_overlay,
                              hu_window=preprocessing.hu_window)
    inferer = StreamingInferer(roi_size, overlap, sw_batch_size=args.sw_batch, tta=args.tta, progress=True)
    return Segmenter(model=model, checkpoint=args.ckpt, class_names=class_names, preprocessing=preprocessing,
                     inferer=inferer, settings=settings)


def _error(message: str) -> None:
    tqdm.write(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipseg3d segment``; 0 when every scan succeeded, 1 when any failed, 2 on unusable options."""
    args = build_parser().parse_args(argv)
    failures = 0
    scans: list[Path] = []
    for item in args.inputs:
        try:
            scans.extend(path for path in find_scans([item]) if path not in scans)
        except ScanError as err:
            _error(one_line(err, item))
            failures += 1
    try:
        check_output_folder(args.output, args.inputs, scans)
        segmenter = load_segmenter(args)
    except SegmentError as err:
        print(f"clipseg3d segment: error: {err}", file=sys.stderr)
        return 2
    output_dir = args.output
    output_dir.mkdir(parents=True, exist_ok=True)
    done = skipped = 0
    progress = tqdm(list(zip(scans, output_names(scans))), desc="segment", unit="scan")
    for path, name in progress:
        final = output_dir / name
        if final.exists() and not args.overwrite:
            skipped += 1
            continue
        progress.set_postfix_str(name)
        partial = None
        try:
            scan = read_scan(path)
            if args.dicom_seg and scan.kind != "dicom":
                tqdm.write(f"note: {path}: not a DICOM series; no seg.dcm written", file=sys.stderr)
            partial = partial_folder(output_dir, name)
            segmenter.segment(scan, partial)
            publish_folder(partial, final)
            done += 1
        except Exception as err:  # one bad scan must not stop the batch
            failures += 1
            _error(one_line(err, path))
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
    print(f"{done} segmented, {skipped} already done (use --overwrite to redo), {failures} failed; "
          f"outputs in {output_dir}", file=sys.stderr)
    return 1 if failures else 0
