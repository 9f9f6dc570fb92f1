"""``clipseg3d index``: find a dataset's (image, label) pairs and write a JSON-lines manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clipseg3d.cli.parsing import CommandParser, command_parser, fail
from clipseg3d.data.index import LayoutError, find_cases, write_manifest
from clipseg3d.data.labelmap import LabelMapError, available_label_maps
from clipseg3d.data.splits import SPLIT_SUFFIX, SplitError, check_fractions, plan_split, write_split


def build_parser() -> CommandParser:
    parser = command_parser("index", "Find a dataset's (image, label) pairs and write a JSON-lines manifest.",
                            epilog=f"built-in datasets: {', '.join(available_label_maps())}")
    parser.add_argument("dataset", help="a built-in dataset name or a label-map YAML path")
    parser.add_argument("root", type=Path, help="the dataset's root folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    parser.add_argument("--skip-unlabelled", action="store_true", help="leave out images that have no label")
    parser.add_argument("--split", nargs=3, type=float, metavar=("TRAIN", "VAL", "TEST"),
                        help=f"also write the manifest's seeded train/val/test split (<manifest>{SPLIT_SUFFIX}), "
                        "e.g. 0.7 0.1 0.2; fit, test and evaluate read it")
    parser.add_argument("--seed", type=int, default=0, help="seed of --split")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``clipseg3d index DATASET ROOT -o manifest.jsonl [--split TRAIN VAL TEST --seed N]``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.split:
        try:
            check_fractions(args.split)
        except SplitError as err:
            parser.error(f"--split: {err}")
    try:
        if args.output.exists() and not args.overwrite:
            raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
        records, skipped = find_cases(args.dataset, args.root, None, args.skip_unlabelled)
        planned = plan_split(args.output, [record["case"] for record in records], args.split, args.seed,
                             args.overwrite) if args.split else None
        write_manifest(records, args.output, overwrite=args.overwrite)
        split = write_split(args.output, planned) if planned else None
    except (LayoutError, LabelMapError, SplitError, FileExistsError, OSError) as err:
        return fail(parser.prog, err)
    note = f" ({len(skipped)} images without a label left out)" if skipped else ""
    print(f"wrote {len(records)} cases of {args.dataset} to {args.output}{note}")
    if split:
        counts = ", ".join(f"{len(planned[part])} {part}" for part in ("train", "val", "test"))
        print(f"wrote the split ({counts}; seed {args.seed}) to {split}")
    return 0
