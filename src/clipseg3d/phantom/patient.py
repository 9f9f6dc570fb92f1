"""Per-case variation: habitus, structure shifts, sizes, rotations, gas levels, bowel loops and a warp."""

from __future__ import annotations

from typing import Any

import numpy as np

from clipseg3d.phantom.anatomy import ANATOMY
from clipseg3d.phantom.fields import tensor_field
from clipseg3d.phantom.geometry import Frame

JITTER_MM = 4.0       # default sd of a group's position shift
SIZE_SD = 0.05        # default sd of a structure's relative size (clipped to SIZE_RANGE)
SIZE_RANGE = (0.7, 1.3)
YAW_SD = 4.0          # sd of a structure's extra yaw (degrees)
DEFORM_KNOTS = (np.linspace(-260, 260, 7), np.linspace(-200, 200, 5), np.linspace(-320, 320, 9))
DEFORM_MM = 6.0       # sd of the warp's control displacements (clipped to twice that)


def _vary(spec: dict, shift: np.ndarray, size: float, yaw: float) -> dict:
    """``spec`` shifted, scaled about its centre and turned by ``yaw``."""
    out = dict(spec)
    if "centre" in spec:
        out["centre"] = np.asarray(spec["centre"], float) + shift
        out["semi"] = np.asarray(spec["semi"], float) * size
        out["rot"] = (spec["rot"][0] + yaw, *spec["rot"][1:])
    if "nodes" in spec:
        nodes = np.asarray(spec["nodes"], float)
        centre = nodes[:, :3].mean(0)
        nodes[:, :3] = centre + (nodes[:, :3] - centre) * size + shift
        nodes[:, 3] *= size
        out["nodes"] = nodes
    if "apex" in spec:
        out["apex"] = tuple(np.asarray(spec["apex"], float) + shift)
        out["region"] = (spec["region"][0] + shift[0], spec["region"][1] + shift[1], *spec["region"][2:])
    return out


def _loops(spec: dict, rng: np.random.Generator) -> list[dict]:
    """Small-bowel loops: smooth random walks of tube nodes inside a box."""
    lo, hi = np.array(spec["box"], float).T
    tubes = []
    for _ in range(spec["loops"]):
        point = rng.uniform(lo, hi)
        heading = rng.normal(size=3)
        nodes = []
        for _ in range(spec["nodes"]):
            nodes.append((*point, rng.uniform(*spec["radius"])))
            heading = heading / np.linalg.norm(heading) + 0.9 * rng.normal(size=3)
            heading /= np.linalg.norm(heading)
            point = np.clip(point + spec["step"] * heading, lo, hi)
        tube = {k: v for k, v in spec.items() if k not in ("box", "loops", "nodes", "step", "radius")}
        tubes.append({**tube, "shape": "tube", "nodes": nodes})
    return tubes


def habitus(rng: np.random.Generator) -> dict[str, Any]:
    """Body build and position: frame scale, muscle and fat (mm), belly, table and couch offsets."""
    size = rng.uniform(0.9, 1.03)
    return {
        "scale": np.array([size, size * rng.uniform(0.93, 1.07), rng.uniform(0.93, 1.07)]),
        "muscle": rng.uniform(8, 14), "fat": (rng.uniform(8, 28), rng.uniform(8, 28)), "belly": rng.uniform(0, 25),
        "offset": np.array([rng.uniform(-10, 10), rng.uniform(-15, 15)]),
        "couch_z": rng.uniform(-350, -250), "fov_z": rng.uniform(-15, 15),
    }


def patient(rng: np.random.Generator) -> tuple[list[dict], dict[str, Any]]:
    """This case's habitus and structures (shifted, resized, rotated, gas levels, present or not)."""
    build = habitus(rng)
    shifts: dict[str, np.ndarray] = {}
    structures = []
    for index, spec in enumerate(ANATOMY):
        for item in (_loops(spec, rng) if spec["shape"] == "loops" else [spec]):
            group = item.get("group") or f"#{index}"
            if group not in shifts:
                shifts[group] = rng.normal(0, item.get("jitter", JITTER_MM), 3)
            size = float(np.clip(1 + rng.normal(0, item.get("size", SIZE_SD)), *SIZE_RANGE))
            yaw = float(rng.normal(0, YAW_SD))
            present = rng.uniform() < item.get("p", 1.0)
            if item["shape"] == "prism":
                grow = [np.broadcast_to(build[key], 2) for key in item["grow"]]
                item = {**item, "grow_mm": np.sum(grow, axis=0) if grow else np.zeros(2),
                        "bulge_mm": build[item["bulge"]] if "bulge" in item else 0.0}
            else:
                item = _vary(item, shifts[group], size, yaw)
            if "gas_plane" in item:
                item["plane"] = rng.uniform(*item["gas_plane"])
            if "gas_level" in item:
                item["levels"] = rng.uniform(*item["gas_level"], len(item["nodes"]))
            if present:
                structures.append(item)
    return structures, build



def warped_frame(axes: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator) -> Frame:
    """The grid's canonical coordinates warped by one smooth random displacement field."""
    controls = np.clip(rng.normal(0, DEFORM_MM, (3, *[len(k) for k in DEFORM_KNOTS])), -2 * DEFORM_MM, 2 * DEFORM_MM)
    coords = tuple(axes[d].reshape([-1 if a == d else 1 for a in range(3)])
                   + tensor_field(axes, DEFORM_KNOTS, controls[d]) for d in range(3))
    return Frame(axes, coords, float(np.abs(controls).max()))
