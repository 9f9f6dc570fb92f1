"""Class plugins, discovered through the ``clipseg3d.classes`` entry-point group.

A plugin's entry point names an object that is, or returns when called, a mapping::

    {"classes": [{"name": ..., "kind": ..., "parents": [...], ...}, ...],
     "label_maps": ["/path/to/dataset_extension.yaml", ...]}   # optional

A plugin that fails to import or does not fit the catalog is reported and skipped; the rest
keeps working.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from clipseg3d.catalog import DEFAULT_PROMPT_TEMPLATE, CatalogError, ClassCatalog, ClassEntry

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
    if not isinstance(spec, dict) or not isinstance(spec.get("classes", []), list):
        raise PluginError(f"plugin {label}: {ep.value!r} must give a mapping with a 'classes' list")
    source = f"plugin {label}"
    template = spec.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    try:
        classes = [ClassEntry.from_dict(item, template, source) for item in spec.get("classes", [])]
        for entry in classes:
            entry.check()
    except CatalogError as err:
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


def extend_with_plugins(catalog: ClassCatalog, plugins: list[Plugin] | None = None,
                        errors: list[str] | None = None, warn: bool = True) -> ClassCatalog:
    """``catalog`` plus each plugin's classes; a plugin that clashes is skipped with an error."""
    if plugins is None:
        plugins, found_errors = discover()
        errors = found_errors if errors is None else errors + found_errors
    errors = [] if errors is None else errors
    for plugin in plugins:
        try:
            catalog = catalog.extend(plugin.classes)
        except CatalogError as err:
            errors.append(f"plugin {plugin.name} {plugin.version}: {err}")
    if warn:
        for line in errors:
            warnings.warn(line, stacklevel=2)
    return catalog
