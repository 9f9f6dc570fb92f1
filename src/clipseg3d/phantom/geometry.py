"""Shapes painted into a case's tissue map: ellipsoids, cylinders, domes, tubes and body layers.

Every shape is evaluated on the case's warped canonical coordinates (:class:`Frame`) and yields
layers (mask, tissue, rank) over a box of the grid; :func:`paint` writes them in order, each only
over the tissues its structure may displace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from clipseg3d.phantom.anatomy import BELLY, BODY_EXPONENT, CAVITY, DEFAULT_WITHIN, TISSUES

Box = tuple[slice, slice, slice]
Layers = list[tuple[np.ndarray, str, int]]   # (mask, tissue, rank): higher ranks are inner layers


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rz(yaw) @ Rx(pitch) @ Ry(roll) (intrinsic z-x-y turns), angles in degrees; columns are the local axes."""
    return Rotation.from_euler("ZXY", [yaw, pitch, roll], degrees=True).as_matrix()


@dataclass
class Frame:
    """The case's grid: canonical coordinates of every voxel, warped by the deformation field."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]       # canonical coordinate per index, per axis
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]     # warped canonical x, y, z (full grid)
    margin: float                                          # bound on the displacement (mm)

    def box(self, lo, hi) -> Box | None:
        """Index slices of the voxels whose warped coordinates may fall in [lo, hi]."""
        out = []
        for axis, a, b in zip(self.axes, lo, hi):
            start = int(np.searchsorted(axis, a - self.margin, "left"))
            stop = int(np.searchsorted(axis, b + self.margin, "right"))
            if stop <= start:
                return None
            out.append(slice(start, stop))
        return tuple(out)

    def at(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The warped coordinates of the voxels in ``box``."""
        return tuple(c[box] for c in self.coords)


