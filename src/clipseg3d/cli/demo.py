"""``clipseg3d demo``: the main job end to end on built-in data, with no download.

Writes CT phantoms as three partially labelled datasets plus a fully labelled held-out set,
indexes them, fits the packaged ``configs/demo.yaml``, segments the held-out scans, and prints a
per-class Dice table, the tumours' per-patient detection and the goals met. Given a real TotalSegmentator case (``--real-case``, the
``CLIPSEG3D_REAL_CASE`` variable, or ``shared/data/totalseg-case`` in or above the current
folder) it segments that too and prints its Dice as a real-data check.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from jsonargparse.typing import PositiveInt

from clipseg3d.catalog import load_catalog
from clipseg3d.cli import segment
from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.cli.parsing import CommandParser, command_parser
from clipseg3d.data.index import index_dataset, write_manifest
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.evaluation.detection import DEFAULT_DETECTION_ML, DetectionTally, detect_patient, match_lesions
from clipseg3d.phantom import write_dataset

#: the fit config the demo trains, shipped with the package
CONFIG = resources.files("clipseg3d").joinpath("configs/demo.yaml")
REAL_CASE_VARIABLE = "CLIPSEG3D_REAL_CASE"
#: where the real case is looked for, relative to the current folder, when not given
REAL_CASE_PLACES = ("shared/data/totalseg-case", "../shared/data/totalseg-case")
GOAL_CLASSES = ["liver", "spleen", "right_kidney", "left_kidney", "right_lung", "left_lung", "stomach", "aorta"]
#: held-out goals: mean Dice over GOAL_CLASSES, the lowest of their Dice, per-patient sensitivity per tumour
GOAL_MEAN_DICE, GOAL_LOWEST_DICE = 0.85, 0.6
GOAL_SENSITIVITY = {"liver_tumor": 2 / 3}
ORGANS = ["spleen", "right_kidney", "left_kidney", "liver", "stomach", "aorta", "right_lung", "left_lung"]
#: name -> (cases, seed, labelled classes, tumours every case must show)
DATASETS = {
    "organs": (12, 1, ORGANS, ()),
    "liver": (6, 2, ["liver", "liver_tumor"], ("liver_tumor",)),
    "kidney": (6, 3, ["right_kidney", "left_kidney", "kidney_tumor"], ("kidney_tumor",)),
}
#: held-out name, cases, seed and tumours every case must show (so detection is measured on each)
HELD_OUT = ("heldout", 3, 99, ("liver_tumor", "kidney_tumor"))


def model_classes() -> list[str]:
    """The model's classes as the demo config lists them."""
    return yaml.safe_load(CONFIG.read_text())["model"]["classes"]


def find_real_case(given: Path | None) -> Path | None:
    """The real case folder: ``given``, else ``$CLIPSEG3D_REAL_CASE``, else the first of
    :data:`REAL_CASE_PLACES` that holds ``ct.nii.gz``; a folder named but lacking it is an error."""
    named = given or (Path(os.environ[REAL_CASE_VARIABLE]) if os.environ.get(REAL_CASE_VARIABLE) else None)
    if named is not None:
        if not (named / "ct.nii.gz").exists() or not (named / "labels.nii.gz").exists():
            raise ValueError(f"real case {named}: expected ct.nii.gz and labels.nii.gz in it")
        return named
    return next((Path(place) for place in REAL_CASE_PLACES if (Path(place) / "ct.nii.gz").exists()), None)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float("nan") if total == 0 else 2.0 * np.logical_and(prediction, truth).sum() / total


def predicted_mask(folder: Path, name: str) -> np.ndarray:
    """A class's mask from a segment output folder (its own file where classes overlap)."""
    own = folder / "masks" / f"{name}.nii.gz"
    if own.exists():
        return np.asarray(nib.load(own).dataobj) > 0
    table = {v: int(k) for k, v in json.loads((folder / "classes.json").read_text()).items()}
    return np.asarray(nib.load(folder / "labels.nii.gz").dataobj) == table[name]


