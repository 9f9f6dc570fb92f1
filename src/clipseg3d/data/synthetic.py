"""Small in-memory synthetic volumes for smoke runs and tests.

Each class of the model becomes an ellipsoid with its own intensity at a jittered position
(tumours sit inside one of their parent organs when the parent is among the classes), so a
network must use the class prompt to tell them apart. Training volumes come from
``num_datasets`` "datasets" that each label an interleaved share of the classes, which is the
partial-label setting in miniature; validation volumes label every class.
"""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.data.preprocess import Preprocessing


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0


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
    cell = size / per_axis
    image = np.zeros(tuple(size), np.float32)
    targets = np.zeros((len(entries), *size), np.uint8)
    shapes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for rank, k in enumerate(placed):
        index = np.array(np.unravel_index(rank, (per_axis,) * 3))
        centre = (index + 0.5 + rng.uniform(-0.12, 0.12, 3)) * cell
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
    return image[None], targets


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


class SyntheticDataModule(L.LightningDataModule):
    """Generated volumes in memory: training from partially labelling datasets, fully labelled validation.

    Args:
        classes: the model's class names (linked from the model in configs).
        crop_size: size of every generated volume (so also the training crop and sliding window).
        spacing: the voxel spacing in mm the volumes stand for (recorded in checkpoints).
        train_volumes, val_volumes: how many volumes to generate.
        num_datasets: how many partially labelling "datasets" share the training classes.
        batch_size, num_workers: loader settings.
        noise: Gaussian noise sigma on the [0, 1] intensities.
        seed: generation seed (validation uses ``seed + 1``).
    """

    def __init__(self, classes: list[str] | None = None, crop_size: tuple[int, int, int] = (32, 32, 32),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 1.5), train_volumes: int = 16,
                 val_volumes: int = 4, num_datasets: int = 2, batch_size: int = 2, num_workers: int = 0,
                 noise: float = 0.05, seed: int = 0):
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

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1, num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
