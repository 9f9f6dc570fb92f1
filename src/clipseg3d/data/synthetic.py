"""Small in-memory synthetic volumes for smoke runs and tests.

Each class of the model becomes an ellipsoid with its own intensity at a jittered position
(tumours sit inside one of their parent organs when the parent is among the classes), so a
network must use the class prompt to tell them apart. The two sides of a left/right pair (catalog
``side`` and ``partner``) lie on their own sides of the volume's middle, the ``right`` class at
the larger index of axis 0 (RAS x, patient right), as post-processing's side assignment expects
(otherwise it gives the organ to its partner). Intensities are clipped to [0, 1], as the
preprocessing's window (0, 1) clips a test scan, so training volumes and test scans look alike
to the network. Training volumes come from ``num_datasets`` "datasets" that each label an
interleaved share of the classes, which is the partial-label setting in miniature; validation
volumes label every class.

Test scans stand for CT scans of their own: generated at ``test_spacing`` mm over the same
physical extent as the training volumes, with an affine, a raw label volume (value k + 1 for
class k, tumours over their parents) and a label map, so ``clipseg3d test`` scores them on their
own grid. :meth:`SyntheticDataModule.write_test_cases` writes them as NIfTI (image, label, label
map, manifest) for ``clipseg3d segment`` and ``clipseg3d evaluate``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import lightning as L
import nibabel as nib
import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.data.distributed import unrepeated_sampler
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.data.scans import Scan
from clipseg3d.data.test_scans import TestCase, collate_test_scans, scan_item
from clipseg3d.files import replace_atomically, write_text_atomic

SYNTHETIC_LABEL_MAP = "synthetic"


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0


def _cells(entries: Sequence, placed: Sequence[int], per_axis: int) -> dict[int, np.ndarray]:
    """The grid cell (index per axis) of each placed class. The two sides of a left/right pair go
    first, to mirrored cells across the middle of axis 0 (RAS x, so the ``right`` side at the
    larger index), or to the first two free cells when no mirrored pair is left; the other classes
    take the free cells in C order."""
    cells = [np.array(np.unravel_index(rank, (per_axis,) * 3)) for rank in range(per_axis ** 3)]
    index = {entries[k].name: k for k in placed}
    chosen: dict[int, int] = {}
    for k in placed:
        partner = index.get(entries[k].partner) if entries[k].side == "right" else None
        if partner is None:
            continue
        free = [c for c in range(len(cells)) if c not in chosen.values()]
        mirrored = [(a, b) for a in free for b in free if cells[a][0] > cells[b][0]
                    and cells[b][0] == per_axis - 1 - cells[a][0] and (cells[a][1:] == cells[b][1:]).all()]
        chosen[k], chosen[partner] = mirrored[0] if mirrored else sorted(free[:2], key=lambda c: -cells[c][0])
    free = iter([c for c in range(len(cells)) if c not in chosen.values()])
    return {k: cells[chosen[k]] if k in chosen else cells[next(free)] for k in placed}


def synthetic_volume(class_names: Sequence[str], size: Sequence[int], rng: np.random.Generator,
                     catalog: ClassCatalog | None = None, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """An image [1, *size] in [0, 1] and targets [K, *size] (uint8; organs include their tumours)."""
    catalog = catalog or load_catalog()
    entries = [catalog[name] for name in class_names]
    class_names = [entry.name for entry in entries]
    size = np.asarray(size)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in size], indexing="ij"))
    placed = [k for k, e in enumerate(entries) if not (e.kind == "tumour" and set(e.parents) & set(class_names))]
    per_axis = math.ceil(len(placed) ** (1 / 3))
    cell, cells = size / per_axis, _cells(entries, placed, per_axis)
    image = np.zeros(tuple(size), np.float32)
    targets = np.zeros((len(entries), *size), np.uint8)
    shapes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rank, k in enumerate(placed):
        centre = (cells[k] + 0.5 + rng.uniform(-0.12, 0.12, 3)) * cell
        radii = rng.uniform(0.28, 0.4, 3) * cell
        targets[k] = _ellipsoid(grid, centre, radii)
        shapes[entries[k].name] = (centre, radii)
        image[targets[k] > 0] = 0.2 + 0.7 * (rank + 1) / (len(placed) + 1)
    for k, entry in enumerate(entries):
        if k in placed:
            continue
        parents = [p for p in entry.parents if p in shapes]
        parent = parents[rng.integers(len(parents))]
        centre, radii = shapes[parent]
        radius = 0.7 * radii.min()
        targets[k] = _ellipsoid(grid, centre + rng.uniform(-0.2, 0.2, 3) * radius, np.full(3, radius))
        targets[class_names.index(parent)] |= targets[k]
        parent_value = image[tuple(np.round(centre).astype(int))]
        image[targets[k] > 0] = parent_value - 0.15 if parent_value > 0.35 else parent_value + 0.15
    image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0, out=image)[None], targets


class SyntheticDataset(Dataset):
    """``count`` synthetic volumes, each with a ``labelled`` vector from its dataset's share."""

    def __init__(self, class_names: Sequence[str], count: int, size: Sequence[int], seed: int,
                 num_datasets: int = 1, noise: float = 0.05):
        catalog = load_catalog()
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(count):
            image, targets = synthetic_volume(class_names, size, rng, catalog, noise)
            dataset = i % num_datasets
            labelled = np.array([k % num_datasets == dataset for k in range(len(class_names))])
            self.items.append({"image": torch.from_numpy(image), "target": torch.from_numpy(targets),
                               "labelled": torch.from_numpy(labelled), "dataset": f"synthetic_{dataset}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def synthetic_label_map(class_names: Sequence[str]) -> dict:
    """The label map of the synthetic raw labels, as YAML data: value k + 1 is class k."""
    return {"name": SYNTHETIC_LABEL_MAP, "label_count": len(class_names),
            "labels": {k + 1: name for k, name in enumerate(class_names)}}


def raw_labels(targets: np.ndarray, class_names: Sequence[str], catalog: ClassCatalog) -> np.ndarray:
    """One raw value per voxel (k + 1 for class k, 0 background); a tumour's value covers its parent's."""
    nested = [k for k, name in enumerate(class_names) if set(catalog[name].parents) & set(class_names)]
    label = np.zeros(targets.shape[1:], np.uint8)
    for k in [k for k in range(len(class_names)) if k not in nested] + nested:
        label[targets[k] > 0] = k + 1
    return label


def synthetic_test_cases(class_names: Sequence[str], count: int, size: Sequence[int], spacing: Sequence[float],
                         seed: int, noise: float = 0.05) -> list[TestCase]:
    """``count`` scans of ``size`` voxels of ``spacing`` mm (RAS, centred on the origin) with raw labels."""
    catalog = load_catalog()
    label_map = LabelMap.from_mapping(synthetic_label_map(class_names), source=SYNTHETIC_LABEL_MAP, catalog=catalog)
    rng = np.random.default_rng(seed)
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(size) - 1) * np.asarray(spacing)
    affine = affine.astype(np.float32).astype(np.float64)  # as a NIfTI header stores it
    cases = []
    for i in range(count):
        image, targets = synthetic_volume(class_names, size, rng, catalog, noise)
        name = f"synthetic_test_{i:03d}"
        scan = Scan(array=image[0], affine=affine.copy(), path=Path(f"{name}.nii.gz"), kind="nifti")
        cases.append(TestCase(name, scan, raw_labels(targets, class_names, catalog), label_map))
    return cases


def write_cases(cases: Sequence[TestCase], class_names: Sequence[str], folder: Path) -> Path:
    """``imagesTs/<case>.nii.gz``, ``labelsTs/<case>.nii.gz``, ``synthetic.yaml`` (the label map) and
    ``synthetic.jsonl`` (a manifest) in ``folder``; returns the manifest's path."""
    folder = Path(folder)
    label_map = write_text_atomic(folder / f"{SYNTHETIC_LABEL_MAP}.yaml",
                                  yaml.safe_dump(synthetic_label_map(class_names), sort_keys=False))
    records = []
    for case in cases:
        paths = {key: folder / sub / f"{case.name}.nii.gz"
                 for key, sub in (("image", "imagesTs"), ("label", "labelsTs"))}
        for key, array in (("image", case.scan.array.astype(np.float32)), ("label", case.label)):
            volume = nib.Nifti1Image(array, case.scan.affine)
            replace_atomically(paths[key], lambda temp, volume=volume: nib.save(volume, str(temp)))
        records.append({"image": str(paths["image"].resolve()), "label": str(paths["label"].resolve()),
                        "dataset": str(label_map.resolve()), "case": case.name})
    return write_text_atomic(folder / f"{SYNTHETIC_LABEL_MAP}.jsonl",
                             "".join(json.dumps(record) + "\n" for record in records))


class SyntheticTestSet(Dataset):
    """The test scans as :mod:`~clipseg3d.data.test_scans` items, prepared by ``preprocessing``."""

    def __init__(self, cases: Sequence[TestCase], preprocessing: Preprocessing):
        self.cases, self.preprocessing = list(cases), preprocessing

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        return scan_item(self.cases[index], self.preprocessing)


class SyntheticDataModule(L.LightningDataModule):
    """Generated volumes in memory: training from partially labelling datasets, fully labelled validation.

    Args:
        classes: the model's class names (linked from the model in configs).
        crop_size: size of every generated volume (so also the training crop and sliding window).
        spacing: the voxel spacing in mm the volumes stand for (recorded in checkpoints).
        train_volumes, val_volumes, test_volumes: how many volumes to generate.
        test_spacing: the test scans' voxel spacing in mm; they cover the training volumes' extent
            (``crop_size * spacing`` mm), so their shape is that extent over ``test_spacing``.
        num_datasets: how many partially labelling "datasets" share the training classes.
        batch_size, num_workers: loader settings.
        noise: Gaussian noise sigma on the [0, 1] intensities.
        seed: generation seed (validation uses ``seed + 1``, test ``seed + 2``).
    """

    def __init__(self, classes: list[str] | None = None, crop_size: tuple[int, int, int] = (32, 32, 32),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 1.5), train_volumes: int = 16,
                 val_volumes: int = 4, test_volumes: int = 2,
                 test_spacing: tuple[float, float, float] = (3.0, 3.0, 3.0), num_datasets: int = 2,
                 batch_size: int = 2, num_workers: int = 0, noise: float = 0.05, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.class_names = load_catalog().resolve(classes) if classes is not None else load_catalog(with_plugins=False).names

    @property
    def preprocessing(self) -> Preprocessing:
        """The volumes are generated on the model grid with intensities in [0, 1]: the HU window
        (0, 1) makes the intensity scaling the identity."""
        return Preprocessing(spacing=tuple(self.hparams.spacing), hu_window=(0.0, 1.0))

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if not hasattr(self, "train_set"):
            self.train_set = SyntheticDataset(self.class_names, h.train_volumes, h.crop_size, h.seed,
                                              h.num_datasets, h.noise)
            self.val_set = SyntheticDataset(self.class_names, h.val_volumes, h.crop_size, h.seed + 1, 1, h.noise)

    @property
    def test_cases(self) -> list[TestCase]:
        """The test scans with their raw labels (generated once)."""
        if not hasattr(self, "_test_cases"):
            h = self.hparams
            extent = np.asarray(h.crop_size, dtype=float) * np.asarray(h.spacing, dtype=float)
            size = [max(1, int(round(mm / step))) for mm, step in zip(extent, h.test_spacing)]
            self._test_cases = synthetic_test_cases(self.class_names, h.test_volumes, size, h.test_spacing,
                                                    h.seed + 2, h.noise)
        return self._test_cases

    def write_test_cases(self, folder: str | Path) -> Path:
        """Write the test scans as NIfTI with their labels, label map and manifest (see :func:`write_cases`)."""
        return write_cases(self.test_cases, self.class_names, Path(folder))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        cases = SyntheticTestSet(self.test_cases, self.preprocessing)
        sampler = unrepeated_sampler(cases, self.trainer, "test_volumes")  # under DDP: each scan on one process
        return DataLoader(cases, batch_size=1, sampler=sampler, num_workers=self.hparams.num_workers,
                          collate_fn=collate_test_scans)

    predict_dataloader = val_dataloader
