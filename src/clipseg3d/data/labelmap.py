"""Dataset label maps: what each raw label value of a dataset means, and K-channel targets.

A label map is a YAML file (schema: ``name``, ``title``, ``source``, ``label_count``, ``layout``,
``labels``) that says, for every raw value of a dataset's label volumes, the structure's name
and the catalog class(es) it stands for::

    labels:
      1: spleen                                      # the name is the class
      2: {name: kidney, classes: [right_kidney, left_kidney], split: side}
      10: {name: lung_upper_lobe_left, class: left_lung}
      26: {name: vertebrae_T11}                      # listed, no class: reported as unmapped

:meth:`LabelMap.to_targets` turns a raw label volume into one binary channel per model class:

- a ``split: side`` label goes, voxel by voxel, to the class whose catalog ``side`` matches the
  voxel's side of the body (RAS world x against the body midline; right = larger x);
- a class with catalog ``parents`` (a tumour) also counts for its parents; when the parents are
  a left/right pair, each voxel counts for the parent on its own side.

The ``layout`` mapping is read by :mod:`clipseg3d.data.index`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import yaml

from clipseg3d.catalog import CatalogError, ClassCatalog, ClassEntry, load_catalog

SPLIT_RULES = ("side",)
BODY_HU_THRESHOLD = -500.0
MAP_FIELDS = {"name", "title", "source", "label_count", "layout", "labels"}
EXTENSION_FIELDS = {"extends", "source", "labels"}
LABEL_FIELDS = {"name", "class", "classes", "split"}
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


# -- YAML reading ------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping key given twice."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                what = f"raw value {key}" if _as_value(key) is not None else f"key {key!r}"
                raise LabelMapError(f"{what} is given twice (line {key_node.start_mark.line + 1})")
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Mapping:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except LabelMapError as err:
        raise LabelMapError(f"{path}: {err}") from err
    except (OSError, yaml.YAMLError) as err:
        raise LabelMapError(f"{path}: cannot read label map ({err})") from err
    if not isinstance(data, Mapping):
        raise LabelMapError(f"{path}: a label map must be a YAML mapping")
    return data


def _as_value(key: Any) -> int | None:
    """``key`` as a raw label value (int, or a string of digits), else None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return None


def _parse_label(key: Any, spec: Any, source: str, catalog: ClassCatalog) -> RawLabel:
    """One ``labels`` entry, validated against ``catalog``."""
    value = _as_value(key)
    if value is None or value <= 0:
        raise LabelMapError(f"{source}: raw value {key!r} is not a positive integer (0 is background)")
    if isinstance(spec, str):
        spec = {"name": spec, "class": spec}
    if not isinstance(spec, Mapping):
        raise LabelMapError(f"{source}: raw value {value}: expected a class name or a mapping, got {spec!r}")
    unknown = set(spec) - LABEL_FIELDS
    if unknown:
        raise LabelMapError(f"{source}: raw value {value}: unknown field(s) {sorted(unknown)}")
    if "class" in spec and "classes" in spec:
        raise LabelMapError(f"{source}: raw value {value}: give 'class' or 'classes', not both")
    classes = spec.get("classes", spec.get("class", ()))
    classes = (classes,) if isinstance(classes, str) else tuple(classes or ())
    entries = []
    for name in classes:
        entry = catalog.get(str(name))
        if entry is None:
            raise LabelMapError(f"{source}: raw value {value}: unknown class {name!r}")
        entries.append(entry)
    label_name = spec.get("name") or (entries[0].name if len(entries) == 1 else None)
    if not label_name:
        raise LabelMapError(f"{source}: raw value {value}: a name is needed")
    split = spec.get("split")
    _check_split(value, split, entries, source)
    return RawLabel(value, str(label_name), tuple(entry.name for entry in entries), split)


def _check_split(value: int, split: str | None, entries: list[ClassEntry], source: str) -> None:
    where = f"{source}: raw value {value}"
    if split is None:
        if len(entries) > 1:
            raise LabelMapError(f"{where}: several classes need 'split: side'")
        return
    if split not in SPLIT_RULES:
        raise LabelMapError(f"{where}: split {split!r} is not one of {SPLIT_RULES}")
    sides = sorted(entry.side or "none" for entry in entries)
    if sides != ["left", "right"]:
        raise LabelMapError(f"{where}: 'split: side' needs one left and one right class, got "
                            f"{[entry.name for entry in entries]}")


def _parse_labels(labels: Any, source: str, catalog: ClassCatalog) -> dict[int, RawLabel]:
    if not isinstance(labels, Mapping) or not labels:
        raise LabelMapError(f"{source}: 'labels' must be a non-empty mapping of raw value -> label")
    parsed: dict[int, RawLabel] = {}
    for key, spec in labels.items():
        raw = _parse_label(key, spec, source, catalog)
        if raw.value in parsed:
            raise LabelMapError(f"{source}: raw value {raw.value} is mapped twice")
        parsed[raw.value] = raw
    return parsed


