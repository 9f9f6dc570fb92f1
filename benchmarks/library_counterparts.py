"""Hand-written post-processing and target-building pieces beside their MONAI / SciPy / NumPy /
nibabel counterparts: time, peak memory, and whether the results are the same.

Masks (bool, one class):

* ``organ``: 512 x 512 x 300, an ellipsoid organ (about 3 M voxels) with six strays near it;
* ``scattered``: the same organ with strays anywhere (a bounding box of 60% of the volume);
* ``totalseg``: the liver of ``../shared/data/totalseg-case`` (122 x 101 x 30) with six strays
  (skipped when the data is absent).

On each mask: ``keep_largest_component`` against MONAI's ``KeepLargestConnectedComponent`` and
``remove_small_components`` against MONAI's ``RemoveSmallObjects`` (by volume), each MONAI
transform on the whole mask and on the mask's bounding box; ``bounding_box`` against
``scipy.ndimage.find_objects``; component sizes by ``np.bincount`` against
``scipy.ndimage.sum_labels``. The MONAI transforms get a copy of the mask: given a NumPy array
they write into it. On a 512 x 512 x 300 uint8 label volume (the ``organ`` mask as raw value 3):
raw-value counts in slabs against one ``np.bincount`` and ``np.unique``, and the RAS x of every
voxel against nibabel's ``apply_affine`` on the voxel index grid.

Time is the best of five runs (one for the label volume) in process CPU time (every piece runs
on one thread, so other load on the machine counts less than in wall time); peak memory is what
``tracemalloc`` sees (NumPy allocations) in a separate first run.

Run ``python benchmarks/library_counterparts.py``; prints a markdown table.
"""

from __future__ import annotations

import time
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.transforms import KeepLargestConnectedComponent, RemoveSmallObjects
from scipy import ndimage

from clipseg3d.data.targets import _value_counts, _world_x
from clipseg3d.inference.postprocess import (
    CONNECTIVITY,
    bounding_box,
    keep_largest_component,
    remove_small_components,
)

TOTALSEG_LABELS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "totalseg-case" / "labels.nii.gz"
TOTALSEG_LIVER = 5
MIN_ML = 0.5
SPACING_MM = (0.8, 0.8, 1.5)
LAS_AFFINE = np.array([[-0.8, 0, 0, 200.0], [0, 0.8, 0, -100.0], [0, 0, 1.5, 50.0], [0, 0, 0, 1.0]])


