"""``clipseg3d phantom``: write synthetic CT phantom datasets."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from clipseg3d.phantom.generate import (
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


def _contrast_arg(text: str) -> tuple[str, tuple[float, float]]:
    """``CLASS=LOW,HIGH`` -> (class, (low, high))."""
    name, _, bounds = text.partition("=")
    try:
        low, high = (float(b) for b in bounds.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CLASS=LOW,HIGH in HU, "
                                         "e.g. spleen_lesion=-60,-30") from None
    return name, (low, high)


def main(argv: list[str] | None = None) -> int:
    """``clipseg3d phantom``: write synthetic CT datasets."""
    parser = argparse.ArgumentParser(prog="clipseg3d phantom", description="Write synthetic CT phantom "
                                     "datasets (MSD layout, dataset.json and a label-map YAML).")
    parser.add_argument("--out", type=Path, required=True, help="output folder (empty, new or a phantom dataset)")
    parser.add_argument("--cases", type=int, required=True, help="cases (per dataset with --multi)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--site", choices=list(SITES), default=None,
                        help="scanner preset (default: 'default'; with --multi each dataset's own)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="voxel size in mm")
    parser.add_argument("--multi", action="store_true", help=f"write {', '.join(MULTI_DATASETS)}")
    parser.add_argument("--extra-classes", nargs="+", default=[], choices=list(EXTRA_CLASSES),
                        help="label classes outside the built-in catalog")
    parser.add_argument("--min-tumour-mm", type=float, default=5.0, help="smallest lesion diameter")
    parser.add_argument("--lesion-contrast", nargs="+", default=[], metavar="CLASS=LOW,HIGH", type=_contrast_arg,
                        help="a lesion class's HU range relative to its parent (e.g. spleen_lesion=-60,-30)")
    parser.add_argument("--name", default="phantom", help="dataset name (single dataset)")
    parser.add_argument("--no-tumours", action="store_true", help="draw no lesions")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.multi:
            folders = write_multi_dataset(args.out, args.cases, args.seed, args.site, args.spacing,
                                          args.extra_classes, args.min_tumour_mm,
                                          lesion_contrast=dict(args.lesion_contrast), workers=args.workers)
        else:
            folders = [write_dataset(args.out, args.cases, args.seed, args.site or "default", args.spacing,
                                     None, args.name, args.extra_classes, args.min_tumour_mm,
                                     not args.no_tumours, lesion_contrast=dict(args.lesion_contrast),
                                     workers=args.workers)]
    except (ValueError, OSError) as err:
        print(f"clipseg3d phantom: error: {err}", file=sys.stderr)
        return 1
    for folder in folders:
        print(_summary(folder))
    print(f"{len(folders)} dataset(s) in {time.perf_counter() - start:.1f} s")
    return 0

