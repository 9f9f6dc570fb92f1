"""Synthetic abdominal CT phantoms: deterministic CT-like volumes with raw label maps.

A case is built in a *canonical* patient frame (millimetres; x towards the patient's right,
y anterior, z superior; origin on the body axis at the L1/L2 disc). The anatomy is data
(:data:`TISSUES`, :data:`ANATOMY`, :data:`LESIONS`): body layers, spine, ribs, pelvis, vessels and
organs as ellipsoids, elliptic cylinders, dome-bounded regions and tubes (chains of capsules with
a wall and gas/fluid contents), painted in priority order into a tissue map, each only over the
tissues it may displace. Per case the patient varies (habitus, organ shifts, sizes and rotations,
gas levels, bowel loops) and one smooth random displacement field (random control displacements
interpolated to the grid) warps the frame. Lesions are then placed inside their parent organs.
The image is tissue HU plus a smooth texture, blurred by the scanner's point spread and slice
profile, plus correlated noise; a :class:`Site` fixes spacing, field of view, slice thickness,
noise and HU calibration.

:func:`write_dataset` and :func:`write_multi_dataset` write MSD-layout datasets with a label-map
YAML each; :func:`main` is the ``clipseg3d phantom`` command.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import yaml
from scipy import ndimage

from clipseg3d.catalog import ClassCatalog, ClassEntry

# ---------------------------------------------------------------------------------------------
# Data: tissues, anatomy, lesions, extra classes, sites and multi-dataset subsets
# ---------------------------------------------------------------------------------------------

#: tissue name -> (nominal HU, catalog class or None, texture amplitude in HU). Id = position.
TISSUES: dict[str, tuple[float, str | None, float]] = {
    "air": (-1000.0, None, 0.0),
    "subcutaneous_fat": (-105.0, None, 6.0),
    "muscle": (50.0, None, 5.0),
    "visceral_fat": (-95.0, None, 7.0),
    "cortical_bone": (700.0, None, 20.0),
    "cancellous_bone": (400.0, None, 25.0),
    "vertebral_arch": (500.0, None, 25.0),
    "disc": (90.0, None, 4.0),
    "spinal_canal": (20.0, None, 3.0),
    "rib": (550.0, None, 25.0),
    "cartilage": (120.0, None, 6.0),
    "pelvic_bone": (450.0, None, 25.0),
    "femur_bone": (450.0, None, 25.0),
    "heart": (40.0, None, 4.0),
    "iliac_vessel": (40.0, None, 2.0),
    "mesenteric_vessel": (40.0, None, 2.0),
    "renal_sinus_fat": (-80.0, None, 6.0),
    "aorta": (40.0, "aorta", 2.0),
    "postcava": (40.0, "postcava", 2.0),
    "portal_and_splenic_vein": (40.0, "portal_and_splenic_vein", 2.0),
    "celiac_trunk": (40.0, "celiac_trunk", 2.0),
    "esophagus": (40.0, "esophagus", 3.0),
    "right_lung": (-850.0, "right_lung", 25.0),
    "left_lung": (-850.0, "left_lung", 25.0),
    "right_adrenal_gland": (25.0, "right_adrenal_gland", 3.0),
    "left_adrenal_gland": (25.0, "left_adrenal_gland", 3.0),
    "right_kidney": (30.0, "right_kidney", 4.0),
    "left_kidney": (30.0, "left_kidney", 4.0),
    "gallbladder": (10.0, "gallbladder", 2.0),
    "liver": (55.0, "liver", 5.0),
    "hepatic_vessel": (35.0, "hepatic_vessel", 2.0),
    "spleen": (45.0, "spleen", 4.0),
    "pancreas": (40.0, "pancreas", 6.0),
    "stomach_wall": (40.0, "stomach", 3.0),
    "stomach_fluid": (15.0, "stomach", 3.0),
    "stomach_gas": (-950.0, "stomach", 10.0),
    "duodenum_wall": (40.0, "duodenum", 3.0),
    "duodenum_fluid": (20.0, "duodenum", 3.0),
    "duodenum_gas": (-950.0, "duodenum", 10.0),
    "bladder": (10.0, "bladder", 2.0),
    "prostate": (40.0, "prostate", 4.0),
    "colon_wall": (40.0, "colon", 3.0),
    "colon_stool": (-10.0, "colon", 40.0),
    "colon_gas": (-950.0, "colon", 10.0),
    "rectum_wall": (40.0, "rectum", 3.0),
    "rectum_stool": (-10.0, "rectum", 40.0),
    "rectum_gas": (-950.0, "rectum", 10.0),
    "intestine_wall": (40.0, "intestine", 3.0),
    "intestine_fluid": (20.0, "intestine", 4.0),
    "intestine_gas": (-950.0, "intestine", 10.0),
    "right_head_of_femur": (700.0, "right_head_of_femur", 20.0),
    "right_femoral_marrow": (350.0, "right_head_of_femur", 25.0),
    "left_head_of_femur": (700.0, "left_head_of_femur", 20.0),
    "left_femoral_marrow": (350.0, "left_head_of_femur", 25.0),
}
HU_JITTER = 4.0          # per-case tissue HU variation (uniform, +-)
DEFAULT_WITHIN = ("visceral_fat",)
SOFT = ("visceral_fat", "muscle", "subcutaneous_fat")
MIRROR = {"right_": "left_"}


def _ell(tissue: str, centre, semi, rot=(0, 0, 0), **extra) -> dict:
    return {"shape": "ellipsoid", "tissue": tissue, "centre": centre, "semi": semi, "rot": rot, **extra}


def _cyl(tissue: str, centre, semi, rot=(0, 0, 0), **extra) -> dict:
    return {"shape": "cylinder", "tissue": tissue, "centre": centre, "semi": semi, "rot": rot, **extra}


def _tube(tissue: str, nodes, **extra) -> dict:
    return {"shape": "tube", "tissue": tissue, "nodes": nodes, **extra}


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


def _pair(spec: dict) -> list[dict]:
    return [spec, _mirrored(spec)]


# Vertebral levels: (z of the body centre, body semi-axes x/y), T7..L5; body half-height 13 mm.
_LEVELS = [(208 - 32 * k, 17.0 + 0.9 * k, 14.0 + 0.5 * k) for k in range(11)]
_SPINE_Y = -35.0


def _spine() -> list[dict]:
    bones = [_cyl("disc", (0, _SPINE_Y, 52), (21, 16, 178), within=SOFT, group="spine", jitter=2.0)]
    for z, a, b in _LEVELS:
        arch_y = _SPINE_Y - b - 11
        bones += [
            _cyl("cortical_bone", (0, _SPINE_Y, z), (a, b, 13), core="cancellous_bone", shrink=2.5,
                 within=SOFT + ("disc",), group="spine"),
            _cyl("vertebral_arch", (0, arch_y, z + 2), (15, 12, 11), within=SOFT, group="spine"),
            _ell("vertebral_arch", (0, arch_y - 24, z - 6), (4, 15, 9), (0, 20, 0), within=SOFT, group="spine"),
            _ell("vertebral_arch", (24 + 0.6 * (208 - z) / 32, arch_y + 6, z), (16, 5, 6), within=SOFT,
                 group="spine"),
            _ell("vertebral_arch", (-24 - 0.6 * (208 - z) / 32, arch_y + 6, z), (16, 5, 6), within=SOFT,
                 group="spine"),
        ]
    canal_y = _SPINE_Y - 15 - 11
    bones.append(_cyl("spinal_canal", (0, canal_y, 40), (9, 8, 200), within=SOFT + ("vertebral_arch", "disc"),
                      group="spine"))
    return bones


# Ribs T7..T12: (z at the spine, angle from the back where the bone ends, drop to that end, cartilage).
_RIBS = [(208, 165, 112, True), (176, 160, 118, True), (144, 155, 120, True), (112, 148, 115, True),
         (80, 125, 95, False), (48, 95, 55, False)]
_CAVITY = (135.0, 100.0, 96.0)     # abdominal cavity semi-axes: x, y anterior, y posterior
BODY_EXPONENT = 2.3                # axial body outline: a super-ellipse
BELLY = (-70.0, 110.0)             # anterior fat bulge: centre and width along z (mm)


def _ribs() -> list[dict]:
    ribs = []
    ax, ay = _CAVITY[0] + 4, _CAVITY[1] + 4
    for z0, end, drop, cartilage in _RIBS:
        angles = np.radians(np.linspace(30, end, 8))
        frac = np.linspace(0.08, 1.0, 8)
        nodes = [(22.0, _SPINE_Y - 12, z0, 3.5)] + [
            (ax * np.sin(a), -ay * np.cos(a), z0 - drop * f ** 1.2, 4.0) for a, f in zip(angles, frac)]
        ribs += _pair(_tube("rib", [tuple(map(float, n)) for n in nodes], within=SOFT, group="ribs", jitter=1.5))
        if cartilage:
            arc = np.radians(np.linspace(end, 174, 4))
            z_end = z0 - drop
            tail = [(ax * np.sin(a), -ay * np.cos(a), z_end + 35 * k / 3, 3.5) for k, a in enumerate(arc)]
            ribs += _pair(_tube("cartilage", [tuple(map(float, n)) for n in tail], within=SOFT, group="ribs"))
    ribs.append(_ell("rib", (0, _CAVITY[1] + 5, 150), (14, 5, 60), within=SOFT, group="ribs"))
    return ribs


_LUNG = {"region": (72.0, -5.0, 68.0, 100.0), "apex": (50.0, 5.0, 108.0), "reach": (85.0, 100.0), "drop": 65.0}

#: Structures in painting order. Keys: shape, tissue, geometry, ``within`` (tissues it may displace),
#: ``core``/``shrink`` (inner tissue), ``fill``/``gas``/``wall`` (tube contents), ``gas_plane``
#: (absolute y range of an air-fluid level) or ``gas_level`` (per-segment level in lumen radii),
#: ``group`` (shared position jitter), ``jitter`` (mm), ``size`` (relative size sd), ``p`` (presence).
ANATOMY: list[dict] = [
    {"shape": "prism", "tissue": "subcutaneous_fat", "grow": ("muscle", "fat"), "bulge": "belly", "within": ("air",)},
    {"shape": "prism", "tissue": "muscle", "grow": ("muscle",), "within": ("subcutaneous_fat",)},
    {"shape": "prism", "tissue": "visceral_fat", "grow": (), "within": ("muscle",)},
    *_spine(),
    *_ribs(),
    *_pair(_ell("pelvic_bone", (100, -35, -140), (6, 50, 45), (-38, 0, 0), within=SOFT, group="pelvis")),
    _ell("pelvic_bone", (0, -72, -175), (48, 17, 50), (0, -25, 0), within=SOFT + ("disc", "spinal_canal"),
         group="pelvis"),
    *_pair(_ell("pelvic_bone", (35, 60, -232), (35, 10, 14), (-60, 0, 0), within=SOFT, group="pelvis")),
    *_pair(_ell("pelvic_bone", (92, -5, -205), (33, 33, 33), within=SOFT, group="pelvis")),
    *_pair(_ell("right_head_of_femur", (92, -5, -205), (24, 24, 24), core="right_femoral_marrow", shrink=3,
                within=SOFT + ("pelvic_bone",), group="pelvis", size=0.04)),
    *_pair(_tube("femur_bone", [(100, -5, -212, 13), (125, -5, -240, 14), (135, -8, -290, 15)],
                 within=SOFT + ("pelvic_bone",), group="pelvis")),
    *_pair(_cyl("muscle", (38, -80, 60), (30, 21, 220), within=SOFT, group="spine")),
    _tube("aorta", [(-22, -20, 260, 12), (-24, -12, 150, 12), (-14, -8, 60, 11.5), (-10, -4, 0, 11),
                    (-8, -2, -60, 10), (-5, 0, -95, 9)], group="vessels", size=0.04),
    _tube("postcava", [(18, -2, -95, 10), (20, -5, -30, 11), (22, -6, 30, 12), (26, -2, 80, 13),
                       (22, 8, 112, 14)], group="vessels", size=0.04),
    *_pair(_tube("iliac_vessel", [(0, 0, -95, 7), (35, 5, -135, 7), (60, 0, -175, 7), (80, -5, -215, 7)],
                 group="vessels")),
    *_pair(_tube("iliac_vessel", [(18, -4, -100, 8), (40, -8, -140, 8), (65, -10, -180, 8), (82, -12, -215, 8)],
                 group="vessels")),
    _tube("celiac_trunk", [(-11, 6, 38, 3.5), (-8, 22, 40, 3.5), (-5, 30, 42, 3.0)], group="vessels"),
    _tube("mesenteric_vessel", [(-10, 6, 20, 3.5), (-8, 25, 5, 3.5), (-5, 37, -40, 3.5), (0, 40, -90, 3)],
          group="vessels"),
    _tube("mesenteric_vessel", [(8, 24, -8, 5), (12, 40, -45, 5), (15, 45, -90, 4.5)], group="vessels"),
    _tube("portal_and_splenic_vein", [(-88, -22, 30, 5), (-65, -2, 22, 5.5), (-35, 8, 12, 6), (0, 12, 2, 7),
                                      (25, 12, 20, 7.5), (45, 10, 40, 6.5), (60, 8, 55, 5)], group="vessels"),
    _tube("esophagus", [(-2, -10, 260, 8), (-2, 2, 170, 8), (-14, 4, 112, 8.5), (-30, 8, 90, 9),
                        (-45, 12, 78, 9)], group="vessels"),
    _ell("heart", (-15, 50, 170), (62, 52, 62), (25, 0, 0), group="heart"),
    {"shape": "dome", "tissue": "muscle", "band": (-5.0, 0.0), **_LUNG},
    {"shape": "dome", "tissue": "right_lung", "band": (0.0, None), **_LUNG},
    _mirrored({"shape": "dome", "tissue": "muscle", "band": (-5.0, 0.0), **_LUNG,
               "apex": (50.0, 0.0, 98.0)}),
    _mirrored({"shape": "dome", "tissue": "right_lung", "band": (0.0, None), **_LUNG,
               "apex": (50.0, 0.0, 98.0)}),
    *_pair(_ell("right_adrenal_gland", (34, -30, 48), (3.5, 13, 16), (-30, 0, 0), group="right_adrenal")),
    *_pair(_ell("right_adrenal_gland", (38, -34, 42), (3.5, 11, 13), (20, 0, 0), group="right_adrenal")),
    *_pair(_ell("renal_sinus_fat", (47, -28, -12), (11, 9, 24), (-25, 0, 0), group="right_kidney")),
    *_pair(_ell("right_kidney", (66, -38, -12), (25, 23, 54), (-25, 15, -12), group="right_kidney", size=0.08)),
    *_pair(_tube("muscle", [(28, -32, 30, 7), (36, -30, -20, 15), (45, -26, -80, 21), (60, -20, -140, 22),
                            (75, -10, -190, 18)])),
    _tube("duodenum_wall", [(32, 44, 2, 12), (50, 30, 0, 13), (58, 12, -20, 13), (56, 8, -55, 12),
                            (35, 15, -72, 12), (0, 22, -75, 11), (-25, 22, -65, 11), (-32, 25, -40, 11)],
          fill="duodenum_fluid", gas="duodenum_gas", wall=3.0, gas_level=(0.3, 2.0), group="duodenum"),
    _tube("pancreas", [(40, 22, -20, 14), (30, 25, -5, 16), (5, 30, 2, 11), (-30, 26, 12, 11),
                       (-60, 8, 20, 10), (-85, -12, 26, 8)], group="pancreas", size=0.1),
    _ell("gallbladder", (50, 48, -2), (14, 18, 32), (0, 30, 0), group="liver", size=0.15, p=0.93),
    _ell("liver", (62, 5, 45), (78, 92, 80), exp=2.2, group="liver", size=0.07),
    _ell("liver", (-10, 52, 65), (52, 34, 34), (-10, 0, 0), group="liver", size=0.12),
    _ell("spleen", (-98, -42, 38), (24, 56, 46), (24, -15, 0), group="spleen", size=0.12),
    _tube("stomach_wall", [(-58, -8, 88, 32), (-58, 20, 62, 36), (-42, 45, 32, 32), (-20, 58, 8, 26),
                           (10, 58, -2, 20), (30, 45, 2, 12)],
          fill="stomach_fluid", gas="stomach_gas", wall=5.0, gas_plane=(15.0, 75.0), group="stomach", size=0.1),
    _ell("bladder", (0, 35, -188), (42, 36, 34), group="pelvis", size=0.15, p=0.97),
    _ell("prostate", (0, 18, -235), (20, 16, 17), group="pelvis", p=0.5),
    _tube("colon_wall", [(80, 15, -120, 30), (95, 0, -85, 26), (98, -8, -40, 24), (90, 10, -5, 24),
                         (60, 55, -15, 23), (20, 70, -30, 22), (-25, 68, -25, 22), (-70, 50, 0, 23),
                         (-100, 15, 25, 22), (-108, -15, -10, 21), (-105, -15, -70, 20), (-95, -5, -115, 20),
                         (-65, 25, -140, 18), (-25, 25, -150, 17), (0, -15, -160, 16), (0, -45, -172, 16)],
          fill="colon_stool", gas="colon_gas", wall=3.0, gas_level=(-0.3, 1.2), group="colon"),
    _tube("rectum_wall", [(0, -45, -172, 17), (0, -58, -205, 18), (0, -55, -240, 16)],
          fill="rectum_stool", gas="rectum_gas", wall=3.0, gas_level=(0.2, 1.5), group="colon"),
    {"shape": "loops", "tissue": "intestine_wall", "fill": "intestine_fluid", "gas": "intestine_gas", "wall": 2.5,
     "gas_level": (0.4, 2.5), "box": ((-90, 90), (0, 80), (-165, -25)), "loops": 6, "nodes": 10, "step": 26.0,
     "radius": (10.0, 13.0)},
    _tube("hepatic_vessel", [(22, 2, 100, 6), (60, 10, 95, 4.5), (100, 10, 80, 3)], within=("liver",),
          group="liver"),
    _tube("hepatic_vessel", [(22, 4, 100, 6), (30, 40, 85, 4.5), (35, 75, 70, 3)], within=("liver",),
          group="liver"),
    _tube("hepatic_vessel", [(20, 6, 100, 5.5), (-10, 40, 85, 4), (-40, 60, 70, 3)], within=("liver",),
          group="liver"),
    _tube("hepatic_vessel", [(45, 10, 40, 6), (80, 0, 30, 4.5), (110, -10, 20, 3)], within=("liver",),
          group="liver"),
    _tube("hepatic_vessel", [(45, 10, 40, 5), (60, 40, 45, 4), (75, 70, 40, 3)], within=("liver",),
          group="liver"),
]

#: Lesion classes: count probabilities (0, 1, 2, ...), diameter range (mm), and HU either absolute
#: (``hu``) or relative to the parent's main tissue (``contrast``: (weight, low, high) choices);
#: ``near``/``near_mm``: the lesion touches (within near_mm) that class. Parents come from the catalog.
LESIONS: dict[str, dict[str, Any]] = {
    "liver_tumor": {"count": (0.35, 0.25, 0.2, 0.12, 0.08), "diameter": (5.0, 40.0),
                    "contrast": ((0.75, -40.0, -12.0), (0.25, 12.0, 30.0))},
    "hepatic_vessel_tumor": {"count": (0.8, 0.2), "diameter": (8.0, 30.0), "contrast": ((1.0, -35.0, -15.0),),
                             "near": "hepatic_vessel", "near_mm": 6.0},
    "kidney_tumor": {"count": (0.7, 0.3), "diameter": (10.0, 40.0),
                     "contrast": ((0.6, -25.0, -10.0), (0.4, 10.0, 25.0))},
    "kidney_cyst": {"count": (0.6, 0.25, 0.15), "diameter": (5.0, 30.0), "hu": (0.0, 10.0)},
    "pancreas_tumor": {"count": (0.75, 0.25), "diameter": (10.0, 30.0), "contrast": ((1.0, -30.0, -12.0),)},
    "lung_tumor": {"count": (0.6, 0.25, 0.15), "diameter": (5.0, 35.0), "hu": (20.0, 45.0)},
    "colon_tumor": {"count": (0.75, 0.25), "diameter": (15.0, 40.0), "hu": (35.0, 55.0)},
    "spleen_lesion": {"count": (0.5, 0.35, 0.15), "diameter": (8.0, 30.0), "contrast": ((1.0, -35.0, -15.0),)},
}
NECROSIS_MM = 25.0       # lesions at least this wide get a darker core ...
NECROSIS_HU = 15.0       # ... this much darker
LESION_TEXTURE = 4.0
MAX_TUMOUR_MM = 40.0

#: Classes outside the built-in catalog that the phantom can draw and label on request.
EXTRA_CLASSES: dict[str, ClassEntry] = {
    "spleen_lesion": ClassEntry(name="spleen_lesion", kind="tumour", parents=("spleen",),
                                prompt="A computerized tomography of a spleen lesion", source="phantom"),
}


@dataclass(frozen=True)
class Site:
    """A scanner and protocol: grid, field of view, slice thickness, noise and HU calibration."""

    name: str
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    fov_mm: tuple[float, float, float] = (384.0, 384.0, 288.0)
    fov_centre_z_mm: float = -20.0          # along the body axis, from the L1/L2 disc
    slice_thickness_mm: float | None = None  # None: the z spacing
    noise_hu: float = 12.0
    hu_offset: float = 0.0


SITES: dict[str, Site] = {site.name: site for site in (
    Site("default"),
    Site("fine", spacing=(1.5, 1.5, 1.5), fov_mm=(360.0, 360.0, 270.0), noise_hu=18.0),
    Site("thick_slice", spacing=(3.0, 3.0, 5.0), fov_mm=(384.0, 384.0, 290.0), slice_thickness_mm=6.0,
         noise_hu=9.0, hu_offset=6.0),
    Site("noisy", noise_hu=35.0, hu_offset=-8.0),
    Site("long_fov", fov_mm=(420.0, 420.0, 420.0), fov_centre_z_mm=-40.0),
)}

#: Partially labelled datasets that mirror public ones: labelled classes (a name, or a merged raw
#: label ``{name, classes, split}``), site, seed stream and tumour classes every case must show.
MULTI_DATASETS: dict[str, dict[str, Any]] = {
    "btcv_like": {"stream": 1, "site": "default", "require": (),
                  "classes": ("spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver",
                              "stomach", "aorta", "postcava", "portal_and_splenic_vein", "pancreas",
                              "right_adrenal_gland", "left_adrenal_gland")},
    "liver_like": {"stream": 2, "site": "thick_slice", "require": ("liver_tumor",),
                   "classes": ("liver", "liver_tumor")},
    "kits_like": {"stream": 3, "site": "default", "require": ("kidney_tumor",),
                  "classes": ({"name": "kidney", "classes": ["right_kidney", "left_kidney"], "split": "side"},
                              "kidney_tumor", "kidney_cyst")},
    "pancreas_like": {"stream": 4, "site": "noisy", "require": ("pancreas_tumor",),
                      "classes": ("pancreas", "pancreas_tumor")},
    "lung_like": {"stream": 5, "site": "default", "require": ("lung_tumor",), "classes": ("lung_tumor",)},
    "colon_like": {"stream": 6, "site": "thick_slice", "require": ("colon_tumor",), "classes": ("colon_tumor",)},
}

MARKER = ".clipseg3d-phantom"

# ---------------------------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    """One tissue of a case: its HU in this case, the class it is labelled as, and a lesion's parent."""

    name: str
    hu: float
    cls: str | None = None
    parent: str | None = None
    texture: float = 0.0


