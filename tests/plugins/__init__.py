"""Class plugins for the tests, and installing a plugin without pip.

:func:`install_plugin` writes what pip would leave in ``site-packages`` (a
``<name>-<version>.dist-info`` folder with ``METADATA`` and ``entry_points.txt``, plus the
plugin's package) into a folder; put that folder on ``sys.path`` and
``importlib.metadata.entry_points`` finds the plugin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLEEN_LESION = HERE / "clipseg3d-spleen-lesion"
MUSCULOSKELETAL = HERE.parents[1] / "plugins" / "clipseg3d-musculoskeletal"


def install_plugin(site: Path, name: str, version: str, entry_points: dict[str, str],
                   packages: dict[str, Path | str] | None = None) -> Path:
    """Install a plugin into ``site``: ``entry_points`` maps entry-point names to ``module:attr``;
    ``packages`` maps a module or package name to a source folder or to a module's text."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[clipseg3d.classes]\n{lines}")
    for module, source in (packages or {}).items():
        if isinstance(source, Path):
            shutil.copytree(source, site / module, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (site / f"{module}.py").write_text(source)
    return site


def install_packaged(site: Path, project: Path) -> Path:
    """Install a plugin project folder (``setup.cfg`` with metadata and entry points) into ``site``."""
    import configparser

    config = configparser.ConfigParser()
    config.read(project / "setup.cfg")
    entry_points = {}
    for line in config["options.entry_points"]["clipseg3d.classes"].strip().splitlines():
        key, value = (part.strip() for part in line.split("="))
        entry_points[key] = value
    packages = {path.name: path for path in project.iterdir() if (path / "__init__.py").exists()}
    return install_plugin(site, config["metadata"]["name"], config["metadata"]["version"], entry_points, packages)
