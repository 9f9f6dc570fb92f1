"""Dataset label maps: what each raw label value of a dataset means.

A label map is a YAML file (schema: ``name``, ``title``, ``source``, ``label_count``, ``layout``,
``labels``) that says, for every raw value of a dataset's label volumes, the structure's name
and the catalog class(es) it stands for::

    labels:
      1: spleen                                      # the name is the class
      2: {name: kidney, classes: [right_kidney, left_kidney], split: side}
      10: {name: lung_upper_lobe_left, class: left_lung}
      26: {name: vertebrae_T11}                      # listed, no class: reported as unmapped

:meth:`LabelMap.to_targets` turns a raw label volume into one binary channel per model class
(see :mod:`clipseg3d.data.targets`). The ``layout`` mapping is read by :mod:`clipseg3d.data.index`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from clipseg3d.catalog import CatalogError, ClassCatalog, ClassEntry, load_catalog
from clipseg3d.data.targets import LabelMapError, RawLabel, build_targets

SPLIT_RULES = ("side",)
MAP_FIELDS = {"name", "title", "source", "label_count", "layout", "labels"}
EXTENSION_FIELDS = {"extends", "source", "labels"}
LABEL_FIELDS = {"name", "class", "classes", "split"}


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

    def to_targets(self, label: np.ndarray, affine: np.ndarray, class_names: Sequence[str],
                   image: np.ndarray | None = None, catalog: ClassCatalog | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
        """K binary target channels for ``class_names`` from a raw label volume of this dataset.

        See :func:`clipseg3d.data.targets.build_targets`, which this calls with this map.
        """
        return build_targets(self, label, affine, class_names, image=image, catalog=catalog)