@dataclass
class PhantomCase:
    """One synthetic CT: image (int16 HU, RAS voxel axes), raw label map, affine and metadata."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    label_names: dict[int, str]
    lesions: list[dict]
    tissue: np.ndarray
    tissues: list[Tissue]
    seed: int
    site: Site

    def label_map(self, values: Mapping[str, int]) -> np.ndarray:
        """A uint8 label map with ``values[class]`` for each labelled class (0 elsewhere).

        A lesion whose class is not labelled takes its parent organ's value when that is labelled,
        as a dataset that labels only the organ would draw it.
        """
        lut = np.zeros(256, np.uint8)
        for tid, tissue in enumerate(self.tissues):
            if tissue.cls in values:
                lut[tid] = values[tissue.cls]
            elif tissue.parent in values:
                lut[tid] = values[tissue.parent]
        return lut[self.tissue]


def get_site(site: Site | str) -> Site:
    """A site preset by name (or the site itself)."""
    if isinstance(site, Site):
        return site
    if site not in SITES:
        raise ValueError(f"unknown phantom site {site!r}; known sites: {', '.join(SITES)}")
    return SITES[site]


@lru_cache(maxsize=1)
def _catalog() -> ClassCatalog:
    """The built-in catalog plus the phantom's extra classes; checks every class the data names."""
    catalog = ClassCatalog.builtin()
    catalog = catalog.extend(entry for name, entry in EXTRA_CLASSES.items() if name not in catalog)
    for name in [cls for _, cls, _ in TISSUES.values() if cls] + list(LESIONS):
        catalog[name]                     # raises CatalogError for a class the catalog lacks
    return catalog


