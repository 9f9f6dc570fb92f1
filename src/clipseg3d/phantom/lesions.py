"""Lesions placed inside their parent organs: counts, sizes, HU and where they fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from clipseg3d.phantom.anatomy import LESION_TEXTURE, LESIONS, NECROSIS_HU, NECROSIS_MM
from clipseg3d.phantom.case import Tissue
from clipseg3d.phantom.classes import phantom_catalog
from clipseg3d.phantom.geometry import local, rotation


def check_lesion_contrast(ranges: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    """Checked ``lesion_contrast``: lesion class -> (low, high) HU relative to the parent."""
    checked = {}
    for name, bounds in ranges.items():
        if name not in LESIONS:
            raise ValueError(f"lesion_contrast: {name!r} is not a lesion class ({', '.join(LESIONS)})")
        low, high = (float(b) for b in bounds)
        if low > high:
            raise ValueError(f"lesion_contrast: {name} range ({low:g}, {high:g}) has low above high")
        checked[name] = (low, high)
    return checked


def _draw_count(probs: Sequence[float], rng: np.random.Generator, required: bool) -> int:
    """A lesion count drawn from ``probs``; at least one when ``required``."""
    probs = np.asarray(probs, float)
    if required:
        probs = np.concatenate([[0.0], probs[1:]]) if probs[1:].sum() > 0 else np.array([0.0, 1.0])
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def _lesion_hu(spec: Mapping, parent_hu: float, rng: np.random.Generator) -> float:
    """A lesion's HU: drawn from its absolute range, or from a weighted choice of ranges about its parent's."""
    if "hu" in spec:
        return float(rng.uniform(*spec["hu"]))
    weights = np.array([option[0] for option in spec["contrast"]])
    _, low, high = spec["contrast"][int(rng.choice(len(weights), p=weights / weights.sum()))]
    return parent_hu + float(rng.uniform(low, high))


@dataclass
class _Room:
    """Where lesions fit in one parent organ: its box, depth below its surface, distance to ``near``."""

    box: tuple[slice, slice, slice]
    depth: np.ndarray
    near: np.ndarray | None
    parent_ids: list[int]

    @classmethod
    def measure(cls, tissue: np.ndarray, tissues: list[Tissue], spacing: np.ndarray, parent: str,
                near: str | None) -> "_Room | None":
        ids = [k for k, t in enumerate(tissues) if t.cls == parent and t.parent is None]
        mask = np.isin(tissue, ids)
        if not mask.any():
            return None
        box = tuple(slice(max(int(i[0]) - 1, 0), int(i[-1]) + 2) for i in
                    (np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)))
        depth = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        near_dist = None
        if near is not None:
            near_ids = [k for k, t in enumerate(tissues) if t.cls == near]
            near_dist = ndimage.distance_transform_edt(~np.isin(tissue[box], near_ids), sampling=spacing)
        return cls(box, depth, near_dist, ids)

    def spots(self, world_axes, radius: float, margin: float, near_mm: float | None,
              placed: list[tuple[np.ndarray, float]]) -> np.ndarray:
        """World centres where a lesion of ``radius`` stays ``margin`` inside and clear of ``placed``."""
        ok = self.depth > radius + margin
        if self.near is not None:
            ok &= self.near <= radius + near_mm
        index = np.argwhere(ok) + [s.start for s in self.box]
        world = np.stack([world_axes[d][index[:, d]] for d in range(3)], 1) if len(index) else np.zeros((0, 3))
        for centre, other in placed:
            world = world[np.linalg.norm(world - centre, axis=1) > radius + other + 2 * margin]
        return world


def place_lesions(tissue: np.ndarray, tissues: list[Tissue], spacing: np.ndarray, world_axes,
                  rng: np.random.Generator, min_mm: float, require: Sequence[str],
                  contrast: Mapping[str, tuple[float, float]]) -> list[dict]:
    """Paint lesions into ``tissue`` (new tissue ids appended to ``tissues``); return their records.

    Each lesion is an ellipsoid (smallest diameter ``diameter_mm``) whose centre is at least its
    largest semi-axis plus one voxel below the parent's surface, so it lies wholly inside the parent
    with a rim of parent around it; lesions keep apart by two voxels. ``contrast`` replaces a
    class's HU with a (low, high) range relative to its parent.
    """
    catalog = phantom_catalog()
    margin = float(spacing.max())
    rooms: dict[tuple, _Room | None] = {}
    placed: list[tuple[np.ndarray, float]] = []
    parent_hu: dict[str | None, float] = {}
    for t in tissues:
        parent_hu.setdefault(t.cls, t.hu)
    records = []
    for name, spec in LESIONS.items():
        if name in contrast:
            spec = {**{k: v for k, v in spec.items() if k != "hu"}, "contrast": ((1.0, *contrast[name]),)}
        parents = catalog[name].parents
        low, high = max(spec["diameter"][0], min_mm), spec["diameter"][1]
        for _ in range(_draw_count(spec["count"], rng, name in require) if low <= high else 0):
            parent = parents[int(rng.integers(len(parents)))]
            diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            stretch = rng.uniform(1.0, 1.25, 3)
            stretch[int(rng.integers(3))] = 1.0
            rot = rotation(*rng.uniform(0, 360, 3))
            hu = _lesion_hu(spec, parent_hu[parent], rng)
            key = (parent, spec.get("near"))
            if key not in rooms:
                rooms[key] = _Room.measure(tissue, tissues, spacing, parent, spec.get("near"))
            room = rooms[key]
            spots = np.zeros((0, 3))
            while room is not None and diameter >= low:
                spots = room.spots(world_axes, diameter / 2 * stretch.max(), margin, spec.get("near_mm"), placed)
                if len(spots):
                    break
                diameter *= 0.8
            if not len(spots) or diameter < low:
                continue
            centre, semi = spots[int(rng.integers(len(spots)))], diameter / 2 * stretch
            _paint_lesion(tissue, tissues, world_axes, centre, semi, rot, hu, name, parent, room.parent_ids)
            placed.append((centre, float(semi.max())))
            records.append({"class": name, "parent": parent, "centre_mm": [round(float(c), 2) for c in centre],
                            "diameter_mm": round(diameter, 2), "hu": round(hu, 1)})
    return records


def _paint_lesion(tissue: np.ndarray, tissues: list[Tissue], world_axes, centre: np.ndarray, semi: np.ndarray,
                  rot: np.ndarray, hu: float, name: str, parent: str, parent_ids: list[int]) -> None:
    """An ellipsoidal lesion over the parent's voxels (a darker core when it is large)."""
    reach = float(semi.max())
    box = tuple(slice(int(np.searchsorted(a, c - reach)), int(np.searchsorted(a, c + reach, "right")))
                for a, c in zip(world_axes, centre))
    grids = np.meshgrid(*[a[s] for a, s in zip(world_axes, box)], indexing="ij", sparse=True)
    lx, ly, lz = local(grids, centre, rot)
    q = (lx / semi[0]) ** 2 + (ly / semi[1]) ** 2 + (lz / semi[2]) ** 2
    sub = tissue[box]
    inside = np.isin(sub, parent_ids)
    layers = [(q <= 1, hu)]
    if 2 * semi.min() >= NECROSIS_MM:
        layers.append((q <= 0.25, hu - NECROSIS_HU))
    for mask, value in layers:
        tissues.append(Tissue(f"{name}#{len(tissues)}", float(value), name, parent, LESION_TEXTURE))
        sub[mask & inside] = len(tissues) - 1
