"""Post-processing of per-class masks; every rule reads the class catalog, none names a class.

Rules, in the order :func:`postprocess` applies them:

1. threshold probabilities (a default with per-class overrides);
2. remove connected components smaller than a volume in mL (organs and lesions separately);
3. organs: keep the largest component; a left/right pair (entries with ``side`` and
   ``partner``) keeps the two largest components of the pair's union and gives each to the
   side its centroid lies on (patient right = larger RAS x);
4. tumours: keep only voxels within a distance (mm) of the union of their parent organs.

Masks are bool arrays on the scan grid, either a ``{class name: mask}`` dict or a ``[K, ...]``
stack in class order; probabilities are float16/float32 ``[K, ...]`` stacks. Work is done on
the bounding box of each mask, so memory stays near one bool volume per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

from clipseg3d.catalog import ClassCatalog, ClassEntry
from clipseg3d.inference.threads import each_in_threads

Masks = Union[Mapping[str, np.ndarray], np.ndarray]
# Voxels touching by a face, an edge or a corner belong to the same component.
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
BODY_HU = -500.0
# A pair component in which each side's label holds at least this share is the two organs touching.
PAIR_TOUCHING_SHARE = 0.1


@dataclass
class PostprocessConfig:
    """The knobs of :func:`postprocess`.

    Args:
        default_threshold: probability above which (inclusive) a voxel belongs to a class.
        thresholds: per-class thresholds overriding ``default_threshold``.
        min_component_ml: organ (and other non-tumour) components smaller than this are removed.
        min_lesion_ml: tumour components smaller than this are removed.
        tumour_dilation_mm: a tumour voxel is kept only within this distance of a parent organ.
        keep_largest: keep only the largest component of each organ-kind class (two for a
            left/right pair); "other"-kind classes are left as they are.
        multi_component: organs exempt from ``keep_largest`` (e.g. structures that are
            legitimately fragmented in a scan).
    """

    default_threshold: float = 0.5
    thresholds: dict[str, float] = field(default_factory=dict)
    min_component_ml: float = 0.5
    min_lesion_ml: float = 0.0
    tumour_dilation_mm: float = 10.0
    keep_largest: bool = True
    multi_component: tuple[str, ...] = ()


# -- mask containers ------------------------------------------------------------------------
def class_masks(masks: Masks, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """``{name: mask}`` from a dict or a ``[K, ...]`` stack (stack rows are views, not copies)."""
    if isinstance(masks, Mapping):
        missing = [name for name in class_names if name not in masks]
        if missing:
            raise ValueError(f"masks lack class(es) {missing}")
        return {name: masks[name] for name in class_names}
    if len(masks) != len(class_names):
        raise ValueError(f"{len(masks)} mask channels for {len(class_names)} class names")
    return {name: masks[index] for index, name in enumerate(class_names)}


def _like_input(result: dict[str, np.ndarray], masks: Masks) -> Masks:
    if isinstance(masks, Mapping):
        return result
    return np.stack(list(result.values()))


def bounding_box(mask: np.ndarray, margin: Sequence[int] | int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels per axis; None when empty.

    One ``np.any`` per axis: 0.016 s where ``scipy.ndimage.find_objects`` takes 0.08 s on a
    512x512x300 organ mask (``python benchmarks/library_counterparts.py``).
    """
    margins = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(hits[0] - margins[axis], 0), min(hits[-1] + 1 + margins[axis], mask.shape[axis])))
    return tuple(box)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """Component labels inside the bounding box of ``mask``, voxel count per label, and the box.

    Voxels touch by a face, an edge or a corner (:data:`CONNECTIVITY`); labels 1..n number the
    components in C order of their first voxel, and ``sizes[0]`` is 0. ``scipy.ndimage.label``
    runs on the bounding box only, so a small structure in a large scan costs little; sizes by
    ``np.bincount`` take 0.016 s and 64 MiB where ``scipy.ndimage.sum_labels`` takes 0.06 s and
    160 MiB (a 512x512x300 organ mask, ``python benchmarks/library_counterparts.py``).
    """
    box = bounding_box(mask)
    if box is None:
        return np.zeros((0,) * mask.ndim, np.int32), np.zeros(1, np.int64), tuple(slice(0, 0) for _ in mask.shape)
    labels, count = ndimage.label(mask[box], structure=CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels, sizes, box


def largest_labels(sizes: np.ndarray, count: int) -> np.ndarray:
    """Labels of the ``count`` largest non-empty components, largest first.

    Of components of equal size the later label comes first, whatever their number (a stable
    sort; ``np.argsort``'s default sort orders ties differently as the number grows).
    """
    order = np.argsort(sizes, kind="stable")[::-1][:count]
    return order[sizes[order] > 0]


def world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroid of ``mask`` in world millimetres."""
    return nib.affines.apply_affine(affine, ndimage.center_of_mass(mask))


# -- rules ----------------------------------------------------------------------------------
def threshold(probs: np.ndarray, thresholds: Mapping[str, float] | float, class_names: Sequence[str],
              default: float = 0.5) -> np.ndarray:
    """Bool masks ``[K, ...]`` where ``probs >= threshold`` of each class.

    ``thresholds`` is one value for all classes or a per-class mapping (others use ``default``).
    """
    if len(probs) != len(class_names):
        raise ValueError(f"{len(probs)} probability channels for {len(class_names)} class names")
    if isinstance(thresholds, Mapping):
        unknown = sorted(set(thresholds) - set(class_names))
        if unknown:
            raise ValueError(f"thresholds given for unknown class(es) {unknown}")
        values = [float(thresholds.get(name, default)) for name in class_names]
    else:
        values = [float(thresholds)] * len(class_names)
    masks = np.empty(probs.shape, dtype=bool)
    for index, value in enumerate(values):
        np.greater_equal(probs[index], value, out=masks[index])
    return masks


def voxels_for_volume(min_volume_ml: float, spacing: Sequence[float]) -> int:
    """The fewest voxels of ``spacing`` mm whose volume is at least ``min_volume_ml``."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    count = max(int(np.ceil(min_volume_ml / voxel_ml)), 0)
    while count > 0 and (count - 1) * voxel_ml >= min_volume_ml:  # ceil of a rounded quotient can be one off
        count -= 1
    while count * voxel_ml < min_volume_ml:
        count += 1
    return count


def remove_small_components(mask: np.ndarray, min_volume_ml: float, spacing: Sequence[float]) -> np.ndarray:
    """A copy of ``mask`` without the components smaller than ``min_volume_ml`` (one at the limit stays).

    On a 512x512x300 organ mask with strays: 0.11 s and 171 MiB, where MONAI's
    ``RemoveSmallObjects`` (scikit-image, whole volume) takes 2.7 s and 1125 MiB, and 0.16 s and
    195 MiB on the bounding box; with strays over 60% of the volume 0.46 s against 3.8 s and
    0.81 s (``python benchmarks/library_counterparts.py``).
    """
    result = np.zeros(mask.shape, dtype=bool)
    labels, sizes, box = connected_components(mask)
    keep = sizes >= voxels_for_volume(min_volume_ml, spacing)
    keep[0] = False
    result[box] = keep[labels]
    return result


def keep_largest_component(mask: np.ndarray, count: int = 1, min_voxels: int = 0) -> np.ndarray:
    """A copy of ``mask`` with only its ``count`` largest components of at least ``min_voxels``
    voxels (ties: see :func:`largest_labels`): one labelling where removing the small components
    first and then keeping the largest takes two, with the same result.

    On a 512x512x300 organ mask with strays: 0.13 s and 171 MiB, where MONAI's
    ``KeepLargestConnectedComponent`` (scikit-image, whole volume, int64 labels) takes 2.0 s and
    975 MiB, and 0.16 s and 179 MiB on the bounding box; with strays over 60% of the volume
    0.45 s against 3.1 s and 0.95 s (``python benchmarks/library_counterparts.py``).
    """
    result = np.zeros(mask.shape, dtype=bool)
    labels, sizes, box = connected_components(mask)
    keep = np.zeros(sizes.shape, dtype=bool)
    keep[largest_labels(sizes, count)] = True
    keep &= sizes >= min_voxels
    result[box] = keep[labels]
    return result


def assign_pair_sides(right: np.ndarray, left: np.ndarray, affine: np.ndarray,
                      midline_x: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(right, left)`` of a left/right organ pair with stray and swapped components fixed.

    When the largest component of the union holds both labels (each at least
    ``PAIR_TOUCHING_SHARE`` of it), it is the two organs touching: it alone is kept, with its
    voxel labels. Otherwise the two largest components are kept and each goes to the patient side
    its centroid lies on: right when its RAS x exceeds ``midline_x`` (default: the midpoint of the
    two centroids); a single component without ``midline_x`` keeps its voxel labels.
    """
    union = right | left
    labels, sizes, box = connected_components(union)
    order = largest_labels(sizes, 2).tolist()
    new_right = np.zeros(union.shape, dtype=bool)
    new_left = np.zeros(union.shape, dtype=bool)
    if not order:
        return new_right, new_left
    largest = labels == order[0]
    on_right = np.count_nonzero(largest & right[box])
    if min(on_right, sizes[order[0]] - on_right) >= PAIR_TOUCHING_SHARE * sizes[order[0]] or \
            (len(order) == 1 and midline_x is None):
        new_right[box] = largest & right[box]
        new_left[box] = largest & left[box]
        return new_right, new_left
    offset = np.eye(4)
    offset[:3, 3] = [piece.start for piece in box]
    box_affine = np.asarray(affine, dtype=float) @ offset
    components = [labels == label for label in order]
    xs = [world_centroid(component, box_affine)[0] for component in components]
    middle = float(np.mean(xs)) if midline_x is None else float(midline_x)
    for component, x in zip(components, xs):
        (new_right if x > middle else new_left)[box] |= component
    return new_right, new_left


def body_midline_x(image_hu: np.ndarray, affine: np.ndarray, body_hu: float = BODY_HU) -> float:
    """RAS x (mm) of the centroid of the body (voxels above ``body_hu``), a midline for side assignment."""
    body = image_hu > body_hu
    if not body.any():
        raise ValueError(f"no voxel above {body_hu} HU; cannot find the body midline")
    # the centroid from the three marginal counts: 0.3 s where ndimage.center_of_mass takes 3 s (512x512x300)
    centroid = []
    for axis in range(body.ndim):
        counts = np.count_nonzero(body, axis=tuple(a for a in range(body.ndim) if a != axis))
        centroid.append(float(np.dot(counts, np.arange(len(counts)))) / float(counts.sum()))
    return float(nib.affines.apply_affine(affine, centroid)[0])


def restrict_to_parents(tumour: np.ndarray, parents: np.ndarray, spacing: Sequence[float],
                        dilation_mm: float) -> np.ndarray:
    """``tumour`` voxels within ``dilation_mm`` (Euclidean, in mm) of a ``parents`` voxel.

    Distances are computed per tumour component on its bounding box grown by the radius, so a
    small lesion in a large volume costs little.
    """
    result = np.zeros(tumour.shape, dtype=bool)
    spacing = np.asarray(spacing, dtype=float)
    margin = np.ceil(dilation_mm / spacing).astype(int) + 1
    outer = bounding_box(tumour, margin)
    if outer is None:
        return result
    parents, found = parents[outer], result[outer]
    labels, _ = ndimage.label(tumour[outer], structure=CONNECTIVITY)
    for label, component_box in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(piece.start - pad, 0), min(piece.stop + pad, size))
                    for piece, pad, size in zip(component_box, margin, labels.shape))
        if not parents[box].any():
            continue
        distance = ndimage.distance_transform_edt(~parents[box], sampling=spacing)
        found[box] |= (labels[box] == label) & (distance <= dilation_mm)
    return result


# -- pipeline -------------------------------------------------------------------------------
def postprocess(masks: Masks, catalog: ClassCatalog, class_names: Sequence[str], spacing: Sequence[float],
                affine: np.ndarray, config: PostprocessConfig | None = None,
                midline_x: float | None = None, in_place: bool = False) -> Masks:
    """Apply the rules of this module; returns bool masks in the input's container type.

    Float ``[K, ...]`` input is thresholded first with the config's thresholds. Organ rules run
    before tumour rules, so tumours are checked against cleaned parent organs; a tumour whose
    parents are not among ``class_names`` is left unconstrained. ``spacing`` is the voxel size
    (mm) per array axis, ``affine`` maps voxels to RAS world mm, and ``midline_x`` is the RAS x
    of the body midline for left/right pairs (see :func:`body_midline_x`; default: midway
    between the pair's two components). The input is never modified (a returned dict may share
    unchanged masks with it), unless ``in_place`` is set and ``masks`` is a dict of bool masks: its
    entries are then replaced as each rule runs, so a replaced mask is freed at once and memory
    stays near one bool volume per class.
    """
    config = config or PostprocessConfig()
    if not isinstance(masks, Mapping) and np.issubdtype(np.asarray(masks).dtype, np.floating):
        masks = threshold(masks, config.thresholds, class_names, config.default_threshold)
    current = {name: np.asarray(mask, dtype=bool) for name, mask in class_masks(masks, class_names).items()}
    if in_place and isinstance(masks, dict):
        masks.update(current)
        current = masks
    entries = {name: catalog[name] for name in class_names}

    minimums = {name: config.min_lesion_ml if entry.kind == "tumour" else config.min_component_ml
                for name, entry in entries.items()}
    exempt = {catalog[name].name for name in config.multi_component}
    organs = _organ_groups(entries, catalog, exempt) if config.keep_largest else []
    grouped = {name for group in organs for name in group}
    groups = organs + [(name,) for name in entries if name not in grouped and minimums[name] > 0]

    def without_small(name: str) -> np.ndarray:
        return remove_small_components(current[name], minimums[name], spacing) if minimums[name] > 0 else current[name]

    def cleaned(group: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        if group not in organs:
            return (without_small(group[0]),)
        if len(group) == 2:
            return assign_pair_sides(without_small(group[0]), without_small(group[1]), affine, midline_x)
        # one labelling: the largest component, unless it is small
        return (keep_largest_component(current[group[0]], min_voxels=voxels_for_volume(minimums[group[0]], spacing)),)

    for group, group_masks in zip(groups, each_in_threads(cleaned, groups)):
        current.update(zip(group, group_masks))

    parents = {name: [parent for parent in (_canonical(parent, catalog) for parent in entry.parents)
                      if parent in current] for name, entry in entries.items() if entry.kind == "tumour"}
    tumours = [name for name in parents if parents[name]]

    def near_parents(name: str) -> np.ndarray:
        parent_union = np.logical_or.reduce([current[parent] for parent in parents[name]])
        return restrict_to_parents(current[name], parent_union, spacing, config.tumour_dilation_mm)

    depths = {name: class_depth(name, catalog) for name in tumours}
    for depth in sorted(set(depths.values())):  # a tumour's parents are done before it, side by side by depth
        wave = [name for name in tumours if depths[name] == depth]
        for name, mask in zip(wave, each_in_threads(near_parents, wave)):
            current[name] = mask
    return _like_input(current, masks)


def _organ_groups(entries: Mapping[str, ClassEntry], catalog: ClassCatalog, exempt: set[str]) -> list[tuple[str, ...]]:
    """The organs of ``entries`` that keep their largest component: ``(right, left)`` for a
    left/right pair whose both sides are there, ``(organ,)`` for the others; ``exempt`` left out."""
    done: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for name, entry in entries.items():
        if entry.kind != "organ" or name in done or name in exempt:
            continue
        partner = _canonical(entry.partner, catalog) if entry.partner else None
        if partner in entries and entry.side and entries[partner].side and partner not in exempt:
            groups.append((name, partner) if entry.side == "right" else (partner, name))
        else:
            groups.append((name,))
        done.update(groups[-1])
    return groups


def _canonical(name: str, catalog: ClassCatalog) -> str:
    """A related class's canonical name; relations may name classes a model does not have."""
    entry = catalog.get(name)
    return entry.name if entry is not None else name


def class_depth(name: str, catalog: ClassCatalog) -> int:
    """0 for a class without parents (or unknown), else one more than its deepest parent (tumours: 1)."""
    entry = catalog.get(name)
    if entry is None:
        return 0
    return 1 + max((class_depth(parent, catalog) for parent in entry.parents), default=-1)


def merge_label_map(masks: Masks, class_names: Sequence[str],
                    catalog: ClassCatalog) -> tuple[np.ndarray, dict[int, str]]:
    """One label map (ids 1..K in class order, 0 = background) and its ``{id: class name}`` table.

    Where masks overlap a voxel holds its most specific class: classes are painted in order of
    depth in the parent relation (organs, then their tumours), and in class order within a depth.
    """
    named = class_masks(masks, class_names)
    dtype = np.uint8 if len(class_names) < 256 else np.uint16
    shape = next(iter(named.values())).shape if named else ()
    label_map = np.zeros(shape, dtype=dtype)
    order = sorted(range(len(class_names)), key=lambda index: (class_depth(class_names[index], catalog), index))
    for index in order:
        label_map[np.asarray(named[class_names[index]], dtype=bool)] = index + 1
    return label_map, {index + 1: name for index, name in enumerate(class_names)}