def drawable_classes(extra_classes: Sequence[str] = ()) -> dict[int, str]:
    """Raw value -> class for every class a case can label: built-in order, extras appended."""
    catalog = _catalog()
    unknown = [name for name in extra_classes if name not in EXTRA_CLASSES]
    if unknown:
        raise ValueError(f"unknown extra class(es) {unknown}; the phantom can add: {', '.join(EXTRA_CLASSES)}")
    drawn = {cls for _, cls, _ in TISSUES.values() if cls} | set(LESIONS)
    builtin = [entry.name for entry in catalog if entry.source == "built-in"]
    names = [name for name in builtin if name in drawn]
    values = {builtin.index(name) + 1: name for name in names}
    for name in EXTRA_CLASSES:
        if name in extra_classes:
            values[len(builtin) + 1 + list(EXTRA_CLASSES).index(name)] = catalog[name].name
    return values


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rz(yaw) @ Rx(pitch) @ Ry(roll), angles in degrees; columns are the local axes."""
    y, p, r = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(r), 0, np.sin(r)], [0, 1, 0], [-np.sin(r), 0, np.cos(r)]])
    return rz @ rx @ ry


@dataclass
class _Frame:
    """The case's grid: canonical coordinates of every voxel, warped by the deformation field."""

    axes: tuple[np.ndarray, np.ndarray, np.ndarray]       # canonical coordinate per index, per axis
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]     # warped canonical x, y, z (full grid)
    margin: float                                          # bound on the displacement (mm)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose warped coordinates may fall in [lo, hi]."""
        out = []
        for axis, a, b in zip(self.axes, lo, hi):
            start = int(np.searchsorted(axis, a - self.margin, "left"))
            stop = int(np.searchsorted(axis, b + self.margin, "right"))
            if stop <= start:
                return None
            out.append(slice(start, stop))
        return tuple(out)

    def at(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(c[box] for c in self.coords)


def _local(xyz, centre, rot) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coordinates in a rotated frame centred on ``centre`` (``rot``'s columns are its axes)."""
    d = [c - float(o) for c, o in zip(xyz, centre)]
    return tuple(sum(float(rot[i, k]) * d[i] for i in range(3)) for k in range(3))


Layers = list[tuple[np.ndarray, str, int]]   # (mask, tissue, rank): higher ranks are inner layers


def _solid_layers(spec: dict, frame: _Frame) -> Iterator[tuple[tuple, Layers]]:
    """An ellipsoid (optionally super-ellipsoid, ``exp``) or elliptic cylinder, with an optional core."""
    centre, semi = np.asarray(spec["centre"], float), np.asarray(spec["semi"], float)
    exp = float(spec.get("exp", 2.0))
    cylinder = spec["shape"] == "cylinder"
    reach = np.linalg.norm(semi) if (cylinder or exp > 2) else semi.max()
    box = frame.box(centre - reach, centre + reach)
    if box is None:
        return
    lx, ly, lz = _local(frame.at(box), centre, _rotation(*spec["rot"]))

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


def _dome_layers(spec: dict, frame: _Frame) -> Iterator[tuple[tuple, Layers]]:
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


def _tube_layers(spec: dict, frame: _Frame) -> Iterator[tuple[tuple, Layers]]:
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


def _prism_layers(spec: dict, frame: _Frame) -> Iterator[tuple[tuple, Layers]]:
    """A body layer: a super-ellipse in every axial plane, flatter at the back, with a belly bulge."""
    x, y, _ = frame.coords
    grow_x, grow_y = (float(v) for v in spec["grow_mm"])
    ax = _CAVITY[0] + grow_x
    bulge = spec.get("bulge_mm", 0.0) * np.exp(-((frame.axes[2] - BELLY[0]) / BELLY[1]) ** 2)
    ay_ant = (_CAVITY[1] + grow_y + bulge).astype(np.float32)[None, None, :]
    semi_y = np.where(y > 0, ay_ant, np.float32(_CAVITY[2] + grow_y))
    mask = (np.abs(x) / ax) ** BODY_EXPONENT + (np.abs(y) / semi_y) ** BODY_EXPONENT <= 1
    yield (slice(None),) * 3, [(mask, spec["tissue"], 0)]


_SHAPES = {"ellipsoid": _solid_layers, "cylinder": _solid_layers, "dome": _dome_layers, "tube": _tube_layers,
           "prism": _prism_layers}


def _paint(structures: list[dict], frame: _Frame, shape: tuple[int, int, int]) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Per-case variation
# ---------------------------------------------------------------------------------------------


def _vary(spec: dict, shift: np.ndarray, size: float, yaw: float) -> dict:
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


def _habitus(rng: np.random.Generator) -> dict[str, Any]:
    """Body build and position: frame scale, muscle and fat (mm), belly, table and couch offsets."""
    size = rng.uniform(0.9, 1.03)
    return {
        "scale": np.array([size, size * rng.uniform(0.93, 1.07), rng.uniform(0.93, 1.07)]),
        "muscle": rng.uniform(8, 14), "fat": (rng.uniform(8, 28), rng.uniform(8, 28)), "belly": rng.uniform(0, 25),
        "offset": np.array([rng.uniform(-10, 10), rng.uniform(-15, 15)]),
        "couch_z": rng.uniform(-350, -250), "fov_z": rng.uniform(-15, 15),
    }


def _patient(rng: np.random.Generator) -> tuple[list[dict], dict[str, Any]]:
    """This case's habitus and structures (shifted, resized, rotated, gas levels, present or not)."""
    habitus = _habitus(rng)
    shifts: dict[str, np.ndarray] = {}
    structures = []
    for index, spec in enumerate(ANATOMY):
        for item in (_loops(spec, rng) if spec["shape"] == "loops" else [spec]):
            group = item.get("group") or f"#{index}"
            if group not in shifts:
                shifts[group] = rng.normal(0, item.get("jitter", 4.0), 3)
            size = float(np.clip(1 + rng.normal(0, item.get("size", 0.05)), 0.7, 1.3))
            yaw = float(rng.normal(0, 4.0))
            present = rng.uniform() < item.get("p", 1.0)
            if item["shape"] == "prism":
                grow = [np.broadcast_to(habitus[key], 2) for key in item["grow"]]
                item = {**item, "grow_mm": np.sum(grow, axis=0) if grow else np.zeros(2),
                        "bulge_mm": habitus[item["bulge"]] if "bulge" in item else 0.0}
            else:
                item = _vary(item, shifts[group], size, yaw)
            if "gas_plane" in item:
                item["plane"] = rng.uniform(*item["gas_plane"])
            if "gas_level" in item:
                item["levels"] = rng.uniform(*item["gas_level"], len(item["nodes"]))
            if present:
                structures.append(item)
    return structures, habitus


def _smooth_weights(coords: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Normalised gaussian interpolation weights (len(coords) x len(knots))."""
    width = 0.8 * (knots[1] - knots[0])
    w = np.exp(-0.5 * ((coords[:, None] - knots[None, :]) / width) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def _tensor_field(axes, knots, values: np.ndarray) -> np.ndarray:
    """A smooth field on the grid from values at a coarse lattice of knots (separable interpolation)."""
    wx, wy, wz = (_smooth_weights(a, k) for a, k in zip(axes, knots))
    field_ = np.tensordot(values.astype(np.float32), wz, axes=([2], [1]))   # (kx, ky, nz)
    field_ = np.tensordot(field_, wy, axes=([1], [1]))                       # (kx, nz, ny)
    field_ = np.tensordot(wx, field_, axes=([1], [0]))                       # (nx, nz, ny)
    return np.ascontiguousarray(field_.transpose(0, 2, 1))


_DEFORM_KNOTS = (np.linspace(-260, 260, 7), np.linspace(-200, 200, 5), np.linspace(-320, 320, 9))
_DEFORM_MM = 6.0
_TEXTURE_KNOTS = tuple(np.arange(-300, 301, 18.0) for _ in range(2)) + (np.arange(-360, 361, 18.0),)


# ---------------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------------


def _draw_count(probs: Sequence[float], rng: np.random.Generator, required: bool) -> int:
    probs = np.asarray(probs, float)
    if required:
        probs = np.concatenate([[0.0], probs[1:]]) if probs[1:].sum() > 0 else np.array([0.0, 1.0])
    return int(rng.choice(len(probs), p=probs / probs.sum()))


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


def _lesion_contrast(ranges: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
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


def _lesion_hu(spec: Mapping, parent_hu: float, rng: np.random.Generator) -> float:
    if "hu" in spec:
        return float(rng.uniform(*spec["hu"]))
    weights = np.array([option[0] for option in spec["contrast"]])
    _, low, high = spec["contrast"][int(rng.choice(len(weights), p=weights / weights.sum()))]
    return parent_hu + float(rng.uniform(low, high))


def _place_lesions(tissue: np.ndarray, tissues: list[Tissue], spacing: np.ndarray, world_axes,
                   rng: np.random.Generator, min_mm: float, require: Sequence[str],
                   contrast: Mapping[str, tuple[float, float]]) -> list[dict]:
    """Paint lesions into ``tissue`` (new tissue ids appended to ``tissues``); return their records.

    Each lesion is an ellipsoid (smallest diameter ``diameter_mm``) whose centre is at least its
    largest semi-axis plus one voxel below the parent's surface, so it lies wholly inside the parent
    with a rim of parent around it; lesions keep apart by two voxels. ``contrast`` replaces a
    class's HU with a (low, high) range relative to its parent.
    """
    catalog = _catalog()
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
            rot = _rotation(*rng.uniform(0, 360, 3))
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
    lx, ly, lz = _local(grids, centre, rot)
    q = (lx / semi[0]) ** 2 + (ly / semi[1]) ** 2 + (lz / semi[2]) ** 2
    sub = tissue[box]
    inside = np.isin(sub, parent_ids)
    layers = [(q <= 1, hu)]
    if 2 * semi.min() >= NECROSIS_MM:
        layers.append((q <= 0.25, hu - NECROSIS_HU))
    for mask, value in layers:
        tissues.append(Tissue(f"{name}#{len(tissues)}", float(value), name, parent, LESION_TEXTURE))
        sub[mask & inside] = len(tissues) - 1


# ---------------------------------------------------------------------------------------------
# Case generation
# ---------------------------------------------------------------------------------------------


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
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom seed must be a non-negative integer, got {seed!r}")
    site = get_site(site)
    label_names = drawable_classes(extra_classes)
    if not 0 < min_tumour_mm <= MAX_TUMOUR_MM:
        raise ValueError(f"min_tumour_mm must be in (0, {MAX_TUMOUR_MM:g}], got {min_tumour_mm}")
    unknown = [name for name in require_tumours if name not in LESIONS]
    if unknown:
        raise ValueError(f"require_tumours: {unknown} are not lesion classes ({', '.join(LESIONS)})")
    contrast = _lesion_contrast(lesion_contrast or {})
    spacing = np.asarray(site.spacing if spacing is None else spacing, float)
    if spacing.shape != (3,) or (spacing <= 0).any():
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing.tolist()}")
    rng_anatomy, rng_deform, rng_lesion, rng_noise = (np.random.default_rng([int(seed), k]) for k in range(4))

    structures, habitus = _patient(rng_anatomy)
    hu = {name: value + rng_anatomy.uniform(-HU_JITTER, HU_JITTER) + site.hu_offset
          for name, (value, _, _) in TISSUES.items()}
    tissues = [Tissue(name, hu[name], cls, None, tex) for name, (_, cls, tex) in TISSUES.items()]

    # Grid: FOV centred on the scanner axis, body offset on the table, couch position along z.
    scale = habitus["scale"]
    shape = tuple(max(1, int(round(f / s))) for f, s in zip(site.fov_mm, spacing))
    body = np.array([*habitus["offset"], habitus["couch_z"]])
    fov_centre = np.array([0.0, 0.0, scale[2] * (site.fov_centre_z_mm + habitus["fov_z"]) + body[2]])
    origin = fov_centre - (np.array(shape) - 1) / 2 * spacing
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    world_axes = tuple((origin[d] + spacing[d] * np.arange(shape[d])).astype(np.float32) for d in range(3))
    axes = tuple(((world_axes[d] - body[d]) / scale[d]).astype(np.float32) for d in range(3))

    controls = np.clip(rng_deform.normal(0, _DEFORM_MM, (3, *[len(k) for k in _DEFORM_KNOTS])),
                       -2 * _DEFORM_MM, 2 * _DEFORM_MM)
    coords = tuple(axes[d].reshape([-1 if a == d else 1 for a in range(3)])
                   + _tensor_field(axes, _DEFORM_KNOTS, controls[d]) for d in range(3))
    frame = _Frame(axes, coords, float(np.abs(controls).max()))
    tissue = _paint(structures, frame, shape)
    del coords, frame

    lesions = (_place_lesions(tissue, tissues, spacing, world_axes, rng_lesion, min_tumour_mm, require_tumours,
                              contrast) if tumours else [])
    for record in lesions:
        record["labelled"] = record["class"] in label_names.values()

    texture = _tensor_field(axes, _TEXTURE_KNOTS,
                            rng_deform.normal(size=tuple(len(k) for k in _TEXTURE_KNOTS)))
    image = _render(tissue, tissues, texture, site, spacing, rng_noise if noise else None)
    case = PhantomCase(image=image, label=np.zeros(shape, np.uint8), affine=affine, label_names=label_names,
                       lesions=lesions, tissue=tissue, tissues=tissues, seed=int(seed), site=site)
    case.label = case.label_map({name: value for value, name in label_names.items()})
    return case


def _render(tissue: np.ndarray, tissues: list[Tissue], texture: np.ndarray, site: Site, spacing: np.ndarray,
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


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def case_seed(seed: int, stream: int, index: int) -> int:
    """The seed of case ``index`` of seed stream ``stream`` (one stream per dataset)."""
    return int(np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(1)[0])


def _raw_labels(classes: Sequence[str | Mapping] | None, drawable: Mapping[int, str], name: str
                ) -> tuple[dict[int, Any], dict[str, int]]:
    """(YAML labels, class -> raw value) for a dataset that labels ``classes`` (None: all drawable)."""
    if classes is None:
        return dict(drawable), {cls: value for value, cls in drawable.items()}
    known = set(drawable.values())
    labels: dict[int, Any] = {}
    values: dict[str, int] = {}
    for value, spec in enumerate(classes, start=1):
        members = [spec] if isinstance(spec, str) else list(spec.get("classes", ()))
        for cls in members:
            if cls not in known:
                raise ValueError(f"phantom dataset {name!r}: class {cls!r} is not drawn by the phantom "
                                 f"(drawable: {', '.join(sorted(known))})")
            if cls in values:
                raise ValueError(f"phantom dataset {name!r}: class {cls!r} is listed twice")
            values[cls] = value
        labels[value] = spec if isinstance(spec, str) else dict(spec)
    return labels, values


def _label_title(spec: Any) -> str:
    return spec if isinstance(spec, str) else spec["name"]


def _check_target(out: Path) -> dict | None:
    """The previous marker of a phantom dataset in ``out``; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"{out}: folder is not empty and is not a phantom dataset (no readable {MARKER}); "
                              "choose an empty or new folder") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write to a hidden temporary name beside ``path``; the caller renames it into place."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp.nii.gz")
    img.to_filename(tmp)
    return tmp


def _write_case(job: tuple) -> dict:
    """Generate and write one case (image and label land together); returns its record."""
    out, stem, seed, kwargs, values = job
    case = generate_case(seed, **kwargs)
    image_path, label_path = out / "imagesTr" / f"{stem}.nii.gz", out / "labelsTr" / f"{stem}.nii.gz"
    temps = []
    try:
        temps.append(_save_nifti(case.image, case.affine, image_path))
        temps.append(_save_nifti(case.label_map(values), case.affine, label_path))
        os.replace(temps[0], image_path)
        os.replace(temps[1], label_path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return {"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz", "seed": seed,
            "shape": list(case.image.shape), "lesions": case.lesions}


def write_dataset(out: Path, cases: int, seed: int, site: Site | str = "default",
                  spacing: Sequence[float] | None = None, classes: Sequence[str | Mapping] | None = None,
                  name: str = "phantom", extra_classes: Sequence[str] = (), min_tumour_mm: float = 5.0,
                  tumours: bool = True, *, require_tumours: Sequence[str] = (), stream: int = 0,
                  lesion_contrast: Mapping[str, Sequence[float]] | None = None, workers: int = 1) -> Path:
    """Write ``cases`` phantom cases in MSD layout with ``dataset.json`` and ``<name>.yaml``.

    ``classes`` limits the labelled classes (others are background in the label files but still
    in the images; an unlabelled lesion keeps its labelled parent's value); an entry may be a
    merged raw label ``{name, classes, split}``. Raw values are 1..K in ``classes`` order, or the
    phantom's own values when ``classes`` is None. ``out`` must be empty, new, or an earlier
    phantom dataset (which is replaced). ``lesion_contrast`` is :func:`generate_case`'s.
    ``workers`` > 1 generates cases in parallel processes.
    """
    out = Path(out)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"phantom dataset name {name!r}: use letters, digits, '_', '-' and '.' only")
    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"phantom dataset {out}: cases must be a positive integer, got {cases!r}")
    site = get_site(site)
    contrast = _lesion_contrast(lesion_contrast or {})
    drawable = drawable_classes(extra_classes)
    labels, values = _raw_labels(classes, drawable, name)
    previous = _check_target(out)
    if previous is not None and previous.get("kind") == "multi":
        raise FileExistsError(f"{out}: holds several phantom datasets; write a single one elsewhere")
    stems = [f"{name}_{i:03d}" for i in range(cases)]
    files = ([f"imagesTr/{s}.nii.gz" for s in stems] + [f"labelsTr/{s}.nii.gz" for s in stems]
             + ["dataset.json", f"{name}.yaml"])
    for old in (previous or {}).get("files", []):
        target = (out / old).resolve()
        if target.parent.is_relative_to(out.resolve()) and target.is_file():
            target.unlink()
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    settings = {"generator": "clipseg3d.phantom.generate", "name": name, "seed": seed, "stream": stream,
                "site": site.name, "spacing": None if spacing is None else [float(s) for s in spacing],
                "extra_classes": list(extra_classes), "min_tumour_mm": min_tumour_mm, "tumours": tumours,
                "require_tumours": list(require_tumours),
                "lesion_contrast": {name: list(bounds) for name, bounds in contrast.items()}, "files": files}
    _write_json(out / MARKER, {**settings, "complete": False})
    kwargs = {"site": site, "spacing": spacing, "tumours": tumours, "extra_classes": tuple(extra_classes),
              "min_tumour_mm": min_tumour_mm, "require_tumours": tuple(require_tumours), "lesion_contrast": contrast}
    jobs = [(out, stem, case_seed(seed, stream, i), kwargs, values) for i, stem in enumerate(stems)]
    if workers > 1 and cases > 1:
        with ProcessPoolExecutor(max_workers=min(workers, cases)) as pool:
            records = list(pool.map(_write_case, jobs))
    else:
        records = [_write_case(job) for job in jobs]
    dataset = {
        "name": name, "description": f"clipseg3d synthetic CT phantom (seed {seed}, site {site.name})",
        "reference": "clipseg3d.phantom.generate", "licence": "CC0-1.0", "release": "1.0",
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(v): _label_title(spec) for v, spec in labels.items()}},
        "numTraining": cases, "numTest": 0,
        "training": [{"image": r["image"], "label": r["label"]} for r in records], "test": [],
    }
    label_map = {"name": name, "title": f"Synthetic CT phantom dataset {name!r} (clipseg3d)",
                 "source": f"clipseg3d.phantom.generate (seed {seed}, stream {stream}, site {site.name})",
                 "label_count": len(labels), "layout": {"kind": "msd"}, "labels": labels}
    _write_json(out / "dataset.json", dataset)
    tmp = out / f".{name}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(label_map, sort_keys=False))
    os.replace(tmp, out / f"{name}.yaml")
    _write_json(out / MARKER, {**settings, "complete": True, "cases": records})
    return out


