"""Scanner sites and the partially labelled phantom datasets, read once from ``datasets.yaml``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

_TABLES: dict[str, Any] = yaml.safe_load(resources.files(__package__).joinpath("datasets.yaml").read_text())


@dataclass(frozen=True)
class Site:
    """A scanner and protocol: grid, field of view, slice thickness, noise and HU calibration."""

    name: str
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    fov_mm: tuple[float, float, float] = (384.0, 384.0, 288.0)
    fov_centre_z_mm: float = -20.0          # along the body axis, from the L1/L2 disc
    slice_thickness_mm: float | None = None  # None: the z spacing
    noise_hu: float = 12.0
    hu_offset: float = 0.0


SITES: dict[str, Site] = {
    name: Site(name, **{key: tuple(value) if isinstance(value, list) else value for key, value in fields.items()})
    for name, fields in _TABLES["sites"].items()}

#: Datasets that mirror public ones: labelled classes (a name, or a merged raw label
#: ``{name, classes, split}``), site, seed stream and tumour classes every case must show.
MULTI_DATASETS: dict[str, dict[str, Any]] = _TABLES["datasets"]


def get_site(site: Site | str) -> Site:
    """A site preset by name (or the site itself)."""
    if isinstance(site, Site):
        return site
    if site not in SITES:
        raise ValueError(f"unknown phantom site {site!r}; known sites: {', '.join(SITES)}")
    return SITES[site]
