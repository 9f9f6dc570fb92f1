"""``clipseg3d index``: find a dataset's (image, label) pairs and write a JSON-lines manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clipseg3d.cli.parsing import CommandParser, command_parser, fail
from clipseg3d.data.index import LayoutError, find_cases, write_manifest
from clipseg3d.data.labelmap import LabelMapError, available_label_maps


def build_parser() -> CommandParser:
    parser = command_parser("index", "Find a dataset's (image, label) pairs and write a JSON-lines manifest.",
                            epilog=f"built-in datasets: {', '.join(available_label_maps())}")
    parser.add_argument("dataset", help="a built-in dataset name or a label-map YAML path")
    parser.add_argument("root", type=Path, help="the dataset's root folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    parser.add_argument("--skip-unlabelled", action="store_true", help="leave out images that have no label")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``clipseg3d index DATASET ROOT -o manifest.jsonl``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.output.exists() and not args.overwrite:
            raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
        records, skipped = find_cases(args.dataset, args.root, None, args.skip_unlabelled)
        write_manifest(records, args.output, overwrite=args.overwrite)
    except (LayoutError, LabelMapError, FileExistsError, OSError) as err:
        return fail(parser.prog, err)
    note = f" ({len(skipped)} images without a label left out)" if skipped else ""
    print(f"wrote {len(records)} cases of {args.dataset} to {args.output}{note}")
    return 0
