"""One preprocessing for training and inference, and the way back to the scan grid.

The network sees a scan in RAS orientation, resampled to the model's voxel spacing, with HU
clipped to a window and scaled to [0, 1]. :class:`Preprocessing` holds these settings (recorded
in checkpoints); its MONAI dictionary transforms are what the training loaders run, and calling
it on a :class:`Scan` runs the same transforms and returns the :class:`ModelGrid` that relates
the network's grid to the scan's own.

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
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForegroundd, Orientationd, ScaleIntensityRanged, Spacingd

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
        return self.to_scan_box(volume, tuple(slice(0, size) for size in self.shape))[0]

    def to_scan_box(self, volume: torch.Tensor, model_box: tuple[slice, ...]
                    ) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """:meth:`to_scan` of the scan voxels whose value reads a voxel of ``model_box`` (slices of
        the model grid), and their box on the scan grid. Every other scan voxel interpolates
        model voxels outside ``model_box`` only, so when the box holds every voxel above a
        threshold, nothing outside the returned box is above it (a convex combination of values
        below it). The values are bit for bit those :meth:`to_scan` gives there; the cost is that
        of the box (an organ's box is a few percent of a whole CT).
        """
        if tuple(volume.shape) != tuple(self.shape):
            raise ValueError(f"volume of shape {tuple(volume.shape)} is not on the model grid {self.shape}")
        reads = []  # per model axis: scan axis, scan slice, and the corners and weights of its positions
        for model_axis, (scan_axis, scale, offset) in enumerate(self.axis_mapping()):
            positions = scale * torch.arange(self.scan_shape[scan_axis], dtype=torch.float64) + offset
            low, high, weight = _corners(positions, self.shape[model_axis])
            piece = model_box[model_axis]
            hits = ((low >= piece.start - 1) & (low < piece.stop)).nonzero().flatten()  # contiguous: low is monotonic
            first, stop = (int(hits[0]), int(hits[-1]) + 1) if hits.numel() else (0, 0)
            reads.append((scan_axis, slice(first, stop), low[first:stop], high[first:stop], weight[first:stop]))
        # only the model voxels the box's scan voxels read are converted and interpolated
        crop = tuple(slice(int(low.min()), int(high.max()) + 1) if low.numel() else slice(0, 0)
                     for _, _, low, high, _ in reads)
        result = volume[crop].float().contiguous()
        # The last (contiguous) axis first: a gather along it is the slow one, so it runs on the
        # smallest tensor (a whole CT at 5 mm: 1.2 s -> 0.2-0.4 s).
        for model_axis in reversed(range(3)):
            _, _, low, high, weight = reads[model_axis]
            start = crop[model_axis].start
            result = _interpolate_axis(result, model_axis, low - start, high - start, weight)
        scan_axes = [scan_axis for scan_axis, *_ in reads]
        scan_box = [slice(0, 0)] * 3
        for scan_axis, piece, *_ in reads:
            scan_box[scan_axis] = piece
        result = result.permute([scan_axes.index(axis) for axis in range(3)]).contiguous()
        return result, tuple(scan_box)


def _corners(positions: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per fractional position along an axis of ``size`` voxels (clamped to its edges): the lower
    and upper voxel it reads and the upper one's weight."""
    positions = positions.clamp(0, size - 1)
    low = positions.floor().long().clamp(max=max(size - 2, 0))
    return low, (low + 1).clamp(max=size - 1), positions - low


def _interpolate_axis(volume: torch.Tensor, dim: int, low: torch.Tensor, high: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim``: ``low`` and ``high`` voxels, ``weight`` of the high one."""
    if len(low) == volume.shape[dim] and not weight.any() and torch.equal(low, torch.arange(len(low))):
        return volume
    low, high = low.to(volume.device), high.to(volume.device)
    shape = [1] * volume.ndim
    shape[dim] = -1
    result = volume.index_select(dim, low)
    return result.lerp_(volume.index_select(dim, high), weight.to(volume.device, volume.dtype).reshape(shape))


# -- the preprocessing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocessing:
    """What the network's input is: RAS orientation, ``spacing`` mm voxels (``None``: the scan's
    own grid), the HU range ``hu_window`` clipped and scaled to [0, 1], and, when
    ``foreground_margin`` is set, the box around the body (voxels above the window's low end) plus
    that many voxels. Training crops come from that box, so inference must see the same box: a
    network with instance normalisation normalises each window by what it holds, and windows full
    of air outside the body change its output (on the demo's held-out phantoms, mean Dice 0.68
    without the box against 0.89 with it)."""

    spacing: tuple[float, float, float] | None
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW
    orientation: str = "RAS"
    foreground_margin: int | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None:
            if len(self.spacing) != 3 or any(float(size) <= 0 for size in self.spacing):
                raise ValueError(f"spacing must be three positive sizes in mm, got {self.spacing}")
            object.__setattr__(self, "spacing", tuple(float(size) for size in self.spacing))
        low, high = (float(value) for value in self.hu_window)
        if not low < high:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {self.hu_window}")
        object.__setattr__(self, "hu_window", (low, high))
        if self.foreground_margin is not None and int(self.foreground_margin) < 0:
            raise ValueError(f"foreground_margin must be at least 0 voxels, got {self.foreground_margin}")

    def to_dict(self) -> dict[str, Any]:
        return {"spacing": list(self.spacing) if self.spacing is not None else None,
                "hu_window": list(self.hu_window), "orientation": self.orientation,
                "foreground_margin": self.foreground_margin}

    @classmethod
    def from_dict(cls, recorded: Mapping[str, Any] | None) -> "Preprocessing":
        """The preprocessing a checkpoint records; other keys (window size, overlap) are ignored and
        missing ones take the defaults (native spacing, :data:`DEFAULT_HU_WINDOW`, RAS, no box)."""
        recorded = recorded or {}
        spacing = recorded.get("spacing")
        return cls(spacing=tuple(spacing) if spacing else None,
                   hu_window=tuple(recorded.get("hu_window") or DEFAULT_HU_WINDOW),
                   orientation=recorded.get("orientation") or "RAS",
                   foreground_margin=recorded.get("foreground_margin"))

    def spatial_transforms(self, image_key: str = "image", label_keys: Sequence[str] = ()) -> list:
        """Orientation and resampling (bilinear for the image, nearest for labels), channel-first inputs."""
        keys = [image_key, *label_keys]
        transforms = [Orientationd(keys=keys, axcodes=self.orientation, labels=None)]
        if self.spacing is not None:
            modes = ["bilinear"] + ["nearest"] * len(label_keys)
            transforms.append(Spacingd(keys=keys, pixdim=self.spacing, mode=modes, padding_mode="border",
                                       dtype=np.float32))
        return transforms

    def intensity_transforms(self, image_key: str = "image") -> list:
        """The HU window clipped and scaled to [0, 1] (float32)."""
        low, high = self.hu_window
        return [ScaleIntensityRanged(keys=image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True,
                                     dtype=np.float32)]

    def crop_transforms(self, image_key: str = "image", other_keys: Sequence[str] = ()) -> list:
        """The box around the body (after :meth:`intensity_transforms`), when ``foreground_margin`` is set."""
        if self.foreground_margin is None:
            return []
        return [CropForegroundd(keys=[image_key, *other_keys], source_key=image_key,
                                margin=int(self.foreground_margin), allow_smaller=True)]

    def transforms(self, image_key: str = "image", label_keys: Sequence[str] = ()) -> list:
        """:meth:`spatial_transforms`, :meth:`intensity_transforms`, :meth:`crop_transforms` (loaders
        that need the image in HU on the model grid, for label maps' body midline, run the parts
        around that step)."""
        return (self.spatial_transforms(image_key, label_keys) + self.intensity_transforms(image_key)
                + self.crop_transforms(image_key, label_keys))

    def __call__(self, scan: Scan) -> tuple[torch.Tensor, ModelGrid]:
        """The network input ``[1, *S]`` (float32) of ``scan`` and its grid."""
        image = MetaTensor(torch.from_numpy(np.asarray(scan.array, dtype=np.float32))[None],
                           affine=torch.as_tensor(scan.affine, dtype=torch.float64))
        image = Compose(self.transforms())({"image": image})["image"]
        grid = ModelGrid(affine=image.affine.numpy().astype(np.float64), shape=tuple(image.shape[1:]),
                         scan_affine=np.asarray(scan.affine, dtype=np.float64), scan_shape=scan.shape)
        return image.as_tensor().float().contiguous(), grid
