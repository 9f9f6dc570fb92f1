"""The phantom's anatomy, read once from ``anatomy.yaml``: tissues, body, structures and lesions.

:data:`ANATOMY` is the structure list in painting order, expanded from the YAML: a ``side``
entry is mirrored to the patient's left (x flipped, ``right_*`` names made ``left_*``) and the
``vertebrae`` and ``ribs`` families are built from their tables.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from clipseg3d.catalog import ClassEntry

_TABLES: dict[str, Any] = yaml.safe_load(resources.files(__package__).joinpath("anatomy.yaml").read_text())

#: tissue name -> (nominal HU, catalog class or None, texture amplitude in HU). Id = position.
TISSUES: dict[str, tuple[float, str | None, float]] = {
    name: (float(hu), cls, float(texture)) for name, (hu, cls, texture) in _TABLES["tissues"].items()}
HU_JITTER: float = float(_TABLES["hu_jitter"])
DEFAULT_WITHIN: tuple[str, ...] = tuple(_TABLES["default_within"])
TISSUE_GROUPS: dict[str, tuple[str, ...]] = {name: tuple(group) for name, group in _TABLES["tissue_groups"].items()}
MIRROR: dict[str, str] = _TABLES["mirror_names"]

CAVITY: tuple[float, float, float] = tuple(_TABLES["body"]["cavity"])   # semi-axes: x, y anterior, y posterior
BODY_EXPONENT: float = _TABLES["body"]["exponent"]
BELLY: tuple[float, float] = tuple(_TABLES["body"]["belly"])            # bulge centre and width along z

#: Lesion class -> count probabilities, diameter range (mm), and ``hu`` or ``contrast`` (see the YAML).
LESIONS: dict[str, dict[str, Any]] = _TABLES["lesions"]
LESION_TEXTURE: float = _TABLES["lesion_texture"]
NECROSIS_MM: float = _TABLES["necrosis"]["mm"]
NECROSIS_HU: float = _TABLES["necrosis"]["hu"]
MAX_TUMOUR_MM: float = max(spec["diameter"][1] for spec in LESIONS.values())

#: Classes outside the built-in catalog that the phantom can draw and label on request.
EXTRA_CLASSES: dict[str, ClassEntry] = {
    entry["name"]: ClassEntry.from_dict(entry, source="phantom") for entry in _TABLES["extra_classes"]}


def _mirrored(spec: dict) -> dict:
    """The left-side twin of a right-side structure: x flipped, right_* names made left_*."""
    def name(value: str) -> str:
        for right, left in MIRROR.items():
            value = value.replace(right, left)
        return value

    out = dict(spec)
    for key in ("tissue", "core", "fill", "gas"):
        if key in out:
            out[key] = name(out[key])
    out["within"] = tuple(name(t) for t in spec.get("within", DEFAULT_WITHIN))
    out["group"] = name(spec["group"]) + "~left" if "group" in spec else None
    if "centre" in out:
        out["centre"] = (-spec["centre"][0], *spec["centre"][1:])
    if "rot" in out:
        yaw, pitch, roll = spec["rot"]
        out["rot"] = (-yaw, pitch, -roll)
    if "nodes" in out:
        out["nodes"] = [(-x, y, z, r) for x, y, z, r in spec["nodes"]]
    if "apex" in out:
        out["apex"] = (-spec["apex"][0], *spec["apex"][1:])
        out["region"] = (-spec["region"][0], *spec["region"][1:])
    return out


def _within(names) -> tuple[str, ...]:
    """Tissue names with every group name replaced by its tissues."""
    return tuple(name for item in names for name in TISSUE_GROUPS.get(item, (item,)))


def _part(part: Mapping, centre, semi, group: str) -> dict:
    """A solid structure from a family's part (shape, tissues, ``within``), placed at ``centre``."""
    spec = {"shape": part["shape"], "tissue": part["tissue"], "centre": centre, "semi": tuple(semi),
            "rot": tuple(part.get("rot", (0, 0, 0))), "within": _within(part["within"]), "group": group}
    if "core" in part:
        spec.update(core=part["core"], shrink=part["shrink"])
    return spec


