"""Voxel grids read from headers only: where a scan or label lies in the world, and whether two agree.

A DICOM series' grid is the one :func:`~clipseg3d.data.scans.read_scan` builds (slices in
position order, ``[column, row, slice]``, RAS affine), computed from one header parse per file.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from clipseg3d.data.scans import LPS_TO_RAS, ScanError


def same_grid(affine: np.ndarray, other: np.ndarray) -> bool:
    """Whether two affines agree within what float32 storage in a NIfTI header keeps."""
    tolerance = 16 * float(np.finfo(np.float32).eps) * max(1.0, float(np.abs(affine).max()))
    return bool(np.abs(np.asarray(affine) - np.asarray(other)).max() <= tolerance)


def natural_key(name: str) -> list:
    """Sort key that compares the digits in ``name`` as numbers (``image_2`` before ``image_10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def dicom_series_geometry(series: Path) -> tuple[list[Path], np.ndarray, np.ndarray, tuple[int, int]]:
    """The series' slice files in name order, each one's slice index in position order, the RAS
    affine of the volume :func:`read_scan` builds, and the slices' (rows, columns)."""
    import pydicom

    files, headers = [], []
    for path in sorted(series.iterdir(), key=lambda p: natural_key(p.name)):
        if path.name.startswith("."):
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # pydicom raises many types for files that are not DICOM
            continue
        if "ImagePositionPatient" in header:
            files.append(path)
            headers.append(header)
    if not files:
        raise ScanError(f"{series}: no DICOM image slices found; give the image's DICOM series folder")
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([h.ImagePositionPatient for h in headers], dtype=float)
    order = np.argsort(positions @ normal, kind="stable")
    heights = (positions @ normal)[order]
    if len(files) > 1:
        step = (heights[-1] - heights[0]) / (len(files) - 1)
    else:
        step = float(headers[0].get("SliceThickness") or 1)
    row_mm, column_mm = (float(size) for size in headers[0].PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, :3] = np.stack([orientation[:3] * column_mm, orientation[3:] * row_mm, normal * step], axis=1)
    lps[:3, 3] = positions[order[0]]
    slots = np.empty(len(files), dtype=int)
    slots[order] = np.arange(len(files))
    return files, slots, LPS_TO_RAS @ lps, (int(headers[0].Rows), int(headers[0].Columns))


def header_grid(path: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The RAS affine and 3D shape of a NIfTI file or DICOM series folder, voxels left unread."""
    path = Path(path)
    if path.is_dir():
        files, _, affine, (rows, columns) = dicom_series_geometry(path)
        return affine, (columns, rows, len(files))
    image = nib.load(str(path))
    return np.asarray(image.affine, dtype=np.float64), tuple(int(size) for size in image.shape[:3])


def world_box(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The lowest and highest RAS coordinates (mm) of a grid's voxel centres, ``[[x, y, z], [x, y, z]]``."""
    corners = np.array(np.meshgrid(*[[0, size - 1] for size in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:]
    return np.stack([world.min(axis=1), world.max(axis=1)])


def region_mismatch(image: Path, label: Path) -> str | None:
    """How the label's grid misses the image's region by more than one voxel, or None when they agree."""
    (image_affine, image_shape), (label_affine, label_shape) = header_grid(image), header_grid(label)
    tolerance = max(nib.affines.voxel_sizes(image_affine).max(), nib.affines.voxel_sizes(label_affine).max())
    image_box, label_box = world_box(image_affine, image_shape), world_box(label_affine, label_shape)
    if np.abs(image_box - label_box).max() <= tolerance:
        return None
    return (f"label {label} (RAS box {label_box.round(1).tolist()} mm) does not cover the region of image {image} "
            f"({image_box.round(1).tolist()} mm); its header's geometry is wrong or it belongs to another scan")
