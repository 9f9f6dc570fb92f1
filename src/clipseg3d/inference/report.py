"""A JSON report of one segmented scan: organ volumes, and tumour lesions with world positions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.scans import voxel_spacing
from clipseg3d.files import replace_atomically
from clipseg3d.inference.postprocess import Masks, class_masks, connected_components


def _lesions(mask: np.ndarray, affine: np.ndarray, voxel_ml: float, probs: np.ndarray | None) -> list[dict]:
    """One entry per connected component of ``mask``, largest first (of equal sizes, in label order)."""
    labels, sizes, box = connected_components(mask)
    if sizes.size == 1:
        return []
    index = np.arange(1, sizes.size)
    sizes = sizes[1:]
    centroids = np.array(ndimage.center_of_mass(mask[box], labels, index)).reshape(-1, 3)
    centroids += [piece.start for piece in box]
    world = nib.affines.apply_affine(affine, centroids)
    peaks = None
    if probs is not None:
        values = probs[box].astype(np.float32)
        if probs.dtype == np.uint8:  # probabilities stored as 0..255
            values /= 255.0
        peaks = ndimage.maximum(values, labels, index)
    lesions = []
    for number in np.argsort(-sizes, kind="stable"):
        lesion = {"volume_ml": round(float(sizes[number]) * voxel_ml, 6), "voxels": int(sizes[number]),
                  "centroid_mm": [round(float(value), 2) for value in world[number]]}
        if peaks is not None:
            lesion["max_probability"] = round(float(np.atleast_1d(peaks)[number]), 4)
        lesions.append(lesion)
    return lesions


def build_report(masks: Masks, class_names: Sequence[str], catalog: ClassCatalog, affine: np.ndarray,
                 spacing: Sequence[float] | None = None, probs: np.ndarray | None = None) -> dict[str, Any]:
    """Per-class presence and volume; for tumour classes the lesions (connected components).

    ``masks``: ``{name: mask}`` or a ``[K, ...]`` bool stack; ``probs``: optional ``[K, ...]``
    probabilities (float, or uint8 read as value/255) giving each lesion's maximum probability. ``spacing``
    defaults to the voxel sizes of ``affine``. Lesion centroids are RAS world millimetres.
    """
    affine = np.asarray(affine, dtype=float)
    spacing = tuple(float(size) for size in (spacing if spacing is not None else voxel_spacing(affine)))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    named = class_masks(masks, class_names)
    classes: dict[str, dict[str, Any]] = {}
    shape: tuple[int, ...] = ()
    for index, (name, mask) in enumerate(named.items()):
        mask = np.asarray(mask, dtype=bool)
        shape = mask.shape
        entry = catalog[name]
        voxels = int(np.count_nonzero(mask))
        result: dict[str, Any] = {"kind": entry.kind, "label": index + 1, "present": voxels > 0,
                                  "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 6)}
        if entry.kind == "tumour":
            lesions = _lesions(mask, affine, voxel_ml, probs[index] if probs is not None else None)
            result.update(detected=bool(lesions), lesion_count=len(lesions), lesions=lesions)
        classes[name] = result
    return {
        "scan": {"shape": list(shape), "spacing_mm": list(spacing), "affine": affine.round(6).tolist(),
                 "voxel_volume_ml": voxel_ml},
        "classes": classes,
        "detected_tumours": [name for name, result in classes.items() if result.get("detected")],
    }


def write_report_atomic(report: dict[str, Any], path: Path | str) -> Path:
    """Write ``report`` as indented JSON at ``path`` via a temporary file in the same folder."""
    text = json.dumps(report, indent=2)
    return replace_atomically(Path(path), lambda temp: temp.write_text(text + "\n"))
