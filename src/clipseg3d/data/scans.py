"""Finding and reading CT scans: NIfTI files and DICOM series.

A :class:`Scan` keeps the voxels in the file's own order as a float32 HU array indexed
``[i, j, k]`` (for DICOM: column, row, slice), with a 4x4 affine from voxel indices to RAS
world millimetres. Outputs written on that grid (:mod:`clipseg3d.inference.outputs`) overlay
the input in any viewer.

DICOM files are recognised by content, whatever their names (archives often name them by UID,
``CT.1.3.12...``, or give no suffix): a file with the ``DICM`` preamble, or one that starts like a
bare DICOM data set and yields a DICOM header. NIfTI files and DICOMDIR indexes never count.
Every refusal is a :class:`ScanError` of one line naming the file, the problem and what to do;
a scan read with doubts (no negative values, so not CT-like) raises one :class:`ScanWarning`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: First two bytes of a DICOM data set stored without preamble: group 0x0000, 0x0002 or 0x0008, little endian.
BARE_DICOM_STARTS = (b"\x00\x00", b"\x02\x00", b"\x08\x00")
#: Steps between slices that differ by more than this fraction of the smallest step make a series unusable.
SLICE_GAP_TOLERANCE = 0.1
#: A step between neighbouring slices over this many slice thicknesses means a slice is missing.
MISSING_SLICE_STEP = 1.5
#: Slices closer than this (mm) lie at the same position.
SAME_POSITION_MM = 0.01
NONFINITE_CHOICES = ("refuse", "clean")


class ScanError(ValueError):
    """A scan that cannot be found, read or used; the message names the file."""


class ScanWarning(UserWarning):
    """A scan that is read but looks wrong for the model; the message names the file."""


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


def _dicom_probe(path: Path) -> str | None:
    """``"preamble"`` or ``"bare"`` when ``path`` may be a DICOM file, judged from its first 132 bytes."""
    if is_nifti(path) or path.name.upper() == "DICOMDIR" or not path.is_file():
        return None
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return "preamble"
    return "bare" if head[:2] in BARE_DICOM_STARTS else None


def _read_header(path: Path, probe: str):
    """The DICOM header of ``path`` (pixels left unread), or None when it is not a DICOM object.

    A file with the preamble that pydicom cannot read is refused; a bare one is simply not DICOM.
    """
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values while guessing at bare files
            header = pydicom.dcmread(path, force=probe == "bare", stop_before_pixels=True)
            known = "SOPClassUID" in header or "Modality" in header
            directory = header.get("SOPClassUID") == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in header
    except Exception as err:  # pydicom raises many types for files that are not (valid) DICOM
        if probe == "bare":
            return None
        raise ScanError(f"{path}: cannot read DICOM header ({_one_line(err)}); export the file again") from err
    return header if known and not directory else None


def _is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM file: the preamble (132 bytes read), or a bare header (one parse)."""
    probe = _dicom_probe(path)
    return probe == "preamble" or (probe == "bare" and _read_header(path, probe) is not None)


def _holds_dicom(folder: Path) -> bool:
    return any(_is_dicom_file(child) for child in folder.iterdir())


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no details'}"


