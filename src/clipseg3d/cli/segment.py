"""``clipseg3d segment``: segment CT scans with a trained checkpoint and write the results.

Per scan: read (NIfTI or DICOM series) -> the checkpoint's preprocessing -> sliding window ->
sigmoid probabilities -> back onto the scan's own grid -> post-processing -> outputs in
``OUT/<scan name>/`` (see :mod:`clipseg3d.inference.pipeline`).

Reruns. A scan whose folder records this input, checkpoint (sha256), classes and settings is
skipped; a folder made from anything else is segmented again and replaced as a whole. Every
skip, redo and failure is one line on stderr; a failed scan leaves nothing behind and the
others go on. Exit status: 0, 1 when any scan failed, 2 for an unusable command line.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from clipseg3d.catalog import CatalogError
from clipseg3d.cli.parsing import CommandParser, command_parser, error_line
from clipseg3d.data.scans import ScanError, ScanWarning, find_scans, read_scan, scan_stem
from clipseg3d.files import UnsafeFileError
from clipseg3d.inference.onnx_backbone import onnx_backbone, openvino_backbone
from clipseg3d.inference.outputs import (
    clear_leftovers,
    partial_folder,
    publish_folder,
    read_record,
    record_difference,
)
from clipseg3d.inference.pipeline import CheckpointSettings, OutputSettings, Segmenter
from clipseg3d.inference.postprocess import PostprocessConfig
from clipseg3d.inference.sliding_window import StreamingInferer, cpu_runs_bfloat16
from clipseg3d.models.checkpoint import CheckpointError
from clipseg3d.models.class_matching import resolve_class_names
from clipseg3d.models.importer import IMPORT_KEY, WeightImportError, open_model, sha256_of
from clipseg3d.models.released import LayoutError

PROG = "clipseg3d segment"
#: The output folder name of a scan whose name gives none (``.nii.gz`` in the root folder).
FALLBACK_NAME = "scan"
ALREADY_DONE = "already done with this checkpoint and settings (--overwrite to redo)"
#: ``--fast``: the finest model grid it accepts (mm)
FAST_MIN_SPACING_MM = 3.0


class SegmentError(ValueError):
    """A command line that cannot be carried out (bad options, output folder, checkpoint)."""


# -- output folders -------------------------------------------------------------------------------
def _name_parts(path: Path) -> list[str]:
    """The folders and stem that may name ``path``'s outputs: none empty, none starting with a dot."""
    parts = [part.strip().lstrip(".").strip() for part in (*path.parent.parts, scan_stem(path))]
    return [part for part in parts if part and os.sep not in part] or [FALLBACK_NAME]


def output_names(scans: Sequence[Path]) -> list[str]:
    """A distinct, non-empty output folder name per scan: its stem (its folder's name where the stem is
    empty), prefixed by parent folders where that tells clashing names apart, numbered where not."""
    parts = [_name_parts(Path(scan)) for scan in scans]
    depth = [1] * len(scans)
    while True:
        names = ["_".join(items[-count:]) for items, count in zip(parts, depth)]
        clashing = [index for index, name in enumerate(names) if depth[index] < len(parts[index])
                    and any(other == name and parts[j] != parts[index] for j, other in enumerate(names))]
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


