"""``clipseg3d phantom``: write synthetic CT phantom datasets."""

from __future__ import annotations

import json
import time
from pathlib import Path

from clipseg3d.cli.parsing import CommandParser, command_parser, fail
from clipseg3d.phantom import (
    EXTRA_CLASSES,
    MARKER,
    MULTI_DATASETS,
    SITES,
    write_dataset,
    write_multi_dataset,
)


def _summary(folder: Path) -> str:
    dataset = json.loads((folder / "dataset.json").read_text())
    marker = json.loads((folder / MARKER).read_text())
    shape = "x".join(map(str, marker["cases"][0]["shape"]))
    lesions = sum(len(c["lesions"]) for c in marker["cases"])
    count = dataset["numTraining"]
    return (f"{folder}: {count} case{'s' * (count != 1)}, {len(dataset['labels']) - 1} labels, site {marker['site']}, "
            f"{shape} voxels, {lesions} lesions")


def lesion_contrasts(texts: list[str]) -> dict[str, tuple[float, float]]:
    """``CLASS=LOW,HIGH`` items -> {class: (low, high)}; a ValueError names the first malformed one."""
    contrasts = {}
    for text in texts:
        name, _, bounds = text.partition("=")
        try:
            low, high = (float(b) for b in bounds.split(","))
        except ValueError:
            raise ValueError(f"argument --lesion-contrast: {text!r}: expected CLASS=LOW,HIGH in HU, "
                             "e.g. spleen_lesion=-60,-30") from None
        contrasts[name] = (low, high)
    return contrasts


def build_parser() -> CommandParser:
    parser = command_parser("phantom", "Write synthetic CT phantom datasets (MSD layout, dataset.json and a "
                            "label-map YAML).")
    parser.add_argument("--out", type=Path, required=True, help="output folder (empty, new or a phantom dataset)")
    parser.add_argument("--cases", type=int, required=True, help="cases (per dataset with --multi)")
    parser.add_argument("--seed", type=int, required=True, help="random seed (the same seed writes the same dataset)")
    parser.add_argument("--site", choices=list(SITES), default=None,
                        help="scanner preset; when not given, 'default' (with --multi, each dataset's own)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="voxel size in mm")
    parser.add_argument("--multi", action="store_true", help=f"write {', '.join(MULTI_DATASETS)}")
    parser.add_argument("--extra-classes", nargs="+", default=[], choices=list(EXTRA_CLASSES),
                        help="label classes outside the built-in catalog")
    parser.add_argument("--min-tumour-mm", type=float, default=5.0, help="smallest lesion diameter")
    parser.add_argument("--lesion-contrast", nargs="+", default=[], metavar="CLASS=LOW,HIGH",
                        help="a lesion class's HU range relative to its parent (e.g. spleen_lesion=-60,-30)")
    parser.add_argument("--name", default="phantom", help="dataset name (single dataset)")
    parser.add_argument("--no-tumours", action="store_true", help="draw no lesions")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``clipseg3d phantom``: write synthetic CT datasets; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        contrast = lesion_contrasts(args.lesion_contrast)
    except ValueError as err:
        parser.error(str(err))
    start = time.perf_counter()
    try:
        if args.multi:
            folders = write_multi_dataset(args.out, args.cases, args.seed, args.site, args.spacing,
                                          args.extra_classes, args.min_tumour_mm,
                                          lesion_contrast=contrast, workers=args.workers)
        else:
            folders = [write_dataset(args.out, args.cases, args.seed, args.site or "default", args.spacing,
                                     None, args.name, args.extra_classes, args.min_tumour_mm,
                                     not args.no_tumours, lesion_contrast=contrast, workers=args.workers)]
    except (ValueError, OSError) as err:
        return fail(parser.prog, err)
    for folder in folders:
        print(_summary(folder))
    print(f"{len(folders)} dataset(s) in {time.perf_counter() - start:.1f} s")
    return 0
