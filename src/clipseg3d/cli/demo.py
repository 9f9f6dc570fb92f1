"""``make demo``: the main job end to end on built-in data, with no download.

Writes CT phantoms as three partially labelled datasets plus a fully labelled held-out set,
indexes them, fits ``experiments/demo.yaml``, segments the held-out scans, and prints a per-class
Dice table. When the real TotalSegmentator case is beside the project it is segmented too and
its Dice printed as a real-data check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from clipseg3d.data.index import index_dataset, write_manifest
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.phantom.generate import write_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "demo.yaml"
REAL_CASE = REPO / ".." / "shared" / "data" / "totalseg-case"
GOAL_CLASSES = ["liver", "spleen", "right_kidney", "left_kidney", "right_lung", "left_lung", "stomach", "aorta"]
ORGANS = ["spleen", "right_kidney", "left_kidney", "liver", "stomach", "aorta", "right_lung", "left_lung"]
#: name -> (cases, seed, labelled classes, tumours every case must show)
DATASETS = {
    "organs": (12, 1, ORGANS, ()),
    "liver": (6, 2, ["liver", "liver_tumor"], ("liver_tumor",)),
    "kidney": (6, 3, ["right_kidney", "left_kidney", "kidney_tumor"], ("kidney_tumor",)),
}
HELD_OUT = ("heldout", 3, 99)


def cli_classes() -> list[str]:
    """The model's classes as ``experiments/demo.yaml`` lists them."""
    return yaml.safe_load(CONFIG.read_text())["model"]["classes"]


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


def score(folder: Path, label_path: Path, label_map: LabelMap, class_names: list[str]) -> dict[str, float]:
    label = nib.load(label_path)
    targets, labelled, _ = label_map.to_targets(np.asarray(label.dataobj), label.affine, class_names)
    return {name: dice(predicted_mask(folder, name), targets[k] > 0)
            for k, name in enumerate(class_names) if labelled[k]}


def print_table(title: str, rows: dict[str, list[float]]) -> None:
    print(f"\n{title}\n| class | Dice |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {np.nanmean(values):.3f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipseg3d demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where everything is written")
    parser.add_argument("--max-time", help="training time limit (DD:HH:MM:SS; default: the config's)")
    args = parser.parse_args(argv)
    from clipseg3d.cli.main import lightning_main
    from clipseg3d.inference import segment

    out = args.out.resolve()
    started = time.time()
    manifests = []
    for name, (cases, seed, classes, required) in DATASETS.items():
        folder = write_dataset(out / "data" / name, cases, seed, classes=classes, name=name,
                               require_tumours=required, min_tumour_mm=12.0)
        manifests.append(out / f"{name}.jsonl")
        write_manifest(index_dataset(str(folder / f"{name}.yaml"), folder), manifests[-1], overwrite=True)
    held_name, held_cases, held_seed = HELD_OUT
    model_classes = cli_classes()
    held = write_dataset(out / "data" / held_name, held_cases, held_seed, classes=model_classes, name=held_name,
                         min_tumour_mm=12.0)
    print(f"phantoms written in {time.time() - started:.0f} s under {out / 'data'}")

    overrides = [f"--trainer.max_time={args.max_time}"] if args.max_time else []
    cli = lightning_main(["--config", str(CONFIG), f"--data.init_args.manifests=[{','.join(map(str, manifests))}]",
                          f"--trainer.default_root_dir={out / 'run'}", *overrides], run=False)
    fit_start = time.time()
    cli.trainer.fit(cli.model, cli.datamodule)
    checkpoint = out / "demo.ckpt"
    cli.trainer.save_checkpoint(checkpoint)
    print(f"fitted {cli.trainer.global_step} steps in {time.time() - fit_start:.0f} s -> {checkpoint}")

    segmentations = out / "segmentations"
    images = sorted((held / "imagesTr").glob("*.nii.gz"))
    status = segment.main([*map(str, images), "--ckpt", str(checkpoint), "-o", str(segmentations), "--overwrite"])
    label_map = LabelMap.load(held / f"{held_name}.yaml")
    rows: dict[str, list[float]] = {}
    for image in images:
        case = image.name.removesuffix(".nii.gz")
        for name, value in score(segmentations / case, held / "labelsTr" / image.name, label_map,
                                 model_classes).items():
            rows.setdefault(name, []).append(value)
    print_table(f"Held-out phantoms ({len(images)} scans)", rows)
    goal = np.nanmean([np.nanmean(rows[name]) for name in GOAL_CLASSES])
    print(f"\nmean Dice over {', '.join(GOAL_CLASSES)}: {goal:.3f} (goal 0.75)")

    if (REAL_CASE / "ct.nii.gz").exists():
        real_out = out / "real-case"
        status |= segment.main([str(REAL_CASE / "ct.nii.gz"), "--ckpt", str(checkpoint), "-o", str(real_out),
                                "--overwrite"])
        real = score(real_out / "ct", REAL_CASE / "labels.nii.gz", LabelMap.load("totalsegmentator_v2"),
                     model_classes)
        print_table("Real CT check (TotalSegmentator case; its labels are a model's predictions)",
                    {name: [value] for name, value in real.items()})
        print(f"real-case outputs: {real_out / 'ct'}")
    print(f"\nmasks, reports (report.json) and overlays (overlay.png): {segmentations}/<scan>/")
    print(f"demo finished in {(time.time() - started) / 60:.1f} min")
    return status


if __name__ == "__main__":
    sys.exit(main())
