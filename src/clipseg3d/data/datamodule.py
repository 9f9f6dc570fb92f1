"""The multi-dataset CT DataModule: manifests in, K-channel targets and labelled masks out.

Each manifest (JSON lines of ``image``, a label (``label``, ``segmentations`` or ``slices``), ``dataset``, ``case``;
written by ``clipseg3d index``) is one dataset with its own label map, so each gets its own
MONAI pipeline: load, RAS orientation, spacing, label map -> one int16 class-code map + its code
table + ``labelled`` (what the cache holds, see :mod:`clipseg3d.data.code_maps`), HU window ->
[0, 1], foreground crop; then random crops that favour the classes the dataset labels (tumour
classes weighted up), each crop's K-channel targets built from its codes. Datasets are mixed by a
seeded, resumable sampler (:mod:`clipseg3d.data.sampling`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate
from monai.data.utils import json_hashing
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    OneOf,
    RandCropByLabelClassesd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)
from torch.utils.data import ConcatDataset, DataLoader

from clipseg3d.catalog import load_catalog
from clipseg3d.data.code_maps import CodeClassIndicesd, CodesToTargetsd
from clipseg3d.data.distributed import cache_mode, fill_disk_caches, processes, unrepeated_sampler, warn_memory_cache
from clipseg3d.data.grids import region_mismatch
from clipseg3d.data.index import LABEL_FORMS
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.preprocess import DEFAULT_HU_WINDOW, Preprocessing
from clipseg3d.data.sampling import PositionSampler, ResumableDataLoader, SeededConcatDataset
from clipseg3d.data.scans import find_scans, read_scan
from clipseg3d.data.splits import SplitError, select
from clipseg3d.data.targets import LabelMapError
from clipseg3d.data.test_scans import TestScanDataset, collate_test_scans, grid_problems
from clipseg3d.data.transforms import LabelMapToCodesd, LoadSegmentationsd, LoadSliceMasksd

#: voxels kept around the body's box (training crops and inference see the same box)
FOREGROUND_MARGIN = 4


class ManifestError(ValueError):
    """A manifest that cannot be read or points at missing files; one line per bad record."""


def _record_problem(record, base: Path) -> str | None:
    """What is wrong with one manifest record (paths resolved against ``base`` in place), or None:
    a missing key or file, or a label file whose header puts it elsewhere than the image."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    forms = [key for key in LABEL_FORMS if key in record]
    if "image" not in record or len(forms) != 1 or "dataset" not in record:
        return f"a record needs 'image', one of {list(LABEL_FORMS)} and 'dataset' (has {sorted(record)})"
    missing = []
    for key in ("image", forms[0]):
        if not isinstance(record[key], str):
            return f"{key} must be a path, got {record[key]!r}"
        record[key] = str((base / record[key]).resolve())
        if not Path(record[key]).exists():
            missing.append(f"{key} {record[key]} not found")
    if missing or forms[0] != "label":
        return "; ".join(missing) or None
    try:
        return region_mismatch(Path(record["image"]), Path(record["label"]))
    except Exception as err:  # nibabel and pydicom raise many types for unreadable headers
        return f"cannot read the grid of image {record['image']} or label {record['label']} ({err})"


def manifest_problems(path: str | Path) -> tuple[list[dict], list[str]]:
    """The usable records of a JSON-lines manifest (relative paths resolved against its folder) and
    one ``<path>:<line>: <problem>`` line per bad record."""
    path = Path(path)
    if not path.is_file():
        return [], [f"{path}: manifest not found"]
    records, problems = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not JSON ({err.msg})")
            continue
        problem = _record_problem(record, path.parent)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
        else:
            records.append(record)
    datasets = sorted({record["dataset"] for record in records})
    if len(datasets) > 1:
        problems.append(f"{path}: one manifest per dataset, found {datasets}")
    if not records and not problems:
        problems.append(f"{path}: manifest is empty")
    return records, problems


