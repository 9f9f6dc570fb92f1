"""``clipseg3d evaluate``: score ``segment`` output folders against ground-truth label volumes.

Each ``--pred`` subfolder ``<case>/`` is scored against ``--gt``'s ``<case>.nii.gz``: Dice, NSD
and HD95 per class in the scan's spacing, and tumour detection. ``-o OUT`` receives
``metrics.csv``, ``summary.md`` and ``metrics.png``. A case that cannot be scored is one line on
stderr and the others are still scored; the exit status is then 1. ``--split FILE`` (a split file
of ``clipseg3d index --split``) scores only its test cases; a test case without a prediction
folder counts as failed, so a published number never silently leaves cases out.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from clipseg3d.catalog import CatalogError, ClassCatalog, load_catalog
from clipseg3d.cli.parsing import CommandParser, command_parser, error_line, fail
from clipseg3d.data.labelmap import LabelMap, available_label_maps
from clipseg3d.data.splits import SplitError, read_split
from clipseg3d.evaluation.detection import DEFAULT_DETECTION_ML
from clipseg3d.evaluation.report import Evaluation, write_reports
from clipseg3d.evaluation.scoring import find_cases, iter_scores

OWN_NUMBERING = "the predictions' own numbering (classes.json)"


def build_parser() -> CommandParser:
    parser = command_parser("evaluate", "Score clipseg3d segment outputs against ground-truth label volumes: "
                            "Dice, normalised surface Dice, HD95 and tumour detection.",
                            epilog=f"built-in label maps: {', '.join(available_label_maps())}")
    parser.add_argument("--pred", type=Path, required=True,
                        help="folder of segment outputs: <case>/labels.nii.gz, classes.json, masks/")
    parser.add_argument("--gt", type=Path, required=True, help="folder of ground-truth label volumes <case>.nii.gz")
    parser.add_argument("--label-map", default=None,
                        help=f"the truth's dataset: a built-in label-map name or a YAML path; null: {OWN_NUMBERING}")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for metrics.csv, summary.md, "
                        "metrics.png")
    parser.add_argument("--split", type=Path, default=None, metavar="FILE",
                        help="a split file (clipseg3d index --split): score only its test cases")
    parser.add_argument("--detection-ml", type=float, default=DEFAULT_DETECTION_ML,
                        help="predicted tumour volume (ml) from which a patient counts as detected")
    return parser


def _checked_options(parser: CommandParser, args, catalog: ClassCatalog) -> tuple[LabelMap | None, list[str]]:
    """The label map and the cases; an unusable option ends the run with status 2."""
    for option, folder in (("--pred", args.pred), ("--gt", args.gt)):
        if not folder.is_dir():
            parser.error(f"{option} {folder} is not a folder")
    if not math.isfinite(args.detection_ml) or args.detection_ml < 0:
        parser.error(f"--detection-ml {args.detection_ml} is not a volume (ml >= 0)")
    label_map = None
    if args.label_map:
        try:
            label_map = LabelMap.load(args.label_map, catalog).with_plugins()
        except (ValueError, CatalogError) as err:
            parser.error(str(err))
    cases = find_cases(args.pred)
    if args.split is not None:
        try:
            cases = read_split(args.split)["test"]
        except SplitError as err:
            parser.error(f"--split: {err}")
        if not cases:
            parser.error(f"--split {args.split} has no test cases")
    elif not cases:
        parser.error(f"--pred {args.pred} holds no case folders")
    return label_map, cases


def main(argv: Sequence[str] | None = None) -> int:
    """``clipseg3d evaluate --pred SEG_DIR --gt LABEL_DIR [--label-map DATASET] -o OUT``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    catalog = load_catalog()
    label_map, cases = _checked_options(parser, args, catalog)
    evaluation = Evaluation(label_map=label_map.name if label_map is not None else OWN_NUMBERING,
                            detection_ml=args.detection_ml)
    predicted: dict[str, None] = {}
    scores = iter_scores(args.pred, args.gt, cases, label_map, catalog, args.detection_ml)
    bar = tqdm(scores, total=len(cases), desc="evaluate", unit="case", file=sys.stderr, disable=None)
    for case, classes, outcome in bar:
        predicted.update(dict.fromkeys(classes))
        if isinstance(outcome, list):
            evaluation.results += outcome
        else:
            tqdm.write(error_line(parser.prog, outcome), file=sys.stderr)
            evaluation.failures[case] = str(outcome)
    if label_map is not None:
        labelled = label_map.labelled_classes
        evaluation.not_labelled = [name for name in predicted if name not in labelled]
        evaluation.not_predicted = [name for name in labelled if name not in predicted]
    try:
        paths = write_reports(evaluation, args.output)
    except OSError as err:
        return fail(parser.prog, f"cannot write the reports into {args.output}: {err}")
    scored = len(cases) - len(evaluation.failures)
    print(f"scored {scored} of {len(cases)} cases; wrote {', '.join(str(path) for path in paths)}")
    if evaluation.failures:
        return fail(parser.prog, f"{len(evaluation.failures)} of {len(cases)} cases failed (listed above and in "
                                 f"{paths[1]}); the other {scored} are scored")
    return 0
