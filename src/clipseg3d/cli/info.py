"""``clipseg3d info``: what a checkpoint holds: classes, preprocessing, text encoder, architecture,
and where its weights came from (training, fine-tuning, or an imported release)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from clipseg3d.cli.parsing import CommandParser, command_parser, fail
from clipseg3d.models.checkpoint import CheckpointError, load_model
from clipseg3d.models.importer import IMPORT_KEY
from clipseg3d.models.model import UniversalModel


def build_parser() -> CommandParser:
    parser = command_parser("info", "Describe a clipseg3d checkpoint.")
    parser.add_argument("checkpoint", type=Path, help="a clipseg3d checkpoint (read as data only)")
    return parser


def _values(values: Sequence[Any] | None) -> str:
    return " x ".join(f"{value:g}" for value in values) if values else "native"


def preprocessing_line(recorded: dict[str, Any]) -> str:
    window = recorded.get("hu_window")
    hu = f"HU [{window[0]:g}, {window[1]:g}] -> [0, 1]" if window else "default HU window"
    return (f"{recorded.get('orientation', 'RAS')}, spacing {_values(recorded.get('spacing'))} mm, "
            f"{hu}, window {_values(recorded.get('roi_size'))}, "
            f"overlap {recorded.get('sw_overlap', 0.5):g}")


def architecture_lines(model: UniversalModel, meta: dict[str, Any]) -> list[str]:
    backbone = meta["backbone"]
    arguments = ", ".join(f"{key}={value}" for key, value in backbone["init_args"].items())
    count = sum(parameter.numel() for parameter in model.parameters())
    lines = [f"architecture: {backbone['name']} backbone ({arguments}), {meta['head'].get('kind', 'dynamic')} head, "
             f"{count:,} parameters"]
    if not getattr(model.backbone, "batch_independent", True):
        lines.append("note: its normalisation uses each window's own statistics, so windows run one per forward")
    return lines


def provenance_lines(meta: dict[str, Any]) -> list[str]:
    imported = meta.get(IMPORT_KEY)
    if imported:
        embeddings = imported["text_embeddings"]
        origin = embeddings["file"] + (f" (sha256 {embeddings['sha256']})" if "sha256" in embeddings else "")
        return [f"provenance: imported from {imported['source_file']} (sha256 {imported['sha256']}), "
                f"{imported['arch']} weights in the {imported['layout']} layout",
                f"text embeddings: {origin}", f"licence: {imported['licence']}"]
    finetune = meta.get("finetune")
    if finetune:
        added = ", ".join(finetune.get("new_classes", [])) or "none"
        return [f"provenance: fine-tuned ({finetune['mode']}) from {finetune['init_from']}; new classes: {added}"]
    return ["provenance: trained with clipseg3d"]


def class_lines(meta: dict[str, Any]) -> list[str]:
    imported = IMPORT_KEY in meta
    lines = [f"classes ({len(meta['classes'])}):"]
    for number, entry in enumerate(meta["classes"], start=1):
        source = f"imported, {entry['source']} entry" if imported else entry["source"]
        lines.append(f"  {number:3d}  {entry['name']:<28} {entry['kind']:<7} {source}")
    return lines


def describe(path: Path) -> str:
    model, meta = load_model(path)
    lines = [f"checkpoint: {path}", *architecture_lines(model, meta), f"text encoder: {meta['text_encoder']}",
             f"preprocessing: {preprocessing_line(meta.get('preprocessing', {}))}", *provenance_lines(meta),
             *class_lines(meta)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``clipseg3d info CKPT``: prints the description; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        print(describe(args.checkpoint))
    except CheckpointError as err:
        return fail(parser.prog, err)
    return 0