def read_manifests(paths: Sequence[str | Path]) -> list[list[dict]]:
    """The records of each manifest; every bad record of every manifest raises one :class:`ManifestError`."""
    found, problems = [], []
    for path in paths:
        records, bad = manifest_problems(path)
        found.append(records)
        problems += bad
    if problems:
        plural = "s" if len(problems) > 1 else ""
        raise ManifestError(f"{len(problems)} problem{plural} in the manifests (fix them, or write them again "
                            "with clipseg3d index):\n" + "\n".join(problems))
    return found


def read_manifest(path: str | Path) -> list[dict]:
    """The records of a JSON-lines manifest, with relative paths resolved against its folder."""
    return read_manifests([path])[0]


def resolve_label_map(dataset: str, manifest: Path) -> str:
    """A dataset name as written in a manifest: a built-in map name or a YAML path (relative to the manifest)."""
    candidate = manifest.parent / dataset
    return str(candidate) if dataset.endswith((".yaml", ".yml")) and candidate.exists() else dataset


class ScanDataset(torch.utils.data.Dataset):
    """Whole scans for prediction: ``image`` (the network input ``[1, *S]``), ``grid`` (its
    :class:`~clipseg3d.data.preprocess.ModelGrid`) and ``image_path`` (the scan's file or folder)."""

    def __init__(self, inputs: Sequence[str], preprocessing: Preprocessing):
        self.paths = find_scans([Path(path) for path in inputs])
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image, grid = self.preprocessing(read_scan(self.paths[index]))
        return {"image": image, "grid": grid, "image_path": str(self.paths[index])}


def collate_scans(items: Sequence[dict]) -> dict:
    """:class:`ScanDataset` items as a batch: images stacked, grids and paths as lists."""
    return {"image": torch.stack([item["image"] for item in items]), "grid": [item["grid"] for item in items],
            "image_path": [item["image_path"] for item in items]}