def local(xyz, centre, rot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates in a rotated frame centred on ``centre`` (``rot``'s columns are its axes)."""
    d = [c - float(o) for c, o in zip(xyz, centre)]
    return tuple(sum(float(rot[i, k]) * d[i] for i in range(3)) for k in range(3))


def _solid_layers(spec: dict, frame: Frame) -> Iterator[tuple[Box, Layers]]:
    """An ellipsoid (optionally super-ellipsoid, ``exp``) or elliptic cylinder, with an optional core."""
    centre, semi = np.asarray(spec["centre"], float), np.asarray(spec["semi"], float)
    exp = float(spec.get("exp", 2.0))
    cylinder = spec["shape"] == "cylinder"
    reach = np.linalg.norm(semi) if (cylinder or exp > 2) else semi.max()
    box = frame.box(centre - reach, centre + reach)
    if box is None:
        return
    lx, ly, lz = local(frame.at(box), centre, rotation(*spec["rot"]))

    def inside(axes) -> np.ndarray:
        a, b, c = (float(v) for v in axes)
        if cylinder:
            return ((lx / a) ** 2 + (ly / b) ** 2 <= 1) & (np.abs(lz) <= c)
        if exp == 2.0:
            return (lx / a) ** 2 + (ly / b) ** 2 + (lz / c) ** 2 <= 1
        return np.abs(lx / a) ** exp + np.abs(ly / b) ** exp + np.abs(lz / c) ** exp <= 1

    layers = [(inside(semi), spec["tissue"], 0)]
    if "core" in spec:
        layers.append((inside(np.maximum(semi - spec["shrink"], 0.5)), spec["core"], 1))
    yield box, layers


def _dome_layers(spec: dict, frame: Frame) -> Iterator[tuple[Box, Layers]]:
    """The part of an elliptic column within ``band`` (mm) above a paraboloid dome (the diaphragm)."""
    cx, cy, ax, ay = map(float, spec["region"])
    x0, y0, z0 = map(float, spec["apex"])
    kx, ky = map(float, spec["reach"])
    drop = float(spec["drop"])
    low, high = spec["band"]
    z_low = z0 - drop * ((ax + abs(cx - x0)) ** 2 / kx ** 2 + (ay + abs(cy - y0)) ** 2 / ky ** 2)
    box = frame.box((cx - ax, cy - ay, z_low + low), (cx + ax, cy + ay, np.inf if high is None else z0 + high))
    if box is None:
        return
    x, y, z = frame.at(box)
    height = z - (z0 - drop * (((x - x0) / kx) ** 2 + ((y - y0) / ky) ** 2))
    mask = (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1) & (height >= low)
    if high is not None:
        mask &= height < high
    yield box, [(mask, spec["tissue"], 0)]


def _tube_layers(spec: dict, frame: Frame) -> Iterator[tuple[Box, Layers]]:
    """Capsules between successive nodes (x, y, z, radius); a hollow tube has wall, fluid and gas."""
    nodes = np.asarray(spec["nodes"], float).tolist()
    for k in range(len(nodes) - 1):
        a, b = nodes[k], nodes[k + 1]
        r = max(a[3], b[3])
        box = frame.box(np.minimum(a[:3], b[:3]) - r, np.maximum(a[:3], b[:3]) + r)
        if box is None:
            continue
        x, y, z = frame.at(box)
        axis = [b[i] - a[i] for i in range(3)]
        t = ((x - a[0]) * axis[0] + (y - a[1]) * axis[1] + (z - a[2]) * axis[2]) / max(sum(v * v for v in axis), 1e-6)
        np.clip(t, 0.0, 1.0, out=t)
        axis_y = a[1] + t * axis[1]
        dist2 = (x - a[0] - t * axis[0]) ** 2 + (y - axis_y) ** 2 + (z - a[2] - t * axis[2]) ** 2
        radius = a[3] + t * (b[3] - a[3])
        layers = [(dist2 <= radius ** 2, spec["tissue"], 0)]
        if "fill" in spec:
            inner = np.maximum(radius - spec["wall"], 0.5)
            lumen = dist2 <= inner ** 2
            if "plane" in spec:            # one air-fluid level (supine: gas rises anteriorly)
                gas = y > float(spec["plane"])
            else:                          # a gas level per segment, in lumen radii above the axis
                gas = (y - axis_y) > float(spec["levels"][k]) * inner
            layers += [(lumen & ~gas, spec["fill"], 1), (lumen & gas, spec["gas"], 1)]
        yield box, layers


def _prism_layers(spec: dict, frame: Frame) -> Iterator[tuple[Box, Layers]]:
    """A body layer: a super-ellipse in every axial plane, flatter at the back, with a belly bulge."""
    x, y, _ = frame.coords
    grow_x, grow_y = (float(v) for v in spec["grow_mm"])
    ax = CAVITY[0] + grow_x
    bulge = spec.get("bulge_mm", 0.0) * np.exp(-((frame.axes[2] - BELLY[0]) / BELLY[1]) ** 2)
    ay_ant = (CAVITY[1] + grow_y + bulge).astype(np.float32)[None, None, :]
    semi_y = np.where(y > 0, ay_ant, np.float32(CAVITY[2] + grow_y))
    mask = (np.abs(x) / ax) ** BODY_EXPONENT + (np.abs(y) / semi_y) ** BODY_EXPONENT <= 1
    yield (slice(None),) * 3, [(mask, spec["tissue"], 0)]


_SHAPES = {"ellipsoid": _solid_layers, "cylinder": _solid_layers, "dome": _dome_layers, "tube": _tube_layers,
           "prism": _prism_layers}


def paint(structures: list[dict], frame: Frame, shape: tuple[int, int, int]) -> np.ndarray:
    """The tissue-id map: structures painted in order, each only over the tissues it may displace."""
    ids = {name: k for k, name in enumerate(TISSUES)}
    tissue = np.zeros(shape, np.uint8)
    for spec in structures:
        own = [spec[key] for key in ("tissue", "core", "fill", "gas") if key in spec]
        within = spec.get("within", DEFAULT_WITHIN)
        rank = np.full(256, 127, np.int8)
        rank[[ids[name] for name in within]] = -1
        for name in own:
            rank[ids[name]] = 0 if name == spec["tissue"] else 1
        for box, layers in _SHAPES[spec["shape"]](spec, frame):
            sub = tissue[box]
            current = rank[sub]
            for mask, name, level in layers:
                sub[mask & (current <= level)] = ids[name]
    return tissue
