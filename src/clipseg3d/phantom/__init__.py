"""CT phantoms: synthetic bodies with organs and lesions, written as labelled datasets.

The anatomy (tissues, structures, lesions) is ``anatomy.yaml``; scanner sites and the partially
labelled dataset definitions are ``datasets.yaml``. :func:`generate_case` builds one case from a
seed; :func:`write_dataset` and :func:`write_multi_dataset` write MSD-layout datasets with a
label-map YAML each.
"""

from clipseg3d.phantom.anatomy import (
    ANATOMY,
    DEFAULT_WITHIN,
    EXTRA_CLASSES,
    HU_JITTER,
    LESION_TEXTURE,
    LESIONS,
    MAX_TUMOUR_MM,
    NECROSIS_HU,
    NECROSIS_MM,
    TISSUES,
)
from clipseg3d.phantom.case import PhantomCase, Tissue
from clipseg3d.phantom.classes import drawable_classes
from clipseg3d.phantom.datasets import MULTI_DATASETS, SITES, Site, get_site
from clipseg3d.phantom.generate import generate_case
from clipseg3d.phantom.write import MARKER, case_seed, write_dataset, write_multi_dataset

__all__ = [
    "ANATOMY", "DEFAULT_WITHIN", "EXTRA_CLASSES", "HU_JITTER", "LESIONS", "LESION_TEXTURE", "MARKER", "MAX_TUMOUR_MM",
    "MULTI_DATASETS", "NECROSIS_HU", "NECROSIS_MM", "SITES", "TISSUES", "PhantomCase", "Site", "Tissue",
    "case_seed", "drawable_classes", "generate_case", "get_site", "write_dataset", "write_multi_dataset",
]