def _check_unique_names(labels: Mapping[int, RawLabel], source: str) -> None:
    seen: dict[str, int] = {}
    for raw in labels.values():
        if raw.name in seen:
            raise LabelMapError(f"{source}: name {raw.name!r} is used by raw values {seen[raw.name]} and {raw.value}")
        seen[raw.name] = raw.value


def _builtin_dir():
    return resources.files(__package__).joinpath("labelmaps")


def available_label_maps() -> list[str]:
    """Names of the built-in dataset label maps."""
    return sorted(item.name[:-5] for item in _builtin_dir().iterdir() if item.name.endswith(".yaml"))


def _looks_like_path(name_or_path: str | Path) -> bool:
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text


def label_map_path(name_or_path: str | Path) -> Path:
    """The YAML file for a built-in map name or a path."""
    if _looks_like_path(name_or_path):
        return Path(name_or_path)
    if name_or_path not in available_label_maps():
        raise LabelMapError(f"unknown label map {name_or_path!r}: give a YAML path or one of "
                            f"{', '.join(available_label_maps())}")
    return Path(str(_builtin_dir().joinpath(f"{name_or_path}.yaml")))


# -- the label map -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelMap:
    """What the raw label values of one dataset mean, validated against a class catalog."""

    name: str
    title: str
    source: str
    label_count: int
    layout: dict
    labels: dict[int, RawLabel]
    path: Path | None = None
    catalog: ClassCatalog | None = field(default=None, repr=False, compare=False)
    extended_by: tuple[str, ...] = ()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path, catalog: ClassCatalog | None = None) -> "LabelMap":
        """A built-in map by name (see :func:`available_label_maps`) or a label-map YAML file."""
        path = label_map_path(name_or_path)
        return cls.from_mapping(_read_yaml(path), source=str(path), catalog=catalog, path=path)

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "<mapping>", catalog: ClassCatalog | None = None,
                     path: Path | None = None) -> "LabelMap":
        """Build and validate a map from the parsed YAML mapping."""
        catalog = catalog if catalog is not None else load_catalog()
        unknown = set(data) - MAP_FIELDS
        if unknown:
            raise LabelMapError(f"{source}: unknown field(s) {sorted(unknown)}; expected {sorted(MAP_FIELDS)}")
        count = data.get("label_count")
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise LabelMapError(f"{source}: label_count must be a positive integer, got {count!r}")
        layout = data.get("layout") or {}
        if not isinstance(layout, Mapping) or (layout and not isinstance(layout.get("kind"), str)):
            raise LabelMapError(f"{source}: 'layout' must be a mapping with a 'kind'")
        labels = _parse_labels(data.get("labels"), source, catalog)
        _check_unique_names(labels, source)
        name = data.get("name") or (path.stem if path else None)
        if not name:
            raise LabelMapError(f"{source}: a label map needs a 'name'")
        return cls(name=str(name), title=str(data.get("title", "")), source=str(data.get("source", "")),
                   label_count=count, layout=dict(layout), labels=dict(sorted(labels.items())), path=path,
                   catalog=catalog)

    def extend(self, other: Mapping | str | Path, catalog: ClassCatalog | None = None) -> "LabelMap":
        """A new map with the raw labels of an extension (a mapping or a YAML path) added.

        An extension may give a class to a raw label this map lists without one, or add raw
        values; re-mapping a value that already has a class is an error. A short-form entry
        (``26: vertebrae``) names the class; the raw label keeps its listed name.
        """
        if isinstance(other, Mapping):
            data, source = other, str(other.get("source") or "<extension>")
        else:
            data, source = _read_yaml(Path(other)), str(other)
        catalog = catalog or self.catalog or load_catalog()
        unknown = set(data) - EXTENSION_FIELDS
        if unknown:
            raise LabelMapError(f"{source}: unknown field(s) {sorted(unknown)}; expected {sorted(EXTENSION_FIELDS)}")
        if data.get("extends") not in (None, self.name):
            raise LabelMapError(f"{source}: extends {data['extends']!r}, not {self.name!r}")
        labels = dict(self.labels)
        for key, spec in (data.get("labels") or {}).items():
            value = _as_value(key)
            listed = labels.get(value) if value is not None else None
            if listed is not None and isinstance(spec, str):
                spec = {"name": listed.name, "class": spec}
            raw = _parse_label(key, spec, source, catalog)
            if listed is not None:
                if listed.classes:
                    raise LabelMapError(f"{source}: raw value {raw.value} ({listed.name}) of {self.name!r} "
                                        f"already maps to {', '.join(listed.classes)}; it cannot be re-mapped")
                if raw.name != listed.name:
                    raise LabelMapError(f"{source}: raw value {raw.value} is {listed.name!r} in {self.name!r}, "
                                        f"not {raw.name!r}")
            labels[raw.value] = raw
        _check_unique_names(labels, source)
        return replace(self, labels=dict(sorted(labels.items())), catalog=catalog,
                       extended_by=self.extended_by + (source,))

    def with_plugins(self, plugins: Sequence | None = None, catalog: ClassCatalog | None = None) -> "LabelMap":
        """This map extended by every plugin label-map file that ``extends`` it.

        A plugin file that cannot be read or does not fit is reported with a warning and skipped.
        """
        if plugins is None:
            from clipseg3d.catalog.plugins import discover

            plugins, _ = discover()
        extended = self
        for plugin in plugins:
            for path in plugin.label_maps:
                try:
                    data = _read_yaml(Path(path))
                    if data.get("extends") == self.name:
                        extended = extended.extend(Path(path), catalog=catalog)
                except (LabelMapError, CatalogError) as err:
                    warnings.warn(f"plugin {plugin.name}: {err}", stacklevel=2)
        return extended

    # -- views ----------------------------------------------------------------------------------
    @property
    def labelled_classes(self) -> list[str]:
        """Every class this dataset labels, in raw-value order (both sides of a split)."""
        seen: dict[str, None] = {}
        for raw in self.labels.values():
            seen.update(dict.fromkeys(raw.classes))
        return list(seen)

    @property
    def unmapped(self) -> list[tuple[int, str]]:
        """(value, name) of every listed raw label without a class."""
        return [(raw.value, raw.name) for raw in self.labels.values() if not raw.classes]

    def value_of(self, name: str) -> int:
        """The raw value of the structure called ``name``."""
        for raw in self.labels.values():
            if raw.name == name:
                return raw.value
        raise LabelMapError(f"label map {self.name!r} has no raw label named {name!r}")

    # -- targets --------------------------------------------------------------------------------
    def to_targets(self, label: np.ndarray, affine: np.ndarray, class_names: Sequence[str],
                   image: np.ndarray | None = None, catalog: ClassCatalog | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
        """K binary target channels for ``class_names`` from a raw label volume.

        ``label``: integer-valued 3-D array; ``affine``: its 4x4 voxel-to-RAS matrix; ``image``:
        the CT on the same grid, in HU, used for the body midline (else the labels are).
        Returns ``targets`` (uint8, [K, *label.shape]), ``labelled`` (bool, [K]: the dataset labels
        that class) and a report: ``unmapped_present`` and ``unknown_values`` (lists of dicts with
        value, name, voxels), ``midline_x`` and ``midline_from`` (None when no side was needed).
        """
        catalog = catalog or self.catalog or load_catalog()
        names = catalog.resolve(class_names)
        if len(set(names)) != len(names):
            raise LabelMapError(f"{self.name}: class list {list(class_names)} names a class twice")
        label = _integer_labels(label, self.name)
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise LabelMapError(f"{self.name}: affine must be 4x4, got shape {affine.shape}")
        if image is not None and np.shape(image) != label.shape:
            raise LabelMapError(f"{self.name}: image shape {np.shape(image)} differs from label shape {label.shape}")
        counts = _value_counts(label, max(self.labels) + 1)
        sides = _Sides(label, affine, image)
        codes = _ClassCodes(self, catalog, counts)
        voxel_codes = codes.assign(label, sides)
        targets = np.zeros((len(names), *label.shape), dtype=np.uint8)
        for k, name in enumerate(names):
            if codes.index.get(name, -1) in codes.present:
                targets[k] = voxel_codes == codes.index[name]
            for tumour, parent_side in codes.feeders(name):
                inside = voxel_codes == codes.index[tumour]
                if parent_side is not None:
                    inside &= sides.right() if parent_side == "right" else ~sides.right()
                targets[k] |= inside
        labelled = np.array([name in codes.index for name in names], dtype=bool)
        report = {
            "unmapped_present": [{"value": v, "name": n, "voxels": int(counts[v])}
                                 for v, n in self.unmapped if counts[v]],
            "unknown_values": [{"value": int(v), "voxels": int(counts[v])}
                               for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in self.labels],
            "midline_x": sides.midline, "midline_from": sides.midline_from,
        }
        return targets, labelled, report

    def from_segmentations(self, folder: Path) -> tuple[np.ndarray, np.ndarray]:
        """An id-keyed label volume and its affine from per-structure ``<name>.nii.gz`` masks."""
        folder = Path(folder)
        files = sorted(p for p in folder.glob("*.nii*") if not p.name.startswith("."))
        if not files:
            raise LabelMapError(f"{folder}: no per-structure NIfTI masks (<name>.nii.gz) found")
        values = {raw.name: raw.value for raw in self.labels.values()}
        stems = {path: path.name.split(".nii")[0] for path in files}
        unknown = [path.name for path, stem in stems.items() if stem not in values]
        if unknown:
            raise LabelMapError(f"{folder}: mask(s) {unknown[:5]} name no raw label of label map {self.name!r}")
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


# -- target helpers ----------------------------------------------------------------------------
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
    """Voxel count of every raw value, in slabs to bound memory."""
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
    """RAS world x of every voxel (float32)."""
    x = np.full((1, 1, 1), affine[0, 3], dtype=np.float32)
    for axis, size in enumerate(shape):
        step = (affine[0, axis] * np.arange(size)).astype(np.float32)
        x = x + step.reshape([-1 if a == axis else 1 for a in range(3)])
    return np.broadcast_to(x, shape)


class _ClassCodes:
    """Look-up tables from raw values to the map's labelled classes, and tumour -> parent links."""

    def __init__(self, label_map: LabelMap, catalog: ClassCatalog, counts: np.ndarray) -> None:
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
