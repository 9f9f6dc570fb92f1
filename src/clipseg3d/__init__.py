"""clipseg3d: organ segmentation and tumour detection in 3D CT with a CLIP-driven universal model.

The Python API (imported on first use, so ``import clipseg3d`` stays cheap)::

    model = clipseg3d.load_model("model.ckpt")
    result = clipseg3d.segment(hu_volume, affine, model)   # result.masks["liver"]: bool array
"""

from clipseg3d.moved import install as _install_moved_modules

_install_moved_modules()

__all__ = ["ClassCatalog", "Preprocessing", "Segmentation", "StreamingInferer", "TrainedModel", "UniversalModel", "load_catalog",
           "load_model", "segment"]


def __getattr__(name: str):
    """The public names, each imported from its module when first asked for."""
    if name in ("load_model", "segment", "Segmentation", "TrainedModel"):
        from clipseg3d.inference import in_memory as module
    elif name in ("ClassCatalog", "load_catalog"):
        from clipseg3d import catalog as module
    elif name == "Preprocessing":
        from clipseg3d.data import preprocess as module
    elif name == "StreamingInferer":
        from clipseg3d.inference import sliding_window as module
    elif name == "UniversalModel":
        from clipseg3d.models import model as module
    else:
        raise AttributeError(f"module 'clipseg3d' has no attribute {name!r}")
    return getattr(module, name)