def with_strays(mask: np.ndarray, low, high, seed: int = 0) -> np.ndarray:
    """``mask`` with six small boxes added at random corners in ``low..high``."""
    rng = np.random.default_rng(seed)
    mask = mask.copy()
    for _ in range(6):
        corner = rng.integers(low, high)
        size = rng.integers(2, max(3, mask.shape[2] // 25), size=3)
        mask[tuple(slice(a, a + b) for a, b in zip(corner, size))] = True
    return mask


def ellipsoid(shape=(512, 512, 300)) -> np.ndarray:
    centre, radius = np.array(shape) * [0.35, 0.5, 0.5], np.array(shape) * [0.18, 0.2, 0.25]
    box = tuple(slice(int(c - r), int(c + r) + 1) for c, r in zip(centre, radius))
    mask = np.zeros(shape, dtype=bool)
    mask[box] = sum(((grid - c) / r) ** 2 for grid, c, r in zip(np.ogrid[box], centre, radius)) <= 1
    return mask


def masks(organ: np.ndarray) -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    box = bounding_box(organ, 30)
    cases = {"organ": (with_strays(organ, [s.start for s in box], [s.stop - 14 for s in box]), SPACING_MM),
             "scattered": (with_strays(organ, [4, 4, 2], np.array(organ.shape) - 14), SPACING_MM)}
    if TOTALSEG_LABELS.is_file():
        liver = np.asanyarray(nib.load(TOTALSEG_LABELS).dataobj) == TOTALSEG_LIVER
        cases["totalseg"] = (with_strays(liver, [4, 4, 2], np.array(liver.shape) - 14), (3.0, 3.0, 3.0))
    return cases


def measure(fn, repeats: int = 5) -> tuple[float, float, object]:
    """(best CPU seconds of ``repeats`` runs, peak traced MiB, result) of ``fn()``."""
    tracemalloc.start()
    result = fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best, peak, result


def in_box(mask: np.ndarray, box: tuple[slice, ...], transform) -> np.ndarray:
    """``transform`` (a channel-first MONAI transform) applied to the bounding box of ``mask`` only."""
    result = np.zeros(mask.shape, dtype=bool)
    result[box] = transform(mask[box][None].copy())[0]
    return result


def mask_pieces(mask: np.ndarray, spacing: tuple[float, ...]) -> dict[str, dict[str, object]]:
    """{piece: {variant: callable returning a comparable result}}; the first variant is ours."""
    box = bounding_box(mask)
    labels, count = ndimage.label(mask[box], structure=CONNECTIVITY)
    index = np.arange(count + 1)

    def largest():
        return KeepLargestConnectedComponent(connectivity=3)

    def small():
        return RemoveSmallObjects(min_size=MIN_ML * 1000, connectivity=3, by_measure=True, pixdim=spacing)

    return {
        "largest component": {
            "ours": lambda: keep_largest_component(mask),
            "MONAI KeepLargestConnectedComponent": lambda: largest()(mask[None].copy())[0],
            "the same on the bounding box": lambda: in_box(mask, box, largest()),
        },
        "small components": {
            "ours": lambda: remove_small_components(mask, MIN_ML, spacing),
            "MONAI RemoveSmallObjects": lambda: small()(mask[None].copy())[0],
            "the same on the bounding box": lambda: in_box(mask, box, small()),
        },
        "bounding box": {
            "ours": lambda: bounding_box(mask),
            "scipy find_objects": lambda: ndimage.find_objects(mask.view(np.uint8))[0],
        },
        "component sizes": {
            "np.bincount": lambda: np.bincount(labels.ravel(), minlength=count + 1),
            "scipy sum_labels": lambda: ndimage.sum_labels(np.ones_like(labels), labels, index).astype(np.int64),
        },
    }


def label_pieces(organ: np.ndarray) -> dict[str, dict[str, object]]:
    """The target-building pieces on a uint8 label volume."""
    label = organ.astype(np.uint8) * 3

    def unique_counts():
        values, counts = np.unique(label, return_counts=True)
        return np.bincount(values, weights=counts, minlength=4).astype(np.int64)

    def apply_affine_x():
        grid = np.indices(label.shape, dtype=np.float32).transpose(1, 2, 3, 0)
        return nib.affines.apply_affine(LAS_AFFINE, grid)[..., 0]

    return {
        "raw-value counts": {
            "ours (slabs)": lambda: _value_counts(label, 4),
            "np.bincount": lambda: np.bincount(label.ravel(), minlength=4),
            "np.unique": unique_counts,
        },
        "world x": {
            "ours": lambda: _world_x(LAS_AFFINE, label.shape),
            "nibabel apply_affine": apply_affine_x,
        },
    }


def same(a, b) -> bool:
    if isinstance(a, tuple):
        return a == b
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.floating):  # float32 x against float64: float32 precision at the magnitude
        return bool(np.allclose(a, b, rtol=0, atol=4 * np.finfo(np.float32).eps * float(np.abs(b).max())))
    return np.array_equal(a, b)


def table(name: str, pieces: dict[str, dict[str, object]], repeats: int) -> None:
    for piece, variants in pieces.items():
        reference = None
        for variant, fn in variants.items():
            seconds, peak, result = measure(fn, repeats)
            reference = result if reference is None else reference
            print(f"| {name} | {piece} | {variant} | {seconds:.3f} | {peak:.0f} | {same(reference, result)} |",
                  flush=True)


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # skimage's min_size deprecation, inside MONAI
    print("| volume | piece | variant | CPU seconds | peak MiB | same result |\n|---|---|---|---|---|---|")
    organ = ellipsoid()
    for name, (mask, spacing) in masks(organ).items():
        table(f"{name} {'x'.join(map(str, mask.shape))}", mask_pieces(mask, spacing), repeats=5)
    table("uint8 labels 512x512x300", label_pieces(organ), repeats=1)


if __name__ == "__main__":
    main()
