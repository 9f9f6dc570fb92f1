"""Class plugins, discovered through the ``clipseg3d.classes`` entry-point group.

A plugin's entry point names an object that is, or returns when called, a mapping::

    {"classes": [{"name": ..., "kind": ..., "parents": [...], ...}, ...],
     "label_maps": ["/path/to/dataset_extension.yaml", ...]}   # optional

A label-map file is a label-map extension (see :meth:`clipseg3d.data.labelmap.LabelMap.extend`)
whose ``extends`` names a built-in dataset label map. A plugin that fails to import or does not
fit the catalog is reported and skipped; the rest keeps working. :func:`check` lists every
problem of the installed plugins' classes, one line each, naming the plugin.

:func:`load_catalog` reads the built-in YAML and scans the entry points once per process (per
``sys.path``: a plugin put on the path later is found on the next call).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from clipseg3d.catalog.entries import (
    DEFAULT_PROMPT_TEMPLATE,
    CatalogError,
    ClassCatalog,
    ClassEntry,
)

ENTRY_POINT_GROUP = "clipseg3d.classes"


class PluginError(RuntimeError):
    """A plugin that cannot be loaded or does not fit the catalog."""


@dataclass
class Plugin:
    """What one installed plugin provides."""

    name: str
    version: str
    classes: list[ClassEntry] = field(default_factory=list)
    label_maps: list[Path] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"plugin {self.name} {self.version}"


def _load(ep: EntryPoint) -> Plugin:
    dist = getattr(ep, "dist", None)
    version = dist.version if dist is not None else "?"
    label = f"{ep.name} {version}"
    try:
        obj = ep.load()
        spec = obj() if callable(obj) else obj
    except Exception as err:  # a plugin's own import error must not break the package
        raise PluginError(f"plugin {label}: cannot load {ep.value!r}: {type(err).__name__}: {err}") from err
    if not isinstance(spec, dict) or not isinstance(spec.get("classes", []), list) \
            or not isinstance(spec.get("label_maps", []), list):
        raise PluginError(f"plugin {label}: {ep.value!r} must give a mapping with a 'classes' list "
                          "(and optionally a 'label_maps' list)")
    source = f"plugin {label}"
    template = spec.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    try:
        classes = [ClassEntry.from_dict(item, template, source) for item in spec.get("classes", [])]
        for entry in classes:
            entry.check()
    except (CatalogError, TypeError, ValueError) as err:
        raise PluginError(f"plugin {label}: {err}") from err
    return Plugin(ep.name, version, classes, [Path(p) for p in spec.get("label_maps", [])])


def discover() -> tuple[list[Plugin], list[str]]:
    """Every installed plugin that loads, and one error line for each that does not."""
    plugins, errors = [], []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugins.append(_load(ep))
        except PluginError as err:
            errors.append(str(err))
    return plugins, errors


def resolve(catalog: ClassCatalog, plugins: list[Plugin]) -> tuple[ClassCatalog, list[Plugin], list[str]]:
    """``catalog`` plus the classes of every plugin that fits, those plugins, and an error per misfit.

    Each plugin's classes are added together or not at all (a clashing name or alias, or a
    parent or partner found nowhere, leaves the plugin out). Plugins may name each other's
    classes as parents or partners, whatever their order.
    """
    pending, accepted = list(plugins), []
    failures: dict[str, CatalogError] = {}
    progress = True
    while pending and progress:
        progress = False
        for plugin in list(pending):
            try:
                catalog = catalog.extend(plugin.classes)
            except CatalogError as err:
                failures[plugin.name] = err
                continue
            accepted.append(plugin)
            pending.remove(plugin)
            progress = True
    return catalog, accepted, [f"{plugin.source}: {failures[plugin.name]}" for plugin in pending]


def extend_with_plugins(catalog: ClassCatalog, plugins: list[Plugin] | None = None,
                        errors: list[str] | None = None, warn: bool = True) -> ClassCatalog:
    """``catalog`` plus each plugin's classes; a plugin that does not fit is skipped with an error."""
    errors = [] if errors is None else errors
    if plugins is None:
        plugins, found_errors = discover()
        errors = errors + found_errors
    catalog, _, misfits = resolve(catalog, plugins)
    errors = errors + misfits
    if warn:
        for line in errors:
            warnings.warn(line, stacklevel=2)
    return catalog


def check(catalog: ClassCatalog | None = None) -> tuple[ClassCatalog, list[Plugin], list[str]]:
    """Everything installed: the full catalog, the plugins that fit, and one line per problem of their classes."""
    plugins, errors = discover()
    catalog, accepted, misfits = resolve(catalog or ClassCatalog.builtin(), plugins)
    return catalog, accepted, errors + misfits


def load_catalog(with_plugins: bool = True) -> ClassCatalog:
    """The built-in catalog, extended by every installed class plugin that loads cleanly."""
    return _cached_catalog(with_plugins, tuple(sys.path))


@lru_cache(maxsize=8)
def _cached_catalog(with_plugins: bool, path: tuple[str, ...]) -> ClassCatalog:
    catalog = ClassCatalog.builtin()
    return extend_with_plugins(catalog) if with_plugins else catalog