def score(folder: Path, label_path: Path, label_map: LabelMap, class_names: list[str],
          tallies: dict[str, DetectionTally] | None = None) -> dict[str, float]:
    """Dice per labelled class of one segmented scan; with ``tallies``, each labelled tumour class's
    per-patient detection and lesion matching are counted into ``tallies[name]`` too."""
    label = nib.load(label_path)
    targets, labelled, _ = label_map.to_targets(np.asarray(label.dataobj), label.affine, class_names)
    spacing = label.header.get_zooms()[:3]
    catalog, scores = load_catalog(), {}
    for k, name in enumerate(class_names):
        if not labelled[k]:
            continue
        predicted, truth = predicted_mask(folder, name), targets[k] > 0
        scores[name] = dice(predicted, truth)
        if tallies is not None and catalog[name].kind == "tumour":
            tallies.setdefault(name, DetectionTally()).add(detect_patient(predicted, truth, spacing),
                                                           match_lesions(predicted, truth))
    return scores


def print_table(title: str, rows: dict[str, list[float]]) -> None:
    print(f"\n{title}\n| class | Dice |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {np.nanmean(values):.3f} |")


def share(count: int, total: int) -> str:
    """``count/total (fraction)``, or ``n/a`` with nothing to count over."""
    return f"{count}/{total} ({count / total:.2f})" if total else "n/a"


def print_detection(tallies: dict[str, DetectionTally]) -> None:
    """The tumour classes' per-patient detection and lesion matching over the held-out scans."""
    print(f"\nTumour detection (a scan is positive when its predicted tumour volume is at least "
          f"{DEFAULT_DETECTION_ML:g} ml)\n"
          "| tumour | sensitivity | specificity | lesions found | false positive lesions |\n|---|---|---|---|---|")
    for name, tally in tallies.items():
        print(f"| {name} | {share(tally.detected, tally.patients_with_tumour)} | "
              f"{share(tally.cleared, tally.patients_without_tumour)} | {share(tally.hits, tally.true_lesions)} | "
              f"{tally.false_positives} |")


def print_goals(rows: dict[str, list[float]], tallies: dict[str, DetectionTally]) -> None:
    """Each held-out goal (:data:`GOAL_MEAN_DICE`, :data:`GOAL_LOWEST_DICE`, :data:`GOAL_SENSITIVITY`), met or not."""
    dice_of = {name: float(np.nanmean(rows[name])) for name in GOAL_CLASSES}
    mean, lowest = float(np.mean(list(dice_of.values()))), min(dice_of, key=dice_of.get)
    lines = [(f"mean Dice over {', '.join(GOAL_CLASSES)}: {mean:.3f}", f">= {GOAL_MEAN_DICE}", mean >= GOAL_MEAN_DICE),
             (f"lowest Dice: {lowest} {dice_of[lowest]:.3f}", f">= {GOAL_LOWEST_DICE}",
              dice_of[lowest] >= GOAL_LOWEST_DICE)]
    for name, goal in GOAL_SENSITIVITY.items():
        sensitivity = tallies[name].sensitivity if name in tallies else None
        lines.append((f"{name} sensitivity: {'n/a' if sensitivity is None else f'{sensitivity:.2f}'}",
                      f">= {goal:.2f}", sensitivity is not None and sensitivity >= goal))
    print()
    for text, goal, met in lines:
        print(f"{text} (goal {goal}: {'met' if met else 'missed'})")


def write_phantoms(out: Path) -> tuple[list[Path], Path]:
    """The training datasets' manifests and the held-out dataset's folder, all under ``out``."""
    manifests = []
    for name, (cases, seed, classes, required) in DATASETS.items():
        folder = write_dataset(out / "data" / name, cases, seed, classes=classes, name=name,
                               require_tumours=required, min_tumour_mm=12.0)
        manifests.append(out / f"{name}.jsonl")
        write_manifest(index_dataset(str(folder / f"{name}.yaml"), folder), manifests[-1], overwrite=True)
    held_name, held_cases, held_seed, held_required = HELD_OUT
    held = write_dataset(out / "data" / held_name, held_cases, held_seed, classes=model_classes(), name=held_name,
                         require_tumours=held_required, min_tumour_mm=12.0)
    return manifests, held