class CTDataModule(L.LightningDataModule):
    """Mixes partially labelled CT datasets given as manifests.

    Args:
        manifests: training manifests, one per dataset (``clipseg3d index`` writes them).
        val_manifests: validation manifests; when empty, ``val_fraction`` of each training
            manifest's cases is held out (chosen by ``seed``).
        test_manifests: manifests of test scans for ``clipseg3d test`` (every case), scored on each
            scan's own grid (:mod:`clipseg3d.data.test_scans`).
        splits: use each manifest's split file (``<manifest>.split.json``, written by ``clipseg3d
            index --split``): fit trains on its train part and validates on its val part (instead of
            ``val_fraction``), test scores its test part (with ``test_manifests``, if any).
        classes: the model's class names (linked from the model in configs).
        spacing: target voxel spacing in mm (x, y, z after RAS orientation).
        hu_window: HU range mapped to [0, 1] (clipped).
        crop_size: training crop (and sliding-window) size.
        samples_per_volume: crops taken from each loaded volume.
        positive_fraction: share of crops centred on a labelled class (the rest are random).
        tumour_crop_weight: how much more often a labelled tumour class is chosen as a crop centre.
        max_crop_centres: candidate crop centres kept per class (a random subset of its voxels).
        dataset_weights: sampling weight per dataset name (default: every dataset equally often).
        samples_per_epoch: volumes drawn per training epoch (default: the number of training cases).
        cache: ``none``, ``memory`` (MONAI CacheDataset) or ``disk`` (PersistentDataset in ``cache_dir``).
        predict_inputs: scans for ``clipseg3d predict`` (NIfTI files, folders of them, DICOM series
            folders), written by :class:`~clipseg3d.inference.writer.SegmentationWriter`.
        batch_size: crops per training step (``batch_size / samples_per_volume`` volumes are loaded).
        num_workers: loader worker processes.
        seed: validation split, sampler and random-crop seed.
    """

    def __init__(self, manifests: list[str] = (), val_manifests: list[str] = (), test_manifests: list[str] = (),
                 splits: bool = False, classes: list[str] | None = None,
                 spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
                 hu_window: tuple[float, float] = DEFAULT_HU_WINDOW, crop_size: tuple[int, int, int] = (96, 96, 96),
                 samples_per_volume: int = 2, positive_fraction: float = 0.9, tumour_crop_weight: float = 3.0,
                 dataset_weights: dict[str, float] | None = None, samples_per_epoch: int | None = None,
                 max_crop_centres: int = 20000, val_fraction: float = 0.2, cache: Literal["none", "memory", "disk"] = "none",
                 cache_dir: str = ".cache/clipseg3d-data", predict_inputs: list[str] = (), batch_size: int = 2, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.class_names = load_catalog().resolve(classes) if classes is not None else load_catalog(with_plugins=False).names

    @property
    def preprocessing(self) -> Preprocessing:
        """What inference must repeat, recorded in checkpoints."""
        return Preprocessing(spacing=tuple(self.hparams.spacing), hu_window=tuple(self.hparams.hu_window),
                             foreground_margin=FOREGROUND_MARGIN)

    # -- pipelines ------------------------------------------------------------------------
    def deterministic_transforms(self, label_map: LabelMap) -> list:
        """Load, :attr:`preprocessing` (class codes made on the model grid while the image is in HU), crop:
        ``image``, ``codes`` (int16 code map) and its ``code_table`` (:mod:`clipseg3d.data.code_maps`)."""
        preprocessing = self.preprocessing
        return [
            LoadImaged(keys=["image", "label"], image_only=True, allow_missing_keys=True),
            LoadSliceMasksd(keys=("slices",), label_map=label_map, allow_missing_keys=True),
            LoadSegmentationsd(keys=("segmentations",), label_map=label_map, allow_missing_keys=True),
            EnsureChannelFirstd(keys=["image", "label"]),
            *preprocessing.spatial_transforms("image", ("label",)),
            LabelMapToCodesd(keys=("label",), label_map=label_map, class_names=self.class_names,
                             image_key="image", code_key="codes", table_key="code_table"),
            *preprocessing.intensity_transforms("image"),
            *preprocessing.crop_transforms("image", ("codes",)),
            SpatialPadd(keys=["image", "codes"], spatial_size=self.hparams.crop_size),
            EnsureTyped(keys=["image"], dtype=torch.float32, track_meta=False),
            EnsureTyped(keys=["codes"], dtype=torch.int16, track_meta=False),
        ]

    def crop_ratios(self, label_map: LabelMap) -> list[float]:
        """Crop-centre weights per class: 0 for classes the dataset does not label."""
        catalog = load_catalog()
        labelled = set(label_map.labelled_classes)
        return [0.0 if name not in labelled else
                self.hparams.tumour_crop_weight if catalog[name].kind == "tumour" else 1.0
                for name in self.class_names]

    def random_crops(self, label_map: LabelMap) -> list:
        """Crops of ``image`` and ``codes``, then each crop's K-channel ``target`` from its codes."""
        h = self.hparams
        keys = ["image", "codes"]
        by_class = RandCropByLabelClassesd(keys=keys, label_key="codes", spatial_size=h.crop_size,
                                           ratios=self.crop_ratios(label_map), num_classes=len(self.class_names),
                                           indices_key="class_indices", num_samples=h.samples_per_volume, warn=False)
        anywhere = RandSpatialCropSamplesd(keys=keys, roi_size=h.crop_size, num_samples=h.samples_per_volume,
                                           random_size=False)
        return [OneOf([by_class, anywhere], weights=[h.positive_fraction, 1.0 - h.positive_fraction]),
                DeleteItemsd(keys="class_indices"), CodesToTargetsd(keys="codes", table_key="code_table"),
                EnsureTyped(keys=["image", "target"], track_meta=False)]

    def _dataset(self, records: list[dict], label_map: LabelMap, train: bool):
        deterministic = self.deterministic_transforms(label_map)
        if train:  # crop-centre candidates per class, computed once (and cached) rather than per crop
            deterministic.append(CodeClassIndicesd(keys="codes", table_key="code_table",
                                                   max_samples_per_class=self.hparams.max_crop_centres))
        cache = cache_mode(self.hparams.cache, self.trainer)
        if cache == "memory":
            base = CacheDataset(records, Compose(deterministic), num_workers=self.hparams.num_workers or None,
                                progress=False)
        elif cache == "disk":
            # keyed by the transforms' names too: a cache written by another pipeline is not reused
            base = PersistentDataset(records, Compose(deterministic), cache_dir=self.hparams.cache_dir,
                                     hash_transform=json_hashing)
        else:
            base = Dataset(records, Compose(deterministic))
        if train:
            return Dataset(base, Compose(self.random_crops(label_map)))
        return Dataset(base, CodesToTargetsd(keys="codes", table_key="code_table"))  # whole scans

    def _split(self, records: list[dict], manifest: str) -> tuple[list[dict], list[dict]]:
        if self.hparams.splits:
            try:
                return select(records, manifest, "train"), select(records, manifest, "val")
            except SplitError as err:
                raise ManifestError(str(err)) from None
        if self.hparams.val_manifests or len(records) < 2:
            return records, []
        order = np.random.default_rng(self.hparams.seed).permutation(len(records))
        held = max(1, int(round(self.hparams.val_fraction * len(records))))
        return [records[i] for i in order[held:]], [records[i] for i in order[:held]]

    def prepare_data(self) -> None:
        """Fitting with a disk cache (also a memory cache under DDP, see :mod:`clipseg3d.data.distributed`),
        cache every training and validation case. Lightning runs this on one process per node (local
        rank 0) while the others wait, so each dataset is cached once per node; evaluation alone needs
        no filling, as its unrepeated sampler gives each case to one process."""
        warn_memory_cache(self.hparams.cache, self.trainer, self.hparams.cache_dir)
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if not fitting or cache_mode(self.hparams.cache, self.trainer) != "disk":
            return
        self.setup("fit")
        fill_disk_caches([*(dataset for dataset, _ in self.train_sets.values()), *self.val_sets],
                         self.hparams.num_workers)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            return
        if stage == "test":
            self.test_sets = self._test_sets()
            return
        if hasattr(self, "train_sets"):
            return
        if not self.hparams.manifests and not self.hparams.val_manifests:
            raise ManifestError("CTDataModule needs at least one manifest (--data.init_args.manifests=[...])")
        manifests = [*self.hparams.manifests, *self.hparams.val_manifests]
        records = read_manifests(manifests)  # every bad record, before any dataset is built
        label_maps = self._label_maps(manifests, records)
        self.train_sets, self.val_sets = {}, []
        for index, label_map in enumerate(label_maps):
            if index >= len(self.hparams.manifests):
                self.val_sets.append(self._dataset(records[index], label_map, train=False))
                continue
            train, val = self._split(records[index], manifests[index])
            self.train_sets[label_map.name] = (self._dataset(train, label_map, train=True), len(train))
            if val:
                self.val_sets.append(self._dataset(val, label_map, train=False))

    @staticmethod
    def _label_maps(manifests: Sequence[str], records: Sequence[list[dict]]) -> list[LabelMap]:
        """Each manifest's label map; every one that cannot be loaded raises one :class:`ManifestError`."""
        catalog = load_catalog()
        label_maps, problems = [], []
        for manifest, found in zip(manifests, records):
            dataset = found[0]["dataset"]
            try:
                label_maps.append(CTDataModule._label_map(dataset, Path(manifest), catalog))
            except (LabelMapError, OSError) as err:
                problems.append(f"{manifest}: dataset {dataset!r}: {err}")
        if problems:
            raise ManifestError("label maps the manifests name cannot be loaded:\n" + "\n".join(problems))
        return label_maps

    @staticmethod
    def _label_map(dataset: str, manifest: Path, catalog) -> LabelMap:
        return LabelMap.load(resolve_label_map(dataset, manifest), catalog=catalog).with_plugins(catalog=catalog)

    def train_dataloader(self) -> DataLoader:
        weights = self.hparams.dataset_weights or {}
        datasets, sample_weights = [], []
        for name, (dataset, count) in self.train_sets.items():
            datasets.append(dataset)
            sample_weights += [weights.get(name, 1.0) / count] * count
        total = self.hparams.samples_per_epoch or len(sample_weights)
        # each crop's random state follows from (seed, epoch, position): resumable, alike for any workers,
        # and each of DDP's processes takes its share of an epoch's draws
        world, rank = processes(self.trainer)
        sampler = PositionSampler(sample_weights, num_samples=total, seed=self.hparams.seed, num_replicas=world,
                                  rank=rank)
        return ResumableDataLoader(SeededConcatDataset(datasets), sampler,
                                   batch_size=max(1, self.hparams.batch_size // self.hparams.samples_per_volume),
                                   num_workers=self.hparams.num_workers, collate_fn=list_data_collate,
                                   persistent_workers=self.hparams.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sets:
            return []
        manifests = self.hparams.val_manifests or self.hparams.manifests
        return self._whole_scan_loader(ConcatDataset(self.val_sets), f"validation ({', '.join(map(str, manifests))})",
                                       list_data_collate)

    def _whole_scan_loader(self, scans, what: str, collate) -> DataLoader:
        """One scan per batch; under DDP each process gets its own scans, none twice (``what`` names
        them in the error when there are fewer than processes)."""
        try:
            sampler = unrepeated_sampler(scans, self.trainer, what)
        except ValueError as err:
            raise ManifestError(str(err)) from None
        return DataLoader(scans, batch_size=1, sampler=sampler, num_workers=self.hparams.num_workers,
                          collate_fn=collate)

    def predict_dataloader(self) -> DataLoader:
        if not self.hparams.predict_inputs:
            raise ManifestError("clipseg3d predict needs scans: --data.init_args.predict_inputs=[scan.nii.gz, ...]")
        return self._whole_scan_loader(ScanDataset(self.hparams.predict_inputs, self.preprocessing),
                                       "predict_inputs", collate_scans)

    def _test_sets(self) -> list[TestScanDataset]:
        """The test scans: every case of ``test_manifests`` and, with ``splits``, each manifest's test part."""
        parts = [(manifest, "test") for manifest in self.hparams.manifests if self.hparams.splits]
        parts += [(manifest, None) for manifest in self.hparams.test_manifests]
        if not parts:
            raise ManifestError("clipseg3d test needs test scans: --data.init_args.test_manifests=[...], or "
                                "--data.init_args.splits=true with split files (clipseg3d index ... --split)")
        manifests = [manifest for manifest, _ in parts]
        records = read_manifests(manifests)
        label_maps = self._label_maps(manifests, records)
        try:
            records = [select(found, manifest, part) if part else found
                       for (manifest, part), found in zip(parts, records)]
        except SplitError as err:
            raise ManifestError(str(err)) from None
        problems = [line for found in records for line in grid_problems(found)]
        if problems:
            raise ManifestError("test labels must lie on their scans' grids:\n" + "\n".join(problems))
        if not any(records):
            raise ManifestError(f"no test cases in {', '.join(map(str, manifests))} (the split files' test parts "
                                "are empty)")
        return [TestScanDataset(found, label_map, self.preprocessing) for found, label_map in zip(records, label_maps)
                if found]

    def test_dataloader(self) -> DataLoader:
        """Whole test scans with their truth on the scan grid, one per batch."""
        return self._whole_scan_loader(ConcatDataset(self.test_sets), "test scans", collate_test_scans)
