"""The benchmark's phantoms: six training datasets, held-out sets at sites A-C and D, a new task."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from claims.config import MIN_TUMOUR_MM, NEW_TASK, SEED, SITE_D, TRAINING_SITES, Budget
from clipseg3d.data.index import index_dataset, write_manifest
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.files import write_text_atomic
from clipseg3d.phantom import write_dataset, write_multi_dataset

HELD_OUT_STREAM = 20  # seed streams of the held-out sets (one per site), apart from the datasets' own
NEW_TASK_STREAM = 30


@dataclass
class Phantoms:
    """Manifests of what was written, and the classes each training dataset labels."""

    training: dict[str, Path]
    classes: dict[str, list[str]]
    heldout: list[Path]
    site_d: list[Path]
    new_task: Path
    #: one case, the training data modules' validation set: without it they would hold out a
    #: training case each (validation itself never runs)
    unused_val: Path

    @property
    def union(self) -> list[str]:
        """Every class some training dataset labels, in first-seen order."""
        return list(dict.fromkeys(name for names in self.classes.values() for name in names))


def manifest(folder: Path, name: str, out: Path) -> Path:
    path = out / f"{name}.jsonl"
    write_manifest(index_dataset(str(folder / f"{name}.yaml"), folder), path, overwrite=True)
    return path


def write_phantoms(root: Path, budget: Budget, workers: int = 2) -> Phantoms:
    """Write every dataset under ``root`` and index each into a manifest beside them.

    The held-out cases of site D repeat the anatomy of those at sites A-C (same seeds), so the
    two sets differ only in how they are scanned.
    """
    training, classes = {}, {}
    for folder in write_multi_dataset(root / "train", budget.cases_per_dataset, SEED, min_tumour_mm=MIN_TUMOUR_MM,
                                      workers=workers):
        training[folder.name] = manifest(folder, folder.name, root)
        classes[folder.name] = LabelMap.load(folder / f"{folder.name}.yaml").labelled_classes
    heldout, site_d = [], []
    for index, site in enumerate(TRAINING_SITES):
        for sets, scanner, prefix in ((heldout, site, "heldout"), (site_d, SITE_D, "site_d")):
            name = f"{prefix}_{site}"
            folder = write_dataset(root / name, budget.heldout_per_site, SEED, site=scanner, name=name,
                                   min_tumour_mm=MIN_TUMOUR_MM, stream=HELD_OUT_STREAM + index, workers=workers)
            sets.append(manifest(folder, name, root))
    folder = write_dataset(root / "new_task", budget.transfer_cases, SEED, classes=NEW_TASK, name="new_task",
                           stream=NEW_TASK_STREAM, workers=workers)
    unused_val = root / "unused_val.jsonl"
    write_text_atomic(unused_val, site_d[0].read_text().splitlines(keepends=True)[0])
    return Phantoms(training, classes, heldout, site_d, manifest(folder, "new_task", root), unused_val)
