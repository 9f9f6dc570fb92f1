"""clipseg3d: organ segmentation and tumour detection in 3D CT with a CLIP-driven universal model."""

from clipseg3d.moved import install as _install_moved_modules

_install_moved_modules()
