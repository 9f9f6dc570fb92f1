"""Label volumes from the forms public datasets ship them in, besides one id-keyed NIfTI file.

- Structure masks (:func:`read_structure_masks`): a folder holding one mask per structure, each a
  DICOM series folder (3D-IRCADb's ``MASKS_DICOM/liver/``) or a NIfTI file; the label map's
  ``layout.masks`` gives, per raw label name, the glob pattern(s) of the entries that make it
  (their union; entries no pattern matches are left out).
- Slice masks (:func:`read_slice_masks`): a folder of one PNG per slice of the image's DICOM
  series (CHAOS's ``Ground/``), paired with the series' files by name order (numbers compared as
  numbers); ``layout.slice_values`` maps grey values to raw label values (default: unchanged).

Both return an integer volume in the voxel order :func:`~clipseg3d.data.scans.read_scan` gives
(``[column, row, slice]`` for DICOM) and its RAS affine, so MONAI's orientation and resampling
put it on the image's grid.
"""

from __future__ import annotations

import warnings
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from clipseg3d.data.grids import dicom_series_geometry, natural_key
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.scans import ScanWarning, read_scan, scan_stem
from clipseg3d.data.targets import LabelMapError


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))


def _patterns(spec: str | list) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def read_structure_masks(label_map: LabelMap, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An id-keyed label volume and its RAS affine from the per-structure masks in ``folder``.

    Where masks overlap, the larger raw value wins (a tumour over its organ).
    """
    folder = Path(folder)
    values = {raw.name: raw.value for raw in label_map.labels.values()}
    patterns = dict(label_map.layout.get("masks") or {})
    unknown = sorted(set(patterns) - set(values))
    if unknown:
        raise LabelMapError(f"{label_map.name}: layout 'masks' names {unknown}, which are no raw labels of the map")
    if not folder.is_dir():
        raise LabelMapError(f"{folder}: mask folder not found")
    label = affine = None
    for name in sorted(patterns, key=values.get):
        for entry in _visible(folder):
            if not any(fnmatch(scan_stem(entry), pattern) for pattern in _patterns(patterns[name])):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ScanWarning)  # masks hold no negative values
                mask = read_scan(entry)
            if label is None:
                label = np.zeros(mask.shape, dtype=np.uint8 if max(values.values()) < 256 else np.uint16)
                affine, first = mask.affine, entry
            elif mask.shape != label.shape or not np.allclose(mask.affine, affine, atol=1e-4):
                raise LabelMapError(f"{entry}: grid (shape {mask.shape}) differs from {first.name} "
                                    f"(shape {label.shape})")
            label[mask.array > 0] = values[name]
    if label is None:
        raise LabelMapError(f"{folder}: no mask matches layout 'masks' {patterns}")
    return label, np.asarray(affine, dtype=np.float64)


def read_slice_masks(label_map: LabelMap, folder: Path, series: Path) -> tuple[np.ndarray, np.ndarray]:
    """A label volume and its RAS affine from one PNG mask per slice of the DICOM ``series``."""
    from PIL import Image

    folder, series = Path(folder), Path(series)
    if not folder.is_dir():
        raise LabelMapError(f"{folder}: slice mask folder not found")
    pngs = [p for p in _visible(folder) if p.suffix.lower() == ".png"]
    files, slots, affine, (rows, columns) = dicom_series_geometry(series)
    if len(pngs) != len(files):
        raise LabelMapError(f"{folder}: {len(pngs)} PNG masks for the {len(files)} slices of {series}; "
                            "expected one mask per slice")
    mapping = {int(k): int(v) for k, v in (label_map.layout.get("slice_values") or {}).items()}
    lookup = np.full(1 << 16, -1, dtype=np.int64) if mapping else np.arange(1 << 16)
    lookup[0] = 0
    for grey, value in mapping.items():
        lookup[grey] = value
    label = np.zeros((columns, rows, len(files)), dtype=np.uint16)
    for png, slot in zip(pngs, slots):
        mask = np.asarray(Image.open(png))
        if mask.shape != (rows, columns):
            raise LabelMapError(f"{png}: shape {mask.shape} differs from the series' slices ({rows}, {columns})")
        raw = lookup[mask.astype(np.int64)]
        if raw.min() < 0:
            raise LabelMapError(f"{png}: grey value(s) {sorted(set(np.unique(mask[raw < 0]).tolist()))} are not in "
                                f"layout 'slice_values' {mapping}")
        label[:, :, slot] = raw.T
    return label, affine
