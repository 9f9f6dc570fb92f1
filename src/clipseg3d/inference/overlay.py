"""A PNG preview of a segmentation: axial, coronal and sagittal slices with coloured masks.

Panels are shown the radiological way whatever the scan's voxel order: axial seen from the
feet (patient right on the image's left, anterior up), coronal seen from the front (right on
the left, head up), sagittal with anterior on the left and head up. Pixels are square in mm.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.files import replace_atomically
from clipseg3d.inference.postprocess import (
    Masks,
    bounding_box,
    class_masks,
    keep_largest_component,
    merge_label_map,
)

ALPHA = 0.45
GAP_PX = 4
LEGEND_ROW_PX = 16
LEGEND_COLUMN_PX = 180
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
# The patient direction towards each panel's left edge (axial, coronal, sagittal), drawn there.
LEFT_EDGE_LETTERS = ("R", "R", "A")


def class_colour(index: int) -> tuple[int, int, int]:
    """A distinct colour for class ``index`` (0-based): hues spread by the golden ratio, with
    saturation and brightness alternating so that classes of similar hue still differ."""
    hue = (0.03 + index * 0.618033988749895) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, (0.9, 0.55)[index % 2], (1.0, 0.78)[(index // 2) % 2])
    return round(red * 255), round(green * 255), round(blue * 255)


def _focus(named: dict[str, np.ndarray], catalog: ClassCatalog) -> np.ndarray:
    """Voxel index of the centroid of the largest lesion, else of the largest organ, else the centre."""
    shape = next(iter(named.values())).shape
    tumours = [mask for name, mask in named.items() if catalog[name].kind == "tumour" and mask.any()]
    lesions = [keep_largest_component(mask) for mask in tumours]
    if lesions:
        target = max(lesions, key=np.count_nonzero)
    else:
        others = [mask for name, mask in named.items() if catalog[name].kind != "tumour"]
        target = max(others, key=np.count_nonzero, default=None)
    box = None if target is None else bounding_box(target)
    if box is None:
        return (np.array(shape) - 1) / 2.0
    # on the mask's box: a whole CT's index grids take seconds
    return np.array(ndimage.center_of_mass(target[box])) + [piece.start for piece in box]


def _planes(volume: np.ndarray, focus: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal planes of a RAS-ordered volume, as images (row 0 = top)."""
    x, y, z = focus
    # every plane becomes [row, column] with rows running down (S->I or A->P) and columns R->L or A->P
    return [volume[:, :, z].T[::-1, ::-1], volume[:, y, :].T[::-1, ::-1], volume[x, :, :].T[::-1, ::-1]]


def _blend(grey: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]], alpha: float) -> np.ndarray:
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=-1)
    for label, colour in colours.items():
        hit = labels == label
        rgb[hit] = (1.0 - alpha) * rgb[hit] + alpha * np.asarray(colour, np.float32)
    return np.round(rgb).astype(np.uint8)


def save_overlay_png(image_hu: np.ndarray, masks: Masks, class_names: Sequence[str], affine: np.ndarray,
                     path: Path | str, window: tuple[float, float] = (-175.0, 250.0), *,
                     catalog: ClassCatalog | None = None, panel_px: int = 320, alpha: float = ALPHA) -> Path:
    """Write a montage of three orthogonal slices through the most relevant structure, with a legend.

    The slices cross at the centroid of the largest lesion of any tumour class, else of the
    largest organ. ``window`` is the HU range mapped to black..white; ``panel_px`` is the size
    of the largest field-of-view extent in pixels. Each present class is drawn in
    :func:`class_colour` of its index, blended with ``alpha``; tumours are painted over organs.
    """
    catalog = catalog or load_catalog()
    named = {name: np.asarray(mask, dtype=bool) for name, mask in class_masks(masks, class_names).items()}
    if not named:
        raise ValueError(f"no classes to draw in {path}")
    if any(mask.shape != image_hu.shape for mask in named.values()):
        raise ValueError(f"masks and image differ in shape ({image_hu.shape}); cannot draw {path}")
    label_map, table = merge_label_map(named, class_names, catalog)
    present = {label: name for label, name in table.items() if named[name].any()}
    colours = {label: class_colour(label - 1) for label in present}

    ornt = nib.orientations.io_orientation(affine)
    to_original = nib.orientations.inv_ornt_aff(ornt, image_hu.shape)
    image_ras = nib.orientations.apply_orientation(image_hu, ornt)
    labels_ras = nib.orientations.apply_orientation(label_map, ornt)
    spacing = nib.affines.voxel_sizes(np.asarray(affine, dtype=float) @ to_original)
    focus = nib.affines.apply_affine(np.linalg.inv(to_original), _focus(named, catalog))
    focus = np.clip(np.round(focus).astype(int), 0, np.array(image_ras.shape) - 1)

    scale = panel_px / float(np.max(np.array(image_ras.shape) * spacing))
    low, high = window
    panel_spacing = [(spacing[1], spacing[0]), (spacing[2], spacing[0]), (spacing[2], spacing[1])]  # (row, column)
    panels = []
    for grey_plane, label_plane, (row_mm, col_mm) in zip(_planes(image_ras, focus), _planes(labels_ras, focus),
                                                         panel_spacing):
        size = (max(1, round(grey_plane.shape[1] * col_mm * scale)), max(1, round(grey_plane.shape[0] * row_mm * scale)))
        grey = np.clip((grey_plane.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0
        grey = np.asarray(Image.fromarray(grey.astype(np.float32)).resize(size, Image.BILINEAR))
        labels = np.asarray(Image.fromarray(label_plane.astype(np.int32)).resize(size, Image.NEAREST))
        panels.append(Image.fromarray(_blend(grey, labels, colours, alpha)))

    font = ImageFont.load_default()
    width = sum(panel.width for panel in panels) + GAP_PX * (len(panels) - 1)
    columns = max(1, width // LEGEND_COLUMN_PX)
    legend_rows = -(-len(present) // columns)
    top = max(panel.height for panel in panels) + GAP_PX
    montage = Image.new("RGB", (width, top + LEGEND_ROW_PX * legend_rows), BACKGROUND)
    draw = ImageDraw.Draw(montage)
    left = 0
    for panel, letter in zip(panels, LEFT_EDGE_LETTERS):
        montage.paste(panel, (left, 0))
        draw.text((left + 2, panel.height // 2 - 6), letter, fill=TEXT, font=font)
        left += panel.width + GAP_PX
    for position, (label, name) in enumerate(present.items()):
        x = (position % columns) * LEGEND_COLUMN_PX
        y = top + (position // columns) * LEGEND_ROW_PX
        draw.rectangle((x + 2, y + 2, x + 13, y + 13), fill=colours[label])
        draw.text((x + 18, y + 1), name, fill=TEXT, font=font)
    return replace_atomically(Path(path), lambda temp: montage.save(temp, format="PNG"))