def check_writable(output_dir: Path) -> None:
    """Refuse an output path that is a file, or lies in a folder this user cannot write."""
    existing = Path(os.path.abspath(output_dir))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == Path(os.path.abspath(output_dir)) else f" ({existing} is a file)"
        raise SegmentError(f"-o {output_dir} is a file, not a folder{where}; give a folder (it is created if "
                           "missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SegmentError(f"-o {output_dir}: {existing} is not writable; make it writable or choose another -o")


# -- the command line -----------------------------------------------------------------------------
def build_parser() -> CommandParser:
    parser = command_parser("segment", "Segment CT scans (NIfTI files, folders of them, DICOM series folders) "
                            "with a trained checkpoint; writes OUT/<scan>/labels.nii.gz, classes.json, masks/, "
                            "report.json, overlay.png. A rerun skips the scans already done with the same "
                            "checkpoint and settings.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="NIfTI files, folders, DICOM series")
    parser.add_argument("--ckpt", required=True, type=Path, help="trained clipseg3d checkpoint, or a released "
                        "Universal Model / SuPreM weight file (imported in memory)")
    parser.add_argument("--text-embeddings", type=Path, help="txt_encoding.pth for a released weight file that "
                        "has no class embeddings of its own")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (one subfolder per scan)")
    parser.add_argument("--classes", nargs="+", metavar="NAME", help="segment only these classes, as names, "
                        "aliases or plain words; null: all")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="null: cuda when available, else cpu")
    parser.add_argument("--roi", nargs=3, type=int, metavar="N", help="window size X Y Z; null: the checkpoint's")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1); null: the checkpoint's")
    parser.add_argument("--sw-batch", type=int, default=1, metavar="N", help="windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="average over flips (anterior-posterior, superior-inferior)")
    parser.add_argument("--fast", action="store_true", help="a whole CT in seconds: needs a checkpoint trained on a "
                        f"grid of {FAST_MIN_SPACING_MM:g} mm or coarser (as the demo's); the windows keep the "
                        "checkpoint's overlap")
    parser.add_argument("--compile", action="store_true", help="run the dynamic head as one compiled kernel "
                        "(torch.compile: a one-off compile of seconds, then a head several times faster; same "
                        "outputs to float precision)")
    parser.add_argument("--channels-last", action="store_true", help="hand the network channels-last windows "
                        "(faster convolutions on many CPUs; same outputs to float precision)")
    parser.add_argument("--bfloat16", action="store_true", help="run the network under bfloat16 autocast (faster "
                        "where the CPU has bf16 instructions; masks differ slightly; a CPU without AVX-512 runs "
                        "float32 after one line)")
    parser.add_argument("--onnx", action="store_true", help="run the backbone with ONNX Runtime on the CPU (the "
                        "optional extra clipseg3d[onnx]; without it, one line says so and PyTorch runs it)")
    parser.add_argument("--openvino", action="store_true", help="run the backbone with OpenVINO on the CPU (the "
                        "optional extra clipseg3d[openvino]; in bfloat16 with --bfloat16; without it, one line "
                        "says so and PyTorch runs it)")
    parser.add_argument("--probabilities", action="store_true", help="write probabilities/CLASS.nii.gz (uint8, "
                        "scale slope 1/255)")
    parser.add_argument("--all-masks", action="store_true", help="write masks/CLASS.nii.gz for every class "
                        "(without it: only classes that overlap, tumours and their parents)")
    parser.add_argument("--dicom-seg", action="store_true", help="also write seg.dcm for DICOM inputs")
    parser.add_argument("--overwrite", action="store_true", help="redo scans that are already done")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold in (0, 1]")
    parser.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    parser.add_argument("--clean-nonfinite", action="store_true", help="replace NaN and infinite voxels by the "
                        "scan's lowest value, with a warning (without it such scans are refused)")
    return parser


def check_options(parser: CommandParser, args) -> None:
    """Options that no checkpoint can make usable end the run with status 2."""
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        parser.error(f"--overlap {args.overlap}: must be in [0, 1)")
    if args.sw_batch < 1:
        parser.error(f"--sw-batch {args.sw_batch}: must be at least 1")
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")


def open_checkpoint(path: Path, device: str, text_embeddings: Path | None = None):
    """The checkpoint's model and metadata, a released weight file imported in memory (said in one
    line); any unusable file is one :class:`SegmentError` line."""
    try:
        model, meta, imported = open_model(path, text_embeddings, map_location=device)
    except (CheckpointError, WeightImportError, UnsafeFileError) as err:
        raise SegmentError(str(err)) from err
    except LayoutError as err:
        raise SegmentError(f"{path}: neither a clipseg3d checkpoint nor released Universal Model / SuPreM "
                           f"weights ({err})") from err
    except KeyError as err:
        key = err.args[0] if err.args else "?"
        detail = key if isinstance(key, str) and " " in key else f"its metadata lacks the key {key!r}"
    except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as err:
        detail = f"{type(err).__name__}: {err}"
    else:
        if imported:
            record = meta[IMPORT_KEY]
            print(f"note: {path}: released weights imported in memory ({record['arch']}, {record['layout']}, "
                  f"{len(meta['classes'])} classes); clipseg3d import-weights saves them as a checkpoint",
                  file=sys.stderr)
        return model, meta
    raise SegmentError(f"{path}: not a usable clipseg3d checkpoint ({detail}); give a checkpoint written by "
                       "clipseg3d (clipseg3d info CKPT describes one)")


def chosen_classes(model, names: Sequence[str] | None) -> list[str]:
    """The model's classes named by ``--classes`` (all by default), in the model's order; notes to stderr."""
    if not names:
        return model.class_names
    try:
        resolved, notes = resolve_class_names(names, model.catalog, model.text_encoder)
    except CatalogError as err:
        raise SegmentError(f"--classes: {err}; this checkpoint segments {', '.join(model.class_names)}") from err
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return [name for name in model.class_names if name in set(resolved)]


def load_segmenter(args) -> Segmenter:
    """The model and run settings from parsed arguments; raises :class:`SegmentError` on bad options."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = open_checkpoint(args.ckpt, device, args.text_embeddings)
    class_names = chosen_classes(model, args.classes)
    recorded = CheckpointSettings.from_dict(meta.get("preprocessing"))
    roi_size = tuple(args.roi or recorded.roi_size)
    multiple = model.backbone.size_multiple
    if any(size < 1 or size % multiple for size in roi_size):
        raise SegmentError(f"--roi {' '.join(map(str, roi_size))}: the {model.backbone.registry_name} backbone "
                           f"needs window sizes that are positive multiples of {multiple}")
    overlap = float(args.overlap if args.overlap is not None else recorded.overlap)
    preprocessing = recorded.preprocessing
    if args.fast and (preprocessing.spacing is None or min(preprocessing.spacing) < FAST_MIN_SPACING_MM):
        grid = "the scan's own grid" if preprocessing.spacing is None else \
            f"{'x'.join(f'{size:g}' for size in preprocessing.spacing)} mm"
        raise SegmentError(f"--fast: {args.ckpt} was trained on {grid}; --fast needs a checkpoint trained on a grid "
                           f"of {FAST_MIN_SPACING_MM:g} mm or coarser (segment without --fast)")
    if args.onnx and args.openvino:
        raise SegmentError("--onnx and --openvino each run the backbone; choose one")
    if (args.onnx or args.openvino) and device != "cpu":
        raise SegmentError(f"--{'onnx' if args.onnx else 'openvino'} runs the backbone on the CPU; use it with "
                           "--device cpu")
    bfloat16 = args.bfloat16
    if bfloat16 and device == "cpu" and not cpu_runs_bfloat16():
        _say("note: this CPU has no bfloat16 convolutions (they need AVX-512) and would run --bfloat16 about "
             "100x slower; the network runs in float32")
        bfloat16 = False
    if args.onnx:
        model.backbone = onnx_backbone(model.backbone, roi_size, say=_say)
    if args.openvino:
        model.backbone = openvino_backbone(model.backbone, roi_size, bfloat16=bfloat16, say=_say)
    if args.compile:
        if not hasattr(model.head, "fused"):
            raise SegmentError(f"--compile: {args.ckpt} has the released weights' head, which has no compiled "
                               "kernel (segment without --compile)")
        model.head.fused = True
    settings = OutputSettings(postprocess=PostprocessConfig(default_threshold=args.threshold),
                              all_masks=args.all_masks, probabilities=args.probabilities,
                              dicom_seg=args.dicom_seg, overlay=not args.no_overlay,
                              hu_window=preprocessing.hu_window)
    inferer = StreamingInferer(roi_size, overlap, sw_batch_size=args.sw_batch, tta=args.tta, progress=True,
                               channels_last=args.channels_last, bfloat16=bfloat16)
    return Segmenter(model=model, checkpoint=args.ckpt, class_names=class_names, preprocessing=preprocessing,
                     inferer=inferer, settings=settings, checkpoint_sha256=sha256_of(args.ckpt))


# -- one scan -------------------------------------------------------------------------------------
def one_line(err: BaseException, path: Path) -> str:
    """An error as one line that names the scan."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (ScanError, OSError)):
        text = f"{type(err).__name__}: {text}"
    return text if str(path) in text else f"{path}: {text}"


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def plan(final: Path, record: dict[str, Any], overwrite: bool) -> tuple[str, str]:
    """``("new" | "skip" | "redo" | "refuse", why)`` for a scan whose outputs go to ``final``."""
    if not final.exists() and not final.is_symlink():
        return "new", ""
    if overwrite:
        return "redo", ""
    if not final.is_dir() or final.is_symlink():
        return "refuse", f"{final} is in the way (not an output folder); move it away or use --overwrite"
    old = read_record(final)
    if old is None:
        return "refuse", (f"{final} exists but holds no clipseg3d report.json; move it away or use --overwrite to "
                          "replace it")
    reason = record_difference(old, record)
    return ("skip", ALREADY_DONE) if reason is None else ("redo", f"{reason}; segmenting it again")


def read_input(path: Path, clean_nonfinite: bool):
    """The scan at ``path``; its :class:`ScanWarning` as ``warning:`` lines, the NaN refusal naming the option."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scan = read_scan(path, nonfinite="clean" if clean_nonfinite else "refuse")
        except ScanError as err:
            raise ScanError(str(err).replace("read it with nonfinite='clean'", "rerun with --clean-nonfinite")) from err
    for warning in caught:
        if not issubclass(warning.category, ScanWarning):  # not about the scan: as Python shows it
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        text = " ".join(str(warning.message).split())
        _say(f"warning: {text if str(path) in text else f'{path}: {text}'}")
    return scan


def segment_scan(segmenter: Segmenter, path: Path, final: Path, clean_nonfinite: bool) -> None:
    """Segment one scan into ``final`` via a partial folder; nothing of it is left when it fails."""
    partial = None
    try:
        scan = read_input(path, clean_nonfinite)
        if segmenter.settings.dicom_seg and scan.kind != "dicom":
            _say(f"note: {path}: not a DICOM series; no seg.dcm written")
        partial = partial_folder(final.parent, final.name)
        segmenter.segment(scan, partial)
        if final.is_symlink() or (final.exists() and not final.is_dir()):
            final.unlink()
        publish_folder(partial, final)
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise


# -- the command ----------------------------------------------------------------------------------
def gather_scans(inputs: Sequence[Path]) -> tuple[list[Path], int]:
    """The scans of every input, in order, and the number of inputs that named none (each one line)."""
    scans: list[Path] = []
    failures = 0
    for item in inputs:
        try:
            scans.extend(path for path in find_scans([item]) if path not in scans)
        except ScanError as err:
            _say(error_line(PROG, one_line(err, item)))
            failures += 1
    return scans, failures


def run_scans(segmenter: Segmenter, scans: Sequence[Path], args) -> tuple[int, int, int]:
    """Segment, skip or redo each scan; returns the counts (segmented, skipped, failed)."""
    done = skipped = failures = 0
    progress = tqdm(list(zip(scans, output_names(scans))), desc="segment", unit="scan", file=sys.stderr)
    for path, name in progress:
        final = args.output / name
        clear_leftovers(args.output, name)
        action, why = plan(final, segmenter.record(path), args.overwrite)
        if action == "skip":
            _say(f"skip: {name}: {why}")
            skipped += 1
            continue
        if action == "refuse":
            _say(error_line(PROG, f"{name}: {why}"))
            failures += 1
            continue
        if why:
            _say(f"redo: {name}: {why}")
        progress.set_postfix_str(name)
        try:
            segment_scan(segmenter, path, final, args.clean_nonfinite)
            done += 1
        except Exception as err:  # one bad scan must not stop the batch
            failures += 1
            _say(error_line(PROG, one_line(err, path)))
    return done, skipped, failures


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipseg3d segment``; 0 when every scan succeeded, 1 when any failed, 2 on unusable options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    scans, failures = gather_scans(args.inputs)
    try:
        check_output_folder(args.output, args.inputs, scans)
        check_writable(args.output)
        segmenter = load_segmenter(args)
    except SegmentError as err:
        print(error_line(PROG, err), file=sys.stderr)
        return 2
    done, skipped, failed = run_scans(segmenter, scans, args)
    failures += failed
    counts = f"{done} segmented, {skipped} already done; outputs in {args.output}"
    if failures:
        total = len(scans) + failures - failed  # scans, and inputs that named none
        print(error_line(PROG, f"{failures} of {total} scans failed (listed above); {counts}"), file=sys.stderr)
        return 1
    print(counts, file=sys.stderr)
    return 0
