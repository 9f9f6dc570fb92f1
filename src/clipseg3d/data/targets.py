"""Label volumes and K-channel targets: what a dataset's raw label values become for the model.

:func:`build_targets` turns a raw label volume into one binary channel per model class, reading
what each raw value stands for from a label map (:mod:`clipseg3d.data.labelmap`):

- a ``split: side`` label goes, voxel by voxel, to the class whose catalog ``side`` matches the
  voxel's side of the body (RAS world x against the body midline; right = larger x);
- a class with catalog ``parents`` (a tumour) also counts for its parents; when the parents are
  a left/right pair, each voxel counts for the parent on its own side.

:func:`build_code_map` gives the same targets as one int16 code per voxel and a small code table
(what the training caches hold). :func:`label_volume_from_masks` builds a raw label volume from
per-structure mask files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import nibabel as nib
import numpy as np

from clipseg3d.catalog import ClassCatalog, load_catalog

BODY_HU_THRESHOLD = -500.0
_CHUNK_VOXELS = 1 << 22


class LabelMapError(ValueError):
    """An invalid label map or extension, or a label volume that does not fit its map."""


@dataclass(frozen=True)
class RawLabel:
    """One raw value of a dataset's label volumes."""

    value: int
    name: str
    classes: tuple[str, ...] = ()
    split: str | None = None


class RawLabels(Protocol):
    """What targets are built from: a label map's name, raw labels and catalog."""

    name: str
    labels: Mapping[int, RawLabel]
    catalog: ClassCatalog | None

    @property
    def labelled_classes(self) -> list[str]: ...

    @property
    def unmapped(self) -> list[tuple[int, str]]: ...


