"""Fitting the universal model, the specialists and the transfer models through Lightning."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import lightning as L

from claims.config import DATASET_WEIGHTS, HU_WINDOW, NEW_TASK, OVERLAP, SEED, Budget
from claims.models import PlainConvSegmentation, make_backbone
from claims.phantoms import Phantoms
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.training.task import UniversalSegmentation


def datamodule(budget: Budget, classes: Sequence[str], manifests: Sequence[Path] = (),
               val_manifests: Sequence[Path] = (), weights: Mapping[str, float] | None = None) -> CTDataModule:
    """The demo's data settings at the budget's grid and crop (every case of ``manifests`` trains)."""
    return CTDataModule(manifests=[str(path) for path in manifests], val_manifests=[str(p) for p in val_manifests],
                        classes=list(classes), spacing=(budget.spacing_mm,) * 3, hu_window=HU_WINDOW,
                        crop_size=budget.crop, samples_per_volume=1, batch_size=2, positive_fraction=0.8,
                        dataset_weights=dict(weights or {}), cache="memory", samples_per_epoch=40, num_workers=0,
                        seed=SEED)


def fit(module: L.LightningModule, data: CTDataModule, steps: int, root: Path) -> float:
    """Fit ``steps`` optimiser steps on CPU without validation; the seconds it took."""
    L.seed_everything(SEED, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    started = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - started


def universal_task(budget: Budget, classes: Sequence[str], init_from: Path | None = None) -> UniversalSegmentation:
    """The universal task over ``classes``: a fresh one, or fine-tuned from ``init_from`` (every weight trains)."""
    L.seed_everything(SEED, verbose=False)
    common = dict(classes=list(classes), lr=budget.lr, warmup_steps=budget.warmup_steps, roi_size=budget.crop,
                  sw_overlap=OVERLAP)
    if init_from is not None:
        return UniversalSegmentation(init_from=str(init_from), finetune="full", **common)
    return UniversalSegmentation(backbone=make_backbone(budget), **common)


def specialist_steps(total: int, datasets: Sequence[str]) -> dict[str, int]:
    """Each dataset's share of ``total`` steps by its sampling weight (largest remainder, at least one)."""
    weights = {name: DATASET_WEIGHTS.get(name, 1.0) for name in datasets}
    exact = {name: total * weight / sum(weights.values()) for name, weight in weights.items()}
    steps = {name: max(1, int(value)) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - int(exact[n]), reverse=True)[:total - sum(steps.values())]:
        steps[name] += 1
    return steps


def fit_universal(budget: Budget, phantoms: Phantoms, root: Path) -> tuple[UniversalSegmentation, CTDataModule,
                                                                             float, Path]:
    """(task, its data, seconds, checkpoint) of the universal model on all six datasets."""
    task = universal_task(budget, phantoms.union)
    data = datamodule(budget, phantoms.union, list(phantoms.training.values()), [phantoms.unused_val], DATASET_WEIGHTS)
    seconds = fit(task, data, budget.universal_steps, root / "universal")
    checkpoint = root / "universal.ckpt"
    task.trainer.save_checkpoint(checkpoint)
    return task, data, seconds, checkpoint


def fit_specialists(budget: Budget, phantoms: Phantoms, root: Path) -> tuple[dict[str, PlainConvSegmentation],
                                                                              dict[str, int], float]:
    """(specialist per dataset, its steps, total seconds), each trained on its own dataset only."""
    steps = specialist_steps(budget.universal_steps, list(phantoms.training))
    models, seconds = {}, 0.0
    for name, manifest in phantoms.training.items():
        L.seed_everything(SEED, verbose=False)
        models[name] = PlainConvSegmentation(make_backbone(budget), phantoms.classes[name], budget.lr,
                                             budget.warmup_steps)
        data = datamodule(budget, phantoms.classes[name], [manifest], [phantoms.unused_val])
        seconds += fit(models[name], data, steps[name], root / name)
    return models, steps, seconds


def fit_transfer(budget: Budget, phantoms: Phantoms, checkpoint: Path, root: Path
                 ) -> dict[str, tuple[UniversalSegmentation, float]]:
    """The new task fitted from the universal checkpoint and from random weights, the same steps each."""
    fitted = {}
    for name, start in (("universal backbone", checkpoint), ("random init", None)):
        task = universal_task(budget, NEW_TASK, init_from=start)
        data = datamodule(budget, NEW_TASK, [phantoms.new_task], [phantoms.unused_val])
        fitted[name] = (task, fit(task, data, budget.transfer_steps, root / name.replace(" ", "_")))
    return fitted