def find_scans(inputs: Sequence[Path | str]) -> list[Path]:
    """Scans named by ``inputs``: NIfTI files, folders of NIfTI files, and DICOM series folders.

    A folder holding DICOM files (whatever their names) is one series; a folder without them
    contributes the NIfTI files directly inside it and every DICOM series folder below it. A
    DICOM file given directly stands for its folder. Cost: each folder's files are probed until
    the first DICOM one, reading 132 bytes each (and one header parse for a file without preamble
    that starts like DICOM), so a DICOM folder costs about one file read.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise ScanError(f"{item}: no such file or folder; check the path")
        if item.is_file():
            if is_nifti(item):
                found.append(item)
            elif _is_dicom_file(item):
                found.append(item.parent)
            else:
                raise ScanError(f"{item}: not a NIfTI (.nii, .nii.gz) or DICOM file; give NIfTI files, "
                                "DICOM files or folders holding them")
            continue
        if _holds_dicom(item):
            found.append(item)
            continue
        before = len(found)
        found.extend(sorted(child for child in item.iterdir() if child.is_file() and is_nifti(child)))
        found.extend(sorted(folder for folder in item.rglob("*") if folder.is_dir() and _holds_dicom(folder)))
        if len(found) == before:
            raise ScanError(f"{item}: folder holds no NIfTI files and no DICOM series; give NIfTI files "
                            "or folders holding them or DICOM slices")
    return list(dict.fromkeys(Path(os.path.abspath(path)) for path in found))


def read_scan(path: Path | str, nonfinite: str = "refuse") -> Scan:
    """Read a NIfTI file or a DICOM series folder as a :class:`Scan` (float32 HU, RAS affine).

    NaN or infinite voxels are refused, or with ``nonfinite="clean"`` replaced by the scan's
    lowest finite value (air) with one warning. A scan without negative values (not CT-like, e.g.
    MR) is read with one :class:`ScanWarning`.
    """
    if nonfinite not in NONFINITE_CHOICES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_CHOICES}, not {nonfinite!r}")
    path = Path(path)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        scan = _read_dicom_series(path)
    elif is_nifti(path):
        scan = _read_nifti(path)
    elif _is_dicom_file(path):
        scan = _read_dicom_series(path.parent)
    else:
        raise ScanError(f"{path}: not a NIfTI (.nii, .nii.gz) file or a DICOM series folder; give one of those")
    _check_values(scan, nonfinite)
    return scan


def _check_values(scan: Scan, nonfinite: str) -> None:
    """Refuse or clean NaN and infinite voxels; warn about a scan without negative values."""
    low, high = float(scan.array.min()), float(scan.array.max())  # NaN propagates, infinity shows
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = np.isfinite(scan.array)
        bad = finite.size - int(np.count_nonzero(finite))
        count = f"{bad:,} of {finite.size:,} voxels are NaN or infinite"
        if bad == finite.size:
            raise ScanError(f"{scan.path}: {count}; the scan holds no values, export it again")
        if nonfinite == "refuse":
            raise ScanError(f"{scan.path}: {count}; repair the scan, or read it with nonfinite='clean' to "
                            "replace them with its lowest finite value (air)")
        low, high = float(scan.array[finite].min()), float(scan.array[finite].max())
        scan.array = np.where(finite, scan.array, np.float32(low))
        warnings.warn(f"{scan.path}: {count}; replaced them with the scan's lowest finite value ({low:g})",
                      ScanWarning, stacklevel=3)
    if low >= 0:
        warnings.warn(f"{scan.path}: values run {low:g}..{high:g} with none negative, so this does not look "
                      "like CT (HU puts air at about -1000; MR, or CT without its rescale intercept?); "
                      "its segmentation is unlikely to be right", ScanWarning, stacklevel=3)


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """The 3D shape of a volume stored as ``shape`` (trailing singleton axes allowed)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3 or min(shape) < 1:
        raise ScanError(f"{path}: expected a 3D volume, got shape {tuple(shape)}; give one 3D CT volume per file")
    return tuple(int(size) for size in shape)


def _read_nifti(path: Path) -> Scan:
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types for files that are not NIfTI
        raise ScanError(f"{path}: cannot read NIfTI header ({_one_line(err)}); export the file again") from err
    shape = _spatial_shape(image.shape, path)
    if not np.all(np.isfinite(image.affine)):
        raise ScanError(f"{path}: the NIfTI affine is not finite; export the file again with valid geometry")
    try:
        array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as err:  # truncated or corrupt compressed data
        raise ScanError(f"{path}: cannot read NIfTI voxels ({_one_line(err)}); export the file again") from err
    return Scan(array=array, affine=image.affine.astype(np.float64), path=path, kind="nifti",
                header=image.header.copy())


def _series_slices(folder: Path) -> list:
    """Headers of the image slices (objects with ImagePositionPatient) of the one DICOM series in ``folder``.

    Other DICOM objects beside them (DICOMDIR, structured reports, segmentations) are passed over.
    Cost: one header parse per DICOM file, pixels left unread.
    """
    slices = []
    for child in sorted(folder.iterdir()):
        probe = _dicom_probe(child)
        header = _read_header(child, probe) if probe else None
        if header is not None and "ImagePositionPatient" in header:
            slices.append(header)
    if not slices:
        raise ScanError(f"{folder}: not a DICOM series folder (no DICOM image slices in it); give a folder "
                        "holding the slices of one CT series")
    series: dict[str, list] = {}
    for header in slices:
        series.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(header)
    if len(series) > 1:
        sizes = ", ".join(f"{len(members)} slices of series {members[0].get('SeriesNumber', '?')}"
                          for members in series.values())
        raise ScanError(f"{folder}: holds {len(series)} DICOM series ({sizes}); put each series in its own folder")
    return slices


