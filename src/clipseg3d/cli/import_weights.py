"""``clipseg3d import-weights``: a released Universal Model or SuPreM weight file as a clipseg3d checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import yaml

from clipseg3d.catalog import CatalogError
from clipseg3d.cli.parsing import CommandParser, command_parser, fail
from clipseg3d.files import UnsafeFileError, replace_atomically
from clipseg3d.models.importer import WeightImportError, import_weights
from clipseg3d.models.released import LayoutError


def build_parser() -> CommandParser:
    parser = command_parser("import-weights", "Import a released CLIP-driven Universal Model or SuPreM weight "
                            "file (Swin UNETR or U-Net) as a checkpoint that clipseg3d segment reads.")
    parser.add_argument("weights", type=Path, help="the released .pth file (read as data only)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="checkpoint to write (.ckpt)")
    parser.add_argument("--text-embeddings", type=Path, help="txt_encoding.pth: the class text embeddings, "
                        "when the weight file has none (or to replace its own)")
    parser.add_argument("--arch", choices=("auto", "swinunetr", "unet"), default="auto",
                        help="the backbone (default: found from the keys)")
    parser.add_argument("--class-names", type=Path, help="YAML or JSON list of catalog class names, one per "
                        "embedding row (needed unless the file has the original 32 classes)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser


def read_class_names(path: Path) -> list[str]:
    try:
        names = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise WeightImportError(f"{path}: cannot read class names ({err})") from err
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise WeightImportError(f"{path}: expected a list of class names")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """``clipseg3d import-weights FILE -o model.ckpt``; writes nothing on any error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.output.exists() and not args.overwrite:
            raise FileExistsError(f"{args.output} exists; pass --overwrite to replace it")
        class_names = read_class_names(args.class_names) if args.class_names else None
        checkpoint = import_weights(args.weights, args.arch, args.text_embeddings, class_names)
        replace_atomically(args.output, lambda temp: torch.save(checkpoint, temp))
    except LayoutError as err:
        return fail(parser.prog, f"{args.weights}: {err}")
    except (WeightImportError, UnsafeFileError, CatalogError, OSError) as err:
        return fail(parser.prog, err)
    record = checkpoint["clipseg3d"]
    print(f"wrote {args.output}: {record['import']['arch']} ({record['import']['layout']}), "
          f"{len(record['classes'])} classes")
    return 0
