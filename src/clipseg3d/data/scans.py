"""Finding and reading CT scans: NIfTI files and DICOM series.

A :class:`Scan` keeps the voxels in the file's own order as a float32 HU array indexed
``[i, j, k]`` (for DICOM: column, row, slice), with a 4x4 affine from voxel indices to RAS
world millimetres. Outputs written on that grid (:mod:`clipseg3d.inference.outputs`) overlay
the input in any viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIX = ".dcm"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices further than this fraction of the median gap from a regular grid make a series unusable.
SLICE_GAP_TOLERANCE = 0.1


class ScanError(ValueError):
    """A scan that cannot be found, read or used; the message names the file."""


@dataclass
class Scan:
    """One CT volume: HU voxels in file order, their RAS affine, and what is needed to write outputs."""

    array: np.ndarray
    affine: np.ndarray
    path: Path
    kind: str
    header: nib.Nifti1Header | None = None
    dicom_datasets: list = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return voxel_spacing(self.affine)

    @property
    def name(self) -> str:
        """The scan's file or folder name without NIfTI suffixes, for naming outputs."""
        return scan_stem(self.path)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis of ``affine``."""
    return tuple(float(size) for size in nib.affines.voxel_sizes(np.asarray(affine, dtype=float)))


def scan_stem(path: Path) -> str:
    """``ct.nii.gz`` -> ``ct``; a DICOM folder -> its name."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or a suffix-less file (not a DICOMDIR index) with the DICOM preamble."""
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    if path.suffix or path.name.upper() == "DICOMDIR" or not path.is_file():
        return False
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def _holds_dicom(folder: Path) -> bool:
    return any(_is_dicom_file(child) for child in folder.iterdir() if child.is_file())


def find_scans(inputs: Sequence[Path | str]) -> list[Path]:
    """Scans named by ``inputs``: NIfTI files, folders of NIfTI files, and DICOM series folders.

    A folder holding DICOM files (``*.dcm`` or suffix-less files with the DICOM preamble) is one
    series; a folder without them contributes the NIfTI files directly inside it and every DICOM
    series folder below it. A DICOM file given directly stands for its folder.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise ScanError(f"{item}: no such file or folder")
        if item.is_file():
            if is_nifti(item):
                found.append(item)
            elif _is_dicom_file(item):
                found.append(item.parent)
            else:
                raise ScanError(f"{item}: not a NIfTI (.nii, .nii.gz) or DICOM (.dcm) file")
            continue
        if _holds_dicom(item):
            found.append(item)
            continue
        before = len(found)
        found.extend(sorted(child for child in item.iterdir() if child.is_file() and is_nifti(child)))
        found.extend(sorted(folder for folder in item.rglob("*") if folder.is_dir() and _holds_dicom(folder)))
        if len(found) == before:
            raise ScanError(f"{item}: folder holds no NIfTI files and no DICOM series")
    return list(dict.fromkeys(Path(os.path.abspath(path)) for path in found))


def read_scan(path: Path | str) -> Scan:
    """Read a NIfTI file or a DICOM series folder as a :class:`Scan` (float32 HU, RAS affine)."""
    path = Path(path)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    if is_nifti(path):
        return _read_nifti(path)
    if _is_dicom_file(path):
        return _read_dicom_series(path.parent)
    raise ScanError(f"{path}: not a NIfTI (.nii, .nii.gz) file or a DICOM series folder")


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3D shape of a volume stored as ``shape`` (trailing singleton axes allowed)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise ScanError(f"{path}: expected a 3D volume, got shape {tuple(shape)}")
    return tuple(int(size) for size in shape)


def _read_nifti(path: Path) -> Scan:
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for files that are not NIfTI
        raise ScanError(f"{path}: cannot read NIfTI header ({type(err).__name__}: {err})") from err
    shape = _spatial_shape(image.shape, path)
    if not np.all(np.isfinite(image.affine)):
        raise ScanError(f"{path}: the NIfTI affine is not finite")
    try:
        array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as err:  # truncated or corrupt compressed data
        raise ScanError(f"{path}: cannot read NIfTI voxels ({type(err).__name__}: {err})") from err
    return Scan(array=array, affine=image.affine.astype(np.float64), path=path, kind="nifti",
                header=image.header.copy())


def _read_dicom_series(folder: Path) -> Scan:
    import pydicom
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ScanError(f"{folder}: not a DICOM series folder (no readable DICOM files)")
    if len(series_ids) > 1:
        raise ScanError(f"{folder}: holds {len(series_ids)} DICOM series; put each series in its own folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    try:
        datasets = [pydicom.dcmread(name, stop_before_pixels=True) for name in files]
    except Exception as err:
        raise ScanError(f"{folder}: cannot read DICOM headers ({type(err).__name__}: {err})") from err
    _check_slice_positions(datasets, folder)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ScanError(f"{folder}: cannot read DICOM pixels ({str(err).strip().splitlines()[-1]})") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(f"{folder}: expected a 3D single-channel series, got {image.GetDimension()}D "
                        f"with {image.GetNumberOfComponentsPerPixel()} component(s)")
    # SimpleITK gives [slice, row, column] with rescale slope/intercept applied; store [column, row, slice].
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0), dtype=np.float32)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    return Scan(array=array, affine=LPS_TO_RAS @ lps, path=folder, kind="dicom", dicom_datasets=datasets)


def _check_slice_positions(datasets: list, folder: Path) -> None:
    """Refuse a series whose slices do not lie on one regular grid (missing or duplicate slices)."""
    if len(datasets) < 2:
        return
    try:
        orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
        positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    except AttributeError as err:
        raise ScanError(f"{folder}: DICOM slices lack position/orientation ({err})") from err
    normal = np.cross(orientation[:3], orientation[3:])
    gaps = np.diff(np.sort(positions @ normal))
    median = float(np.median(gaps))
    if median <= 0 or np.max(np.abs(gaps - median)) > SLICE_GAP_TOLERANCE * median:
        raise ScanError(f"{folder}: slices are not evenly spaced (gaps {gaps.min():.3g}..{gaps.max():.3g} mm); "
                        "missing or duplicate slices?")
