"""Head-only fine-tuning on the real TotalSegmentator case: spinal cord and vertebrae T11-L2.

1. Fits a starting model on the built-in classes labelled in ``../shared/data/totalseg-case``
   (or takes ``--start``, a checkpoint fitted on built-in classes).
2. Fine-tunes it with ``finetune=new_classes``: the musculoskeletal plugin's spinal cord and
   vertebrae are added with their own embedding residual and controller adapter; the backbone
   and the old head stay frozen.
3. Prints a markdown table of Dice per class before and after. There is one real scan, so the
   model is fitted and evaluated on the same scan: the figures say what the frozen features let
   the new classes' own parameters learn, not how they generalise.

Needs the musculoskeletal plugin: ``pip install plugins/clipseg3d-musculoskeletal``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASE = REPO / ".." / "shared" / "data" / "totalseg-case"
NEW_CLASSES = ["spinal_cord", "vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2"]
SPACING = (3.0, 3.0, 3.0)
CROP = (64, 64, 32)


def data_module(manifest: Path, classes: list[str]):
    from clipseg3d.data.datamodule import CTDataModule

    return CTDataModule(manifests=[str(manifest)], val_manifests=[str(manifest)], classes=classes, spacing=SPACING,
                        crop_size=CROP, samples_per_volume=2, batch_size=2, positive_fraction=0.9, cache="memory",
                        samples_per_epoch=50, num_workers=0)


def trainer(steps: int, root: Path):
    import lightning as L

    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     check_val_every_n_epoch=10**6, default_root_dir=root)


def dice(trainer_, task, data) -> dict[str, float]:
    scores = trainer_.validate(task, data, verbose=False)[0]
    return {name: scores.get(f"val/dice/{name}", float("nan")) for name in task.class_names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/finetune-real"))
    parser.add_argument("--start", type=Path, help="a checkpoint fitted on built-in classes (default: fit one)")
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="fine-tuning learning rate")
    parser.add_argument("--finetune", choices=["new_classes", "head"], default="new_classes")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)

    import lightning as L
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from clipseg3d.catalog import load_catalog
    from clipseg3d.data.labelmap import LabelMap
    from clipseg3d.models.backbones import UNetBackbone
    from clipseg3d.models.checkpoint import load_model
    from clipseg3d.training.task import UniversalSegmentation

    if not (CASE / "ct.nii.gz").exists():
        print(f"the real case {CASE} is absent", file=sys.stderr)
        return 1
    if any(name not in load_catalog() for name in NEW_CLASSES):
        print("the musculoskeletal plugin is not installed: pip install plugins/clipseg3d-musculoskeletal",
              file=sys.stderr)
        return 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "case.jsonl"
    manifest.write_text(json.dumps({"image": str((CASE / "ct.nii.gz").resolve()),
                                    "label": str((CASE / "labels.nii.gz").resolve()),
                                    "dataset": "totalsegmentator_v2", "case": "totalseg-case"}) + "\n")
    L.seed_everything(0)
    started = time.time()
    if args.start is None:
        import nibabel as nib
        import numpy as np

        present = set(np.unique(np.asarray(nib.load(CASE / "labels.nii.gz").dataobj)).tolist())
        label_map = LabelMap.load("totalsegmentator_v2")
        builtin = [name for name in label_map.labelled_classes
                   if any(raw.value in present for raw in label_map.labels.values() if name in raw.classes)]
        base = UniversalSegmentation(classes=builtin, lr=3e-3, warmup_steps=50, roi_size=CROP, sw_overlap=0.25,
                                     backbone=UNetBackbone(channels=(16, 32, 64, 128), strides=(2, 2, 2),
                                                           out_channels=32, num_res_units=1))
        fit = trainer(args.base_steps, out)
        fit.fit(base, data_module(manifest, builtin))
        args.start = out / "start.ckpt"
        fit.save_checkpoint(args.start)
        print(f"start: fitted {len(builtin)} built-in classes for {args.base_steps} steps "
              f"({time.time() - started:.0f} s) -> {args.start}")
    old = load_model(args.start)[0].class_names
    classes = old + NEW_CLASSES
    task = UniversalSegmentation(classes=classes, init_from=str(args.start), finetune=args.finetune, lr=args.lr,
                                 weight_decay=0.0, warmup_steps=20, roi_size=CROP, sw_overlap=0.25)
    data = data_module(manifest, classes)
    before = dice(trainer(1, out), task, data)
    tuned = time.time()
    fit = trainer(args.steps, out)
    fit.fit(task, data)
    after = dice(fit, task, data)
    fit.save_checkpoint(out / "finetuned.ckpt")
    trainable, total = task.parameter_counts()
    print(f"\nfine-tuning ({args.finetune}, {args.steps} steps, lr {args.lr}, {time.time() - tuned:.0f} s): "
          f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)")
    print("Dice on the scan the model was fitted on (real TotalSegmentator case, 3 mm)\n")
    print("| class | new | Dice before | Dice after |\n|---|---|---|---|")
    for name in classes:
        print(f"| {name} | {'yes' if name in NEW_CLASSES else ''} | {before[name]:.3f} | {after[name]:.3f} |")
    print(f"\ncheckpoint with old and new classes: {out / 'finetuned.ckpt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