def _slice_heights(slices: list, folder: Path) -> np.ndarray:
    """Each slice's position (mm) along the series' slice normal; slices must share one orientation."""
    try:
        orientations = np.array([ds.ImageOrientationPatient for ds in slices], dtype=float).reshape(len(slices), 6)
        positions = np.array([ds.ImagePositionPatient for ds in slices], dtype=float).reshape(len(slices), 3)
    except (AttributeError, TypeError, ValueError) as err:
        raise ScanError(f"{folder}: DICOM slices lack a usable position or orientation ({_one_line(err)}); "
                        "export the series again") from err
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise ScanError(f"{folder}: the slices have different orientations (a localizer or a second stack in "
                        "the series?); keep only the slices of one stack in the folder")
    return positions @ np.cross(orientations[0, :3], orientations[0, 3:])


def _check_instance_numbers(slices: list, folder: Path) -> None:
    """Refuse a gap in the slices' InstanceNumbers (they may start anywhere; absent or repeated: no check)."""
    try:
        numbers = np.array(sorted(int(ds.InstanceNumber) for ds in slices))
    except (AttributeError, TypeError, ValueError):
        return
    steps = np.diff(numbers)
    if not steps.size or steps.min() == 0 or steps.max() == 1:
        return
    gaps = [(numbers[i] + 1, numbers[i + 1] - 1) for i in np.flatnonzero(steps > 1)]
    absent = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in gaps[:3]) + (" ..." if len(gaps) > 3 else "")
    raise ScanError(f"{folder}: {int((steps - 1).sum())} slice(s) missing from the series (InstanceNumber "
                    f"{absent} absent from {numbers[0]}..{numbers[-1]}); export the whole series again")


def _nominal_step(header) -> float | None:
    """The series' intended slice step: SpacingBetweenSlices, else SliceThickness (mm), when given."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(header.get(keyword) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def _check_slice_steps(slices: list, heights: np.ndarray, folder: Path) -> None:
    """Refuse duplicate slices, uneven steps, and steps too wide for the slice thickness (missing slices)."""
    if len(slices) < 2:
        return
    steps = np.diff(heights)
    name = [Path(str(ds.filename)).name for ds in slices]
    if steps.min() < SAME_POSITION_MM:
        i = int(np.argmin(steps))
        raise ScanError(f"{folder}: {name[i]} and {name[i + 1]} lie at the same position (duplicate slices); "
                        "keep one copy of each slice")
    i = int(np.argmax(steps))
    widest = f"{steps[i]:.3g} mm between {name[i]} and {name[i + 1]}"
    if steps[i] - steps.min() > SLICE_GAP_TOLERANCE * steps.min():
        raise ScanError(f"{folder}: slices are not evenly spaced ({widest}, the closest {steps.min():.3g} mm "
                        "apart): a missing slice? export the whole series again")
    nominal = _nominal_step(slices[0])
    if nominal and steps[i] > MISSING_SLICE_STEP * nominal:
        raise ScanError(f"{folder}: slices missing ({widest}, over {MISSING_SLICE_STEP}x the {nominal:.3g} mm "
                        "slice thickness); export the whole series again")


def _read_dicom_series(folder: Path) -> Scan:
    import SimpleITK as sitk

    slices = _series_slices(folder)
    heights = _slice_heights(slices, folder)
    order = np.argsort(heights, kind="stable")
    slices, heights = [slices[i] for i in order], heights[order]
    _check_instance_numbers(slices, folder)
    _check_slice_steps(slices, heights, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(ds.filename) for ds in slices])
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise ScanError(f"{folder}: cannot read DICOM pixels ({_one_line(err)}); export the series again, "
                        "uncompressed if it is compressed") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(f"{folder}: expected a 3D single-channel series, got {image.GetDimension()}D "
                        f"with {image.GetNumberOfComponentsPerPixel()} component(s); give a CT series")
    if len(slices) == 1 and _nominal_step(slices[0]):  # one slice: its thickness, not ITK's 1 mm
        image.SetSpacing((*image.GetSpacing()[:2], _nominal_step(slices[0])))
    # SimpleITK gives [slice, row, column] with rescale slope/intercept applied; store [column, row, slice].
    array = np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0), dtype=np.float32)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    lps[:3, 3] = image.GetOrigin()
    return Scan(array=array, affine=LPS_TO_RAS @ lps, path=folder, kind="dicom", dicom_datasets=slices)