def _tube(part: Mapping, nodes, group: str) -> dict:
    """A tube structure from a family's part through ``nodes`` (x, y, z, radius)."""
    spec = {"shape": "tube", "tissue": part["tissue"], "nodes": [tuple(map(float, n)) for n in nodes],
            "within": _within(part["within"]), "group": group}
    if "jitter" in part:
        spec["jitter"] = part["jitter"]
    return spec


def _vertebrae(table: Mapping) -> list[dict]:
    """Every level's body (cortex around cancellous bone), arch, spinous and transverse processes."""
    y, group = table["y"], table["group"]
    body, arch, spinous, transverse = (table[key] for key in ("body", "arch", "spinous", "transverse"))
    parts = []
    for z, semi_x, semi_y, transverse_x in table["levels"]:
        arch_y = y - semi_y - arch["gap"]
        parts += [
            _part(body, (0, y, z), (semi_x, semi_y, body["half_height"]), group),
            _part(arch, (0, arch_y, z + arch["dz"]), arch["semi"], group),
            _part(spinous, (0, arch_y + spinous["dy"], z + spinous["dz"]), spinous["semi"], group),
            *(_part(transverse, (x, arch_y + transverse["dy"], z), transverse["semi"], group)
              for x in (transverse_x, -transverse_x)),
        ]
    return parts


def _ribs(table: Mapping) -> list[dict]:
    """Each rib (and its cartilage where it has one) as a tube along the cavity wall, both sides."""
    ax, ay = CAVITY[0] + table["clearance"], CAVITY[1] + table["clearance"]
    head_x, head_y, head_r = table["head"]
    bone, cartilage, group = table["bone"], table["cartilage"], table["group"]
    ribs = []
    for z0, end, drop, has_cartilage in table["levels"]:
        angles = np.radians(np.linspace(bone["from_deg"], end, bone["nodes"]))
        frac = np.linspace(bone["first"], 1.0, bone["nodes"])
        nodes = [(head_x, head_y, z0, head_r)] + [
            (ax * np.sin(a), -ay * np.cos(a), z0 - drop * f ** bone["power"], bone["radius"])
            for a, f in zip(angles, frac)]
        rib = _tube(bone, nodes, group)
        ribs += [rib, _mirrored(rib)]
        if has_cartilage:
            arc = np.radians(np.linspace(end, cartilage["to_deg"], cartilage["nodes"]))
            tail = [(ax * np.sin(a), -ay * np.cos(a), z0 - drop + cartilage["rise"] * k / (cartilage["nodes"] - 1),
                     cartilage["radius"]) for k, a in enumerate(arc)]
            tube = _tube(cartilage, tail, group)
            ribs += [tube, _mirrored(tube)]
    return ribs


_FAMILIES: dict[str, Callable[[Mapping], list[dict]]] = {"vertebrae": _vertebrae, "ribs": _ribs}


def _expand(entry: Mapping) -> list[dict]:
    """The structures one YAML entry stands for: a family's parts, or the entry and/or its mirror."""
    if "family" in entry:
        return _FAMILIES[entry["family"]](_TABLES[entry["family"]])
    spec = {key: value for key, value in entry.items() if key != "side"}
    if "within" in spec:
        spec["within"] = _within(spec["within"])
    if spec["shape"] in ("ellipsoid", "cylinder"):
        spec.setdefault("rot", (0, 0, 0))
    side = entry.get("side")
    if side not in (None, "both", "left"):
        raise ValueError(f"anatomy.yaml: side {side!r} of a {spec['tissue']} structure is not 'both' or 'left'")
    return [spec] if side is None else [spec, _mirrored(spec)] if side == "both" else [_mirrored(spec)]


#: Structures in painting order (the keys are described in ``anatomy.yaml``).
ANATOMY: list[dict] = [spec for entry in _TABLES["structures"] for spec in _expand(entry)]
