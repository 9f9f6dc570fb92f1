"""Data under distributed training (DDP): every evaluation case scored once, every cache built once per node.

- Validation, test and prediction loaders get Lightning's ``UnrepeatedDistributedSampler``: case
  ``i`` goes to process ``i mod W`` and none is repeated (the ``DistributedSampler`` Lightning would
  otherwise insert pads the last round with repeated cases, which would be scored twice).
- The disk cache is filled in the DataModule's ``prepare_data``, which Lightning runs on one process
  per node (local rank 0) while the others wait; they then read the files.
- The memory cache would hold one copy per process and build it in every process, so under DDP
  it becomes the disk cache (in ``cache_dir``), with a warning.
"""

from __future__ import annotations

from typing import Iterable, Sized

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from monai.data import PersistentDataset
from torch.utils.data import DataLoader, Dataset


def processes(trainer) -> tuple[int, int]:
    """(number of processes, this process's global rank) of ``trainer``'s run; (1, 0) without a trainer."""
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


def unrepeated_sampler(dataset: Sized, trainer, what: str) -> UnrepeatedDistributedSampler | None:
    """This process's share of ``dataset`` (in order, none repeated), or None in a single process.

    Every process needs at least one case (each takes part in the evaluation's collectives); a
    ``ValueError`` naming ``what`` says so otherwise.
    """
    world, rank = processes(trainer)
    if world == 1:
        return None
    if len(dataset) < world:
        raise ValueError(f"{what}: {len(dataset)} case(s) for {world} processes; every process needs at least "
                         f"one, so run on at most {len(dataset)} devices or add cases")
    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


def cache_mode(requested: str, trainer) -> str:
    """The cache a DataModule builds: ``requested``, except ``memory`` under DDP, which is ``disk``."""
    return "disk" if requested == "memory" and processes(trainer)[0] > 1 else requested


def warn_memory_cache(requested: str, trainer, cache_dir: str) -> None:
    """Say (once, on rank 0) that a memory cache is kept on disk under DDP, and where."""
    if requested == "memory" and cache_mode(requested, trainer) == "disk":
        rank_zero_warn(f"cache='memory' would build and hold a copy in each of {processes(trainer)[0]} processes; "
                       f"under DDP the cases are cached on disk in {cache_dir} instead, once per node")


class _Touch(Dataset):
    """Loads each case of ``dataset`` (which writes its cache file) and hands back only its index."""

    def __init__(self, dataset: PersistentDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        self.dataset[index]  # computes and writes the cache file (or reads it back)
        return index


def persistent_part(dataset) -> PersistentDataset | None:
    """The MONAI ``PersistentDataset`` ``dataset`` is or wraps (through ``.data``), or None."""
    while not isinstance(dataset, PersistentDataset):
        dataset = getattr(dataset, "data", None)
        if not isinstance(dataset, Dataset):
            return None
    return dataset


def fill_disk_caches(datasets: Iterable, num_workers: int) -> None:
    """Run every case of each disk-cached dataset in ``datasets`` through its cached pipeline once
    (in ``num_workers`` loader workers), so that its cache files exist."""
    for dataset in datasets:
        cached = persistent_part(dataset)
        if cached is not None:
            for _ in DataLoader(_Touch(cached), batch_size=None, num_workers=num_workers):
                pass