def fit(out: Path, manifests: list[Path], overrides: list[str]) -> Path:
    """Fit the demo config on the manifests; returns the checkpoint written to ``out``."""
    with resources.as_file(CONFIG) as config:
        cli = lightning_main(["--config", str(config), f"--data.init_args.manifests=[{','.join(map(str, manifests))}]",
                              f"--trainer.default_root_dir={out / 'run'}", *overrides], run=False)
    started = time.time()
    cli.trainer.fit(cli.model, cli.datamodule)
    checkpoint = out / "demo.ckpt"
    cli.trainer.save_checkpoint(checkpoint, weights_only=False)
    print(f"fitted {cli.trainer.global_step} steps in {time.time() - started:.0f} s -> {checkpoint}")
    return checkpoint


def segment_held_out(held: Path, checkpoint: Path, segmentations: Path) -> int:
    """Segment the held-out scans, print their Dice table; returns ``clipseg3d segment``'s exit status."""
    images = sorted((held / "imagesTr").glob("*.nii.gz"))
    status = segment.main([*map(str, images), "--ckpt", str(checkpoint), "-o", str(segmentations), "--overwrite"])
    label_map = LabelMap.load(held / f"{HELD_OUT[0]}.yaml")
    rows: dict[str, list[float]] = {}
    tallies: dict[str, DetectionTally] = {}
    for image in images:
        case = image.name.removesuffix(".nii.gz")
        for name, value in score(segmentations / case, held / "labelsTr" / image.name, label_map,
                                 model_classes(), tallies).items():
            rows.setdefault(name, []).append(value)
    print_table(f"Held-out phantoms ({len(images)} scans)", rows)
    print_detection(tallies)
    print_goals(rows, tallies)
    return status


def segment_real_case(case: Path, checkpoint: Path, real_out: Path) -> int:
    """Segment the real CT case and print its Dice; returns ``clipseg3d segment``'s exit status."""
    status = segment.main([str(case / "ct.nii.gz"), "--ckpt", str(checkpoint), "-o", str(real_out), "--overwrite"])
    real = score(real_out / "ct", case / "labels.nii.gz", LabelMap.load("totalsegmentator_v2"), model_classes())
    print_table("Real CT check (TotalSegmentator case; its labels are a model's predictions)",
                {name: [value] for name, value in real.items()})
    print(f"real-case outputs: {real_out / 'ct'}")
    return status


def build_parser() -> CommandParser:
    parser = command_parser("demo", "The main job end to end on built-in data, with no download: phantoms, fit, "
                            "segmentation of held-out scans, a Dice table.")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything is written")
    parser.add_argument("--max-steps", type=PositiveInt, help="training step limit; when not given, the config's")
    parser.add_argument("--real-case", type=Path, help="a TotalSegmentator case folder (ct.nii.gz, labels.nii.gz) "
                        f"to segment too; when not given, ${REAL_CASE_VARIABLE}, else {' or '.join(REAL_CASE_PLACES)} "
                        "when present")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``clipseg3d demo``; the exit status of the segmentations."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        real_case = find_real_case(args.real_case)
    except ValueError as err:
        parser.error(str(err))
    out = args.out.resolve()
    started = time.time()
    manifests, held = write_phantoms(out)
    print(f"phantoms written in {time.time() - started:.0f} s under {out / 'data'}")
    overrides = []
    if args.max_steps is not None:
        overrides.append(f"--trainer.max_steps={args.max_steps}")
    checkpoint = fit(out, manifests, overrides)
    status = segment_held_out(held, checkpoint, out / "segmentations")
    if real_case is not None:
        status |= segment_real_case(real_case, checkpoint, out / "real-case")
    print(f"\nmasks, reports (report.json) and overlays (overlay.png): {out / 'segmentations'}/<scan>/")
    print(f"demo finished in {(time.time() - started) / 60:.1f} min")
    return status
