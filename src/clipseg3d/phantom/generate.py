"""One deterministic synthetic abdominal CT from a seed.

A case is built in the canonical patient frame of :mod:`clipseg3d.phantom.anatomy`. The patient
varies per case (habitus, organ shifts, sizes and rotations, gas levels, bowel loops) and one
smooth random displacement field warps the frame; the structures are painted in priority order
into a tissue map, lesions are placed inside their parent organs, and the image is rendered as a
:class:`~clipseg3d.phantom.datasets.Site` would scan it. Four seed streams (anatomy, warp and
texture, lesions, noise) keep each part independent of the options of the others.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from clipseg3d.phantom.anatomy import HU_JITTER, LESIONS, MAX_TUMOUR_MM, TISSUES
from clipseg3d.phantom.case import PhantomCase, Tissue
from clipseg3d.phantom.classes import drawable_classes
from clipseg3d.phantom.datasets import Site, get_site
from clipseg3d.phantom.geometry import paint
from clipseg3d.phantom.lesions import check_lesion_contrast, place_lesions
from clipseg3d.phantom.patient import patient, warped_frame
from clipseg3d.phantom.render import render, texture_field


def _check_options(seed: int, min_tumour_mm: float, require_tumours: Sequence[str]) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom seed must be a non-negative integer, got {seed!r}")
    if not 0 < min_tumour_mm <= MAX_TUMOUR_MM:
        raise ValueError(f"min_tumour_mm must be in (0, {MAX_TUMOUR_MM:g}], got {min_tumour_mm}")
    unknown = [name for name in require_tumours if name not in LESIONS]
    if unknown:
        raise ValueError(f"require_tumours: {unknown} are not lesion classes ({', '.join(LESIONS)})")


def _grid(site: Site, spacing: np.ndarray, build: Mapping) -> tuple[np.ndarray, tuple, tuple]:
    """(affine, world axes, canonical axes) of the case's grid.

    The field of view is centred on the scanner axis; the body lies offset on the table, its
    frame scaled by the habitus and shifted along z by the couch position.
    """
    scale = build["scale"]
    shape = tuple(max(1, int(round(f / s))) for f, s in zip(site.fov_mm, spacing))
    body = np.array([*build["offset"], build["couch_z"]])
    fov_centre = np.array([0.0, 0.0, scale[2] * (site.fov_centre_z_mm + build["fov_z"]) + body[2]])
    origin = fov_centre - (np.array(shape) - 1) / 2 * spacing
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    world_axes = tuple((origin[d] + spacing[d] * np.arange(shape[d])).astype(np.float32) for d in range(3))
    axes = tuple(((world_axes[d] - body[d]) / scale[d]).astype(np.float32) for d in range(3))
    return affine, world_axes, axes


def generate_case(seed: int, site: Site | str = "default", spacing: Sequence[float] | None = None,
                  tumours: bool = True, extra_classes: Sequence[str] = (), *, noise: bool = True,
                  min_tumour_mm: float = 5.0, require_tumours: Sequence[str] = (),
                  lesion_contrast: Mapping[str, Sequence[float]] | None = None) -> PhantomCase:
    """One deterministic synthetic abdominal CT.

    ``site`` fixes grid, field of view, blur, noise and HU offset (``spacing`` overrides its
    spacing, keeping its field of view); ``tumours=False`` draws no lesions; ``extra_classes``
    labels extra classes (``spleen_lesion``) that are otherwise drawn under their parent's label;
    ``noise=False`` gives the noise-free image; lesions are at least ``min_tumour_mm`` wide and each
    class in ``require_tumours`` gets at least one lesion where its parent has room;
    ``lesion_contrast`` maps a lesion class to its HU range (low, high) relative to its parent,
    replacing the class's own (``{"spleen_lesion": (-60, -30)}``).
    """
    _check_options(seed, min_tumour_mm, require_tumours)
    site = get_site(site)
    label_names = drawable_classes(extra_classes)
    contrast = check_lesion_contrast(lesion_contrast or {})
    spacing = np.asarray(site.spacing if spacing is None else spacing, float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    rng_anatomy, rng_deform, rng_lesion, rng_noise = (np.random.default_rng([int(seed), k]) for k in range(4))

    structures, build = patient(rng_anatomy)
    tissues = [Tissue(name, value + rng_anatomy.uniform(-HU_JITTER, HU_JITTER) + site.hu_offset, cls, None, texture)
               for name, (value, cls, texture) in TISSUES.items()]
    affine, world_axes, axes = _grid(site, spacing, build)
    tissue = paint(structures, warped_frame(axes, rng_deform), tuple(len(a) for a in axes))

    lesions = (place_lesions(tissue, tissues, spacing, world_axes, rng_lesion, min_tumour_mm, require_tumours,
                             contrast) if tumours else [])
    for record in lesions:
        record["labelled"] = record["class"] in label_names.values()

    image = render(tissue, tissues, texture_field(axes, rng_deform), site, spacing, rng_noise if noise else None)
    case = PhantomCase(image=image, label=np.zeros(tissue.shape, np.uint8), affine=affine, label_names=label_names,
                       lesions=lesions, tissue=tissue, tissues=tissues, seed=int(seed), site=site)
    case.label = case.label_map({name: value for value, name in label_names.items()})
    return case
