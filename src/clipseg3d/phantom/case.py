"""A generated phantom case and the tissues it is painted with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from clipseg3d.phantom.datasets import Site


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
