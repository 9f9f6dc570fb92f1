"""clipseg3d class plugin: musculoskeletal structures of the abdomen.

The classes are in ``classes.yaml``; ``totalsegmentator_v2.yaml`` gives the TotalSegmentator v2
raw labels of those structures their class. clipseg3d finds this plugin through the
``clipseg3d.classes`` entry point, which names :func:`plugin`.
"""

from importlib import resources
from pathlib import Path

import yaml


def plugin() -> dict:
    """The classes and label-map extensions this plugin provides."""
    folder = resources.files(__package__)
    classes = yaml.safe_load(folder.joinpath("classes.yaml").read_text())
    return {"classes": classes["classes"], "label_maps": [Path(str(folder.joinpath("totalsegmentator_v2.yaml")))]}
