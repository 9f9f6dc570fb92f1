"""Overlap and surface metrics of one class in one scan, in the scan's physical spacing.

:func:`score_class` compares a predicted and a true binary mask on the same grid through MONAI:
Dice, normalised surface Dice (NSD) at a tolerance in mm, and the 95th-percentile Hausdorff
distance (HD95, the larger of the two directed 95th percentiles) in mm. Surfaces are the masks'
edge voxels (mask voxels with a 6-neighbour outside the mask); distances are Euclidean, in mm,
between voxel centres, with the voxel spacing of each array axis.

The status says what was there to compare:

- ``present``: both masks have voxels;
- ``absent``: neither has (Dice, NSD and HD95 are None: there is nothing to score);
- ``missed`` (truth only) and ``spurious`` (prediction only): Dice and NSD are 0 and HD95 is
  what MONAI gives for a surface against nothing (NaN).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from clipseg3d.catalog import ClassEntry

DEFAULT_NSD_TOLERANCE_MM = 2.0


@dataclass(frozen=True)
class ClassScore:
    """The metrics of one class in one scan (volumes in ml)."""

    status: str
    dice: float | None
    nsd: float | None
    hd95_mm: float | None
    nsd_tolerance_mm: float
    true_ml: float
    predicted_ml: float


def nsd_tolerance(entry: ClassEntry) -> float:
    """The class's NSD tolerance in mm: its catalog ``nsd_tolerance_mm``, else the default."""
    return entry.nsd_tolerance_mm if entry.nsd_tolerance_mm is not None else DEFAULT_NSD_TOLERANCE_MM


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """The volume of one voxel in ml (spacing in mm)."""
    return math.prod(float(step) for step in spacing) / 1000.0


def union_box(predicted: np.ndarray, truth: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of both masks, one voxel wider on every side where the grid allows."""
    union = predicted | truth
    box = []
    for axis, size in enumerate(union.shape):
        others = tuple(a for a in range(union.ndim) if a != axis)
        used = np.flatnonzero(union.any(axis=others))
        box.append(slice(max(int(used[0]) - 1, 0), min(int(used[-1]) + 2, size)))
    return tuple(box)


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """``[1, 2, *shape]`` background/foreground channels, as MONAI's metrics take them."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    return torch.cat([~tensor, tensor], dim=1)


def _monai_metrics(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float) -> tuple[float, float, float]:
    """(Dice, NSD, HD95 in mm) from MONAI for masks of which at least one has a voxel."""
    box = union_box(predicted, truth)
    pred, true = _one_hot(predicted[box]), _one_hot(truth[box])
    spacing = [float(step) for step in spacing]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is all 0, this may result in nan/inf distance")
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
        dice = compute_dice(pred.float(), true.float(), include_background=False, ignore_empty=False)
        nsd = compute_surface_dice(pred, true, [float(tolerance_mm)], spacing=spacing)
        hd95 = compute_hausdorff_distance(pred, true, percentile=95, spacing=spacing)
    return float(dice.item()), float(nsd.item()), float(hd95.item())


def score_class(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM) -> ClassScore:
    """Dice, NSD at ``tolerance_mm`` and HD95 of one class; masks on one grid of ``spacing`` (mm per axis)."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction shape {predicted.shape} differs from truth shape {truth.shape}")
    if len(spacing) != truth.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one step per axis of shape {truth.shape}")
    voxel_ml = voxel_volume_ml(spacing)
    predicted_voxels, true_voxels = int(np.count_nonzero(predicted)), int(np.count_nonzero(truth))
    volumes = {"nsd_tolerance_mm": float(tolerance_mm), "true_ml": true_voxels * voxel_ml,
               "predicted_ml": predicted_voxels * voxel_ml}
    if not predicted_voxels and not true_voxels:
        return ClassScore("absent", None, None, None, **volumes)
    status = "present" if predicted_voxels and true_voxels else "missed" if true_voxels else "spurious"
    dice, nsd, hd95 = _monai_metrics(predicted, truth, spacing, tolerance_mm)
    return ClassScore(status, dice, nsd, hd95, **volumes)
