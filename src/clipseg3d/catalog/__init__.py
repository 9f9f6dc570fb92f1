"""The class catalog: every class the model can segment, as data (:mod:`.entries`), extended by
installed class plugins (:mod:`.plugins`)."""

from clipseg3d.catalog.entries import (
    DEFAULT_PROMPT_TEMPLATE,
    KINDS,
    SIDES,
    CatalogError,
    ClassCatalog,
    ClassEntry,
)
from clipseg3d.catalog.plugins import load_catalog

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "KINDS", "SIDES", "CatalogError", "ClassCatalog", "ClassEntry", "load_catalog"]
