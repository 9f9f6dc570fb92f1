"""clipseg3d class plugin: the spleen lesion that ``clipseg3d phantom --extra-classes spleen_lesion`` labels."""

CLASSES = {
    "classes": [
        {"name": "spleen_lesion", "kind": "tumour", "parents": ["spleen"], "aliases": ["splenic lesion"],
         "prompt": "A computerized tomography of a spleen lesion"},
    ],
}
