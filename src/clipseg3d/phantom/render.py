"""The CT image of a tissue map: tissue HU plus texture, the scanner's blur, and correlated noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from clipseg3d.phantom.case import Tissue
from clipseg3d.phantom.datasets import Site
from clipseg3d.phantom.fields import tensor_field

TEXTURE_KNOTS = tuple(np.arange(-300, 301, 18.0) for _ in range(2)) + (np.arange(-360, 361, 18.0),)


def texture_field(axes, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture on the grid (canonical ``axes``), before per-tissue normalisation."""
    return tensor_field(axes, TEXTURE_KNOTS, rng.normal(size=tuple(len(k) for k in TEXTURE_KNOTS)))


def render(tissue: np.ndarray, tissues: list[Tissue], texture: np.ndarray, site: Site, spacing: np.ndarray,
           rng: np.random.Generator | None) -> np.ndarray:
    """HU image: tissue values plus zero-mean texture per tissue, scanner blur, correlated noise."""
    flat = tissue.ravel()
    counts = np.bincount(flat, minlength=len(tissues))
    means = np.bincount(flat, weights=texture.ravel(), minlength=len(tissues)) / np.maximum(counts, 1)
    texture -= means.astype(np.float32)[tissue]
    texture /= max(float(texture.std()), 1e-6)
    values = np.array([t.hu for t in tissues], np.float32)
    amplitude = np.array([t.texture for t in tissues], np.float32)
    image = values[tissue] + amplitude[tissue] * texture
    thickness = site.slice_thickness_mm or spacing[2]
    sigma_mm = np.array([0.45 * spacing[0], 0.45 * spacing[1], max(0.45 * spacing[2], 0.42 * thickness)])
    image = ndimage.gaussian_filter(image, sigma_mm / spacing, truncate=3.0)
    if rng is not None and site.noise_hu > 0:
        grain = ndimage.gaussian_filter(rng.standard_normal(tissue.shape, dtype=np.float32), 0.6, truncate=3.0)
        image += grain * np.float32(site.noise_hu / max(float(grain.std()), 1e-6))
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)