def write_multi_dataset(out: Path, cases_per_dataset: int, seed: int, site: Site | str | None = None,
                        spacing: Sequence[float] | None = None, extra_classes: Sequence[str] = (),
                        min_tumour_mm: float = 5.0, datasets: Sequence[str] | None = None,
                        lesion_contrast: Mapping[str, Sequence[float]] | None = None,
                        workers: int = 1) -> list[Path]:
    """Write the partially labelled datasets of :data:`MULTI_DATASETS`, one subfolder each.

    ``site`` None uses each dataset's own site; ``datasets`` picks a subset by name.
    """
    out = Path(out)
    names = list(MULTI_DATASETS) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in MULTI_DATASETS]
    if unknown:
        raise ValueError(f"unknown phantom dataset(s) {unknown}; known: {', '.join(MULTI_DATASETS)}")
    previous = _check_target(out)
    if previous is not None and previous.get("kind") != "multi":
        raise FileExistsError(f"{out}: holds a single phantom dataset, not a multi-dataset folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MARKER, {"generator": "clipseg3d.phantom.generate", "kind": "multi", "seed": seed,
                               "datasets": names, "files": []})
    written = []
    for name in names:
        spec = MULTI_DATASETS[name]
        classes = list(spec["classes"]) + [c for c in extra_classes if c not in spec["classes"]]
        written.append(write_dataset(out / name, cases_per_dataset, seed, site or spec["site"], spacing,
                                     classes, name, extra_classes, min_tumour_mm,
                                     require_tumours=spec["require"], stream=spec["stream"],
                                     lesion_contrast=lesion_contrast, workers=workers))
    return written
