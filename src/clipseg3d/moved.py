"""Module paths of earlier releases, kept importable so that configs naming them still work.

A config or script that names an old path (``class_path: clipseg3d.backbones.UNetBackbone``)
gets the module at its new path, with one warning that names the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    "clipseg3d.backbones": "clipseg3d.models.backbones",
    "clipseg3d.head": "clipseg3d.models.head",
    "clipseg3d.model": "clipseg3d.models.model",
    "clipseg3d.text_encoder": "clipseg3d.models.text_encoder",
    "clipseg3d.task": "clipseg3d.training.task",
    "clipseg3d.finetune": "clipseg3d.training.finetune",
    "clipseg3d.losses": "clipseg3d.training.losses",
    "clipseg3d.callbacks": "clipseg3d.training.callbacks",
    "clipseg3d.plugins": "clipseg3d.catalog.plugins",
    "clipseg3d.classes_cli": "clipseg3d.cli.classes",
    "clipseg3d.sweep": "clipseg3d.cli.sweep",
    "clipseg3d.demo": "clipseg3d.cli.demo",
    "clipseg3d.data.phantom": "clipseg3d.phantom",
    "clipseg3d.inference.io": "clipseg3d.data.scans",
    "clipseg3d.inference.segment": "clipseg3d.inference.pipeline",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module path with the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} has moved to {new}; update the import or class_path", FutureWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The module is already executed under its new name."""


def install() -> None:
    """Make the old module paths importable (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
