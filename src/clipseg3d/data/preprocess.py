"""One preprocessing for training and inference, and the way back to the scan grid.

The network sees a scan in RAS orientation, resampled to the model's voxel spacing, with HU
clipped to a window and scaled to [0, 1]. :func:`preprocess` does this for a :class:`Scan` and
returns the :class:`ModelGrid` that relates the network's grid to the scan's own.

The way back to the scan grid (:meth:`ModelGrid.to_scan`) is a separable linear interpolation at
the scan's voxel centres: the model grid is the scan grid permuted, flipped and rescaled per axis,
so each axis is resampled on its own. It equals MONAI's ``Spacing``/``Orientation`` inverse
(bilinear, border padding) to float precision and takes about 0.5-1.5 s per class for
512 x 512 x 300 voxels on one core, where that MONAI inverse takes about 6 s per class; MONAI's
inverse of all K channels at once is faster per class but builds a float64 K-channel volume on
the scan grid (20 GB for 32 classes at that size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing

from clipseg3d.data.scans import Scan

DEFAULT_HU_WINDOW = (-175.0, 250.0)


# -- the model's view of a scan ---------------------------------------------------------------
@dataclass
class ModelGrid:
    """The grid the network sees (RAS, model spacing) and the scan grid it came from."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    scan_affine: np.ndarray
    scan_shape: tuple[int, int, int]

    def axis_mapping(self) -> list[tuple[int, float, float]]:
        """Per model axis: (scan axis, scale, offset) with model index = scale * scan index + offset."""
        mapping = np.linalg.inv(self.affine) @ self.scan_affine
        linear = mapping[:3, :3]
        axes = []
        for model_axis in range(3):
            row = np.abs(linear[model_axis])
            scan_axis = int(np.argmax(row))
            if np.count_nonzero(row > 1e-6 * row.max()) != 1:
                raise ValueError(f"model grid is not axis-aligned with the scan grid (voxel mapping {linear.round(4)})")
            axes.append((scan_axis, float(linear[model_axis, scan_axis]), float(mapping[model_axis, 3])))
        if sorted(axis for axis, _, _ in axes) != [0, 1, 2]:
            raise ValueError(f"model grid axes do not map one-to-one onto scan axes ({linear.round(4)})")
        return axes

    def to_scan(self, volume: torch.Tensor) -> torch.Tensor:
        """A model-grid volume ``[*shape]`` linearly interpolated at the scan's voxel centres (float32).

        Points beyond the model grid take the nearest edge value (MONAI's border padding).
        """
        if tuple(volume.shape) != tuple(self.shape):
            raise ValueError(f"volume of shape {tuple(volume.shape)} is not on the model grid {self.shape}")
        result = volume.float()
        scan_axes = []
        for model_axis, (scan_axis, scale, offset) in enumerate(self.axis_mapping()):
            positions = scale * torch.arange(self.scan_shape[scan_axis], dtype=torch.float64) + offset
            result = _interpolate_axis(result, model_axis, positions)
            scan_axes.append(scan_axis)
        return result.permute([scan_axes.index(axis) for axis in range(3)]).contiguous()


def _interpolate_axis(volume: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim`` at fractional ``positions`` (clamped to the edges)."""
    size = volume.shape[dim]
    if len(positions) == size and torch.equal(positions, torch.arange(size, dtype=positions.dtype)):
        return volume
    positions = positions.clamp(0, size - 1)
    low = positions.floor().long().clamp(max=max(size - 2, 0))
    high = (low + 1).clamp(max=size - 1)
    shape = [1] * volume.ndim
    shape[dim] = -1
    weight = (positions - low).to(volume.dtype).reshape(shape)
    result = volume.index_select(dim, low)
    return result.lerp_(volume.index_select(dim, high), weight)


def preprocess(scan: Scan, spacing: Sequence[float] | None = None,
               hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> tuple[torch.Tensor, ModelGrid]:
    """The network input ``[1, *S]`` (RAS, ``spacing`` mm or native, HU window -> [0, 1]) and its grid."""
    spatial = [Orientation(axcodes="RAS", labels=None)]
    if spacing is not None:
        spatial.append(Spacing(pixdim=tuple(float(size) for size in spacing), mode="bilinear",
                               padding_mode="border", dtype=np.float32))
    image = MetaTensor(torch.from_numpy(scan.array)[None], affine=torch.as_tensor(scan.affine, dtype=torch.float64))
    image = Compose(spatial)(image)
    low, high = (float(value) for value in hu_window)
    image = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=torch.float32)(image)
    grid = ModelGrid(affine=image.affine.numpy().astype(np.float64), shape=tuple(image.shape[1:]),
                     scan_affine=np.asarray(scan.affine, dtype=np.float64), scan_shape=scan.shape)
    return image.as_tensor().contiguous(), grid
