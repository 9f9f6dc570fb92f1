"""Training samples that follow from ``(seed, epoch, position)`` alone, so that a run resumed from a
mid-epoch checkpoint draws exactly what an uninterrupted run draws.

:class:`PositionSampler` draws an epoch's dataset indices (weighted, with replacement) from a
generator seeded by ``(seed, epoch)`` and pairs each with a seed for its random transforms, derived
from ``(seed, epoch, position)``. :class:`SeededConcatDataset` reseeds the MONAI transforms of the
item's dataset with that seed before loading it, in whichever worker process loads it, so neither
the worker's history nor the number of workers changes a crop. :class:`ResumableDataLoader` counts
the samples handed to the training loop and, being stateful in Lightning's sense, stores that
position in checkpoints together with the main process's torch, numpy, Python (and CUDA) random
states, which Lightning does not save.
"""

from __future__ import annotations

import bisect
import random
from typing import Sequence

import numpy as np
import torch
from monai.data.utils import set_rnd
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

#: keys that keep the seeds of an epoch's order and of its samples apart
_ORDER, _SAMPLE = 1, 2


def derived_seed(*key: int) -> int:
    """A 32-bit seed determined by the non-negative integers ``key``."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


class PositionSampler(DistributedSampler):
    """Weighted draws with replacement of ``(dataset index, transform seed)``, both fixed by
    ``(seed, epoch, position)``, shared out among ``num_replicas`` processes (process ``rank`` takes
    positions ``rank, rank + num_replicas, ...`` of an epoch's ``total_size`` draws, so a crop does not
    depend on the number of processes, and Lightning inserts no sampler of its own). Lightning calls
    :meth:`set_epoch` at each epoch's start; :attr:`start` (set when resuming) skips the draws of an
    interrupted epoch that this process already used. ``num_samples``: this process's draws per epoch."""

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.start = 0

    def order(self, epoch: int) -> list[int]:
        """The dataset indices drawn in ``epoch`` (all processes' draws)."""
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, _ORDER))
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator).tolist()

    def __iter__(self):
        epoch, start = self.epoch, self.start
        self.start = 0
        order = self.order(epoch)
        for position in range(self.rank + start * self.num_replicas, self.total_size, self.num_replicas):
            yield order[position], derived_seed(self.seed, epoch, _SAMPLE, position)


class SeededConcatDataset(Dataset):
    """Datasets concatenated, indexed by ``(index, seed)``: the random transforms of the dataset that
    holds ``index`` (its ``transform``, where it has one: not its records) are reseeded with ``seed``
    before the item is loaded. A plain ``index`` loads the item with the transforms' current state."""

    def __init__(self, datasets: Sequence[Dataset]):
        self.concat = ConcatDataset(datasets)

    def __len__(self) -> int:
        return len(self.concat)

    def __getitem__(self, key: tuple[int, int] | int):
        index, seed = key if isinstance(key, tuple) else (key, None)
        part = bisect.bisect_right(self.concat.cumulative_sizes, index)
        dataset = self.concat.datasets[part]
        if seed is not None:
            set_rnd(getattr(dataset, "transform", dataset), seed=seed)
        return dataset[index - (self.concat.cumulative_sizes[part - 1] if part else 0)]


def global_random_state() -> dict:
    """The process's torch, numpy, Python and CUDA random states, as plain tensors and numbers."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "state": list(python_state), "gauss": python_gauss}}


def set_global_random_state(state: dict) -> None:
    """Restore what :func:`global_random_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`PositionSampler` whose :meth:`state_dict` (epoch, samples handed
    out, the main process's random states) Lightning saves in checkpoints and restores on resume.

    Creating an iterator draws its worker seeds from the loader's own generator (seeded by the
    sampler's seed), not from torch's global one, so resuming leaves the global stream where it was.
    """

    def __init__(self, dataset: Dataset, sampler: PositionSampler, **kwargs):
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.position = 0

    def __iter__(self):
        self.position = self.sampler.start
        for batch in super().__iter__():
            self.position = min(self.position + self.batch_size, self.sampler.num_samples)
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "position": self.position, "random": global_random_state()}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = state["epoch"], state["position"]
        if position >= self.sampler.num_samples:  # saved at an epoch's end: the next one starts afresh
            epoch, position = epoch + 1, 0
        self.sampler.epoch, self.sampler.start, self.position = epoch, position, position
        set_global_random_state(state["random"])
