"""The classes a phantom can label: the built-in catalog's drawn classes plus requested extras."""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from clipseg3d.catalog import ClassCatalog
from clipseg3d.phantom.anatomy import EXTRA_CLASSES, LESIONS, TISSUES


@lru_cache(maxsize=1)
def phantom_catalog() -> ClassCatalog:
    """The built-in catalog plus the phantom's extra classes; checks every class the anatomy names."""
    catalog = ClassCatalog.builtin()
    catalog = catalog.extend(entry for name, entry in EXTRA_CLASSES.items() if name not in catalog)
    for name in [cls for _, cls, _ in TISSUES.values() if cls] + list(LESIONS):
        catalog[name]                     # raises CatalogError for a class the catalog lacks
    return catalog


def drawable_classes(extra_classes: Sequence[str] = ()) -> dict[int, str]:
    """Raw value -> class for every class a case can label: built-in order, extras appended."""
    catalog = phantom_catalog()
    unknown = [name for name in extra_classes if name not in EXTRA_CLASSES]
    if unknown:
        raise ValueError(f"unknown extra class(es) {unknown}; the phantom can add: {', '.join(EXTRA_CLASSES)}")
    drawn = {cls for _, cls, _ in TISSUES.values() if cls} | set(LESIONS)
    builtin = [entry.name for entry in catalog if entry.source == "built-in"]
    names = [name for name in builtin if name in drawn]
    values = {builtin.index(name) + 1: name for name in names}
    for name in EXTRA_CLASSES:
        if name in extra_classes:
            values[len(builtin) + 1 + list(EXTRA_CLASSES).index(name)] = catalog[name].name
    return values