def build_targets(label_map: RawLabels, label: np.ndarray, affine: np.ndarray, class_names: Sequence[str],
                  image: np.ndarray | None = None, catalog: ClassCatalog | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """K binary target channels for ``class_names`` from a raw label volume.

    ``label``: integer-valued 3-D array; ``affine``: its 4x4 voxel-to-RAS matrix; ``image``:
    the CT on the same grid, in HU, used for the body midline (else the labels are).
    Returns ``targets`` (uint8, [K, *label.shape]), ``labelled`` (bool, [K]: the dataset labels
    that class) and a report: ``unmapped_present`` and ``unknown_values`` (lists of dicts with
    value, name, voxels), ``midline_x`` and ``midline_from`` (None when no side was needed).
    """
    names, label, counts, sides, codes = _class_codes(label_map, label, affine, class_names, image, catalog)
    targets = codes.targets(names, codes.assign(label, sides), sides.right)
    return targets, codes.labelled(names), _report(label_map, counts, sides)


def build_code_map(label_map: RawLabels, label: np.ndarray, affine: np.ndarray, class_names: Sequence[str],
                   image: np.ndarray | None = None, catalog: ClassCatalog | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """:func:`build_targets` as one int16 code per voxel and a code table.

    Returns ``codes`` (int16, ``label.shape``), ``table`` (uint8, [M, K]) with
    ``table[codes]`` (channels last) equal to :func:`build_targets`' targets, and its ``labelled``
    and report. A code is ``2 * (c + 1) + right``: ``c`` the voxel's labelled class in the map
    (-1: none; after the left/right split) and ``right`` whether it lies right of the body midline,
    set only where a class's row depends on it (a tumour whose parents are a left/right pair).
    Code 0 has no class, so zero padding adds none.
    """
    names, label, counts, sides, codes = _class_codes(label_map, label, affine, class_names, image, catalog)
    size = len(codes.index) + 1
    if 2 * size > np.iinfo(np.int16).max:
        raise LabelMapError(f"{label_map.name}: {size - 1} labelled classes do not fit int16 codes")
    voxel_codes = codes.assign(label, sides)
    pair_classes = np.repeat(np.arange(-1, size - 1, dtype=np.int16), 2)
    pair_right = np.tile(np.array([False, True]), size)
    table = np.ascontiguousarray(codes.targets(names, pair_classes, lambda: pair_right).T)
    present = np.array(sorted(codes.present), dtype=np.int64)
    keys = (voxel_codes + 1) * np.int16(2)
    if np.any(table[2 * present + 2] != table[2 * present + 3]):
        keys += sides.right()
    return keys, table, codes.labelled(names), _report(label_map, counts, sides)


def _class_codes(label_map: RawLabels, label: np.ndarray, affine: np.ndarray, class_names: Sequence[str],
                 image: np.ndarray | None, catalog: ClassCatalog | None) -> tuple:
    """The checked inputs of :func:`build_targets`: class names, label, value counts, sides, class codes."""
    catalog = catalog or label_map.catalog or load_catalog()
    names = catalog.resolve(class_names)
    if len(set(names)) != len(names):
        raise LabelMapError(f"{label_map.name}: class list {list(class_names)} names a class twice")
    label = _integer_labels(label, label_map.name)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise LabelMapError(f"{label_map.name}: affine must be 4x4, got shape {affine.shape}")
    if image is not None and np.shape(image) != label.shape:
        raise LabelMapError(f"{label_map.name}: image shape {np.shape(image)} differs from label shape "
                            f"{label.shape}")
    counts = _value_counts(label, max(label_map.labels) + 1)
    return names, label, counts, _Sides(label, affine, image), _ClassCodes(label_map, catalog, counts)


def _report(label_map: RawLabels, counts: np.ndarray, sides: "_Sides") -> dict:
    """Raw values present but unmapped or unknown, and the body midline used (if any)."""
    return {
        "unmapped_present": [{"value": v, "name": n, "voxels": int(counts[v])}
                             for v, n in label_map.unmapped if counts[v]],
        "unknown_values": [{"value": int(v), "voxels": int(counts[v])}
                           for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in label_map.labels],
        "midline_x": sides.midline, "midline_from": sides.midline_from,
    }


def label_volume_from_masks(label_map: RawLabels, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """An id-keyed label volume and its affine from per-structure ``<name>.nii.gz`` masks.

    Each file is named after a raw label of ``label_map``; where masks overlap, the larger raw
    value wins.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*.nii*") if not p.name.startswith("."))
    if not files:
        raise LabelMapError(f"{folder}: no per-structure NIfTI masks (<name>.nii.gz) found")
    values = {raw.name: raw.value for raw in label_map.labels.values()}
    stems = {path: path.name.split(".nii")[0] for path in files}
    unknown = [path.name for path, stem in stems.items() if stem not in values]
    if unknown:
        raise LabelMapError(f"{folder}: mask(s) {unknown[:5]} name no raw label of label map {label_map.name!r}")
    label = affine = None
    for path in sorted(files, key=lambda p: values[stems[p]]):
        image = nib.load(str(path))
        if label is None:
            dtype = np.uint8 if max(values.values()) < 256 else np.uint16
            label, affine = np.zeros(image.shape, dtype=dtype), image.affine
        elif image.shape != label.shape or not np.allclose(image.affine, affine, atol=1e-4):
            raise LabelMapError(f"{path}: grid (shape {image.shape}) differs from {files[0].name} "
                                f"(shape {label.shape})")
        label[np.asanyarray(image.dataobj) > 0] = values[stems[path]]
    return label, np.asarray(affine, dtype=np.float64)


def _integer_labels(label: np.ndarray, where: str) -> np.ndarray:
    """``label`` as a non-negative integer 3-D array (float labels must hold whole numbers)."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise LabelMapError(f"{where}: a label volume must be 3-D, got shape {label.shape}")
    if label.dtype == bool:
        return label.astype(np.uint8)
    if np.issubdtype(label.dtype, np.unsignedinteger):
        return label
    low, high = (label.min(), label.max()) if label.size else (0, 0)
    if low < 0 or not np.isfinite(high):
        raise LabelMapError(f"{where}: label values must be finite and non-negative, found {low}..{high}")
    dtype = np.uint8 if high < 256 else np.uint16 if high < 65536 else np.uint32
    converted = label.astype(dtype)
    if np.issubdtype(label.dtype, np.floating) and not np.array_equal(converted, label):
        raise LabelMapError(f"{where}: label values must be whole numbers (resample labels with nearest)")
    return converted


def _value_counts(label: np.ndarray, minlength: int) -> np.ndarray:
    """Voxel count of every raw value, in slabs to bound memory.

    On a 512x512x300 uint8 volume: 0.16 s and 32 MiB, where one ``np.bincount`` (an int64 copy
    of the volume) takes 0.41 s and 600 MiB and ``np.unique`` 0.59 s and 225 MiB
    (``python benchmarks/library_counterparts.py``).
    """
    flat = label.reshape(-1)
    counts = np.zeros(max(minlength, int(flat.max(initial=0)) + 1), dtype=np.int64)
    for start in range(0, flat.size, _CHUNK_VOXELS):
        chunk = np.bincount(flat[start:start + _CHUNK_VOXELS], minlength=counts.size)
        counts += chunk
    return counts


class _Sides:
    """Which voxels lie on the patient's right, computed on first use."""

    def __init__(self, label: np.ndarray, affine: np.ndarray, image: np.ndarray | None) -> None:
        self.label, self.affine, self.image = label, affine, image
        self.midline: float | None = None
        self.midline_from: str | None = None
        self._right: np.ndarray | None = None

    def right(self) -> np.ndarray:
        if self._right is None:
            x = _world_x(self.affine, self.label.shape)
            body = None
            if self.image is not None:
                image = np.asarray(self.image)
                if image.min() < BODY_HU_THRESHOLD:  # still in HU: air outside the body
                    body, self.midline_from = image > BODY_HU_THRESHOLD, "image"
            if body is None or not body.any():
                body, self.midline_from = self.label > 0, "labels"
            self.midline = float(x[body].mean(dtype=np.float64)) if body.any() else 0.0
            self._right = x > self.midline
        return self._right


def _world_x(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS world x of every voxel (float32), as a sum of one step vector per axis.

    On a 512x512x300 grid: 0.84 s and 301 MiB, where nibabel's ``apply_affine`` on the voxel
    index grid takes 6.7 s and 4500 MiB (``python benchmarks/library_counterparts.py``).
    """
    x = np.full((1, 1, 1), affine[0, 3], dtype=np.float32)
    for axis, size in enumerate(shape):
        step = (affine[0, axis] * np.arange(size)).astype(np.float32)
        x = x + step.reshape([-1 if a == axis else 1 for a in range(3)])
    return np.broadcast_to(x, shape)


class _ClassCodes:
    """Look-up tables from raw values to the map's labelled classes, and tumour -> parent links."""

    def __init__(self, label_map: RawLabels, catalog: ClassCatalog, counts: np.ndarray) -> None:
        self.catalog = catalog
        self.index = {name: i for i, name in enumerate(label_map.labelled_classes)}
        size = counts.size
        self.direct = np.full(size, -1, dtype=np.int16)
        self.by_side = {side: np.full(size, -1, dtype=np.int16) for side in ("right", "left")}
        self.split_values: list[int] = []
        for raw in label_map.labels.values():
            if raw.split == "side":
                for name in raw.classes:
                    self.by_side[catalog[name].side][raw.value] = self.index[name]
                self.split_values.append(raw.value)
            elif raw.classes:
                self.direct[raw.value] = self.index[raw.classes[0]]
        self.present = set(np.unique(self.direct[counts > 0]).tolist())
        present_split = [v for v in self.split_values if counts[v]]
        for value in present_split:
            self.present |= {int(self.by_side["right"][value]), int(self.by_side["left"][value])}
        self.present.discard(-1)
        self.has_split = bool(present_split)

    def assign(self, label: np.ndarray, sides: _Sides) -> np.ndarray:
        """One labelled-class code per voxel (-1: none)."""
        codes = self.direct[label]
        if self.has_split:
            split = np.isin(label, self.split_values)
            values = label[split]
            codes[split] = np.where(sides.right()[split], self.by_side["right"][values], self.by_side["left"][values])
        return codes

    def targets(self, names: Sequence[str], voxel_codes: np.ndarray, right) -> np.ndarray:
        """Binary channels [K, *voxel_codes.shape] for ``names`` (``right()``: the voxels right of the midline)."""
        targets = np.zeros((len(names), *voxel_codes.shape), dtype=np.uint8)
        for k, name in enumerate(names):
            if self.index.get(name, -1) in self.present:
                targets[k] = voxel_codes == self.index[name]
            for tumour, parent_side in self.feeders(name):
                inside = voxel_codes == self.index[tumour]
                if parent_side is not None:
                    inside &= right() if parent_side == "right" else ~right()
                targets[k] |= inside
        return targets

    def labelled(self, names: Sequence[str]) -> np.ndarray:
        """Which of ``names`` the map labels (bool, [K])."""
        return np.array([name in self.index for name in names], dtype=bool)

    def feeders(self, parent: str) -> list[tuple[str, str | None]]:
        """(labelled child class present in the volume, side it counts on or None) for ``parent``."""
        out = []
        for child in self.catalog.tumours_of(parent):
            if self.index.get(child.name, -1) not in self.present:
                continue
            sides = {self.catalog[p].side for p in child.parents}
            paired = len(child.parents) > 1 and None not in sides and len(sides) == len(child.parents)
            out.append((child.name, self.catalog[parent].side if paired else None))
        return out
