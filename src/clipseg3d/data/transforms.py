"""MONAI dictionary transforms that read dataset labels through their label maps.

:class:`LoadSegmentationsd` loads a folder of per-structure masks as one label volume and
:class:`LoadSliceMasksd` a folder of per-slice PNG masks (see :mod:`clipseg3d.data.label_readers`);
:class:`LabelMapToTargetsd` turns a raw label volume into K target channels and the ``labelled``
vector (see :func:`clipseg3d.data.targets.build_targets`), :class:`LabelMapToCodesd` into one int16
class code per voxel and a code table (see :func:`clipseg3d.data.targets.build_code_map`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from clipseg3d.catalog import ClassCatalog, load_catalog
from clipseg3d.data.label_readers import read_slice_masks, read_structure_masks
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.targets import LabelMapError, build_code_map, build_targets, label_volume_from_masks


def _numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


class _LabelMapd(MapTransform):
    """Reads raw labels (MetaTensor, 1xXxYxZ) through a label map: the map is ``label_map`` or, when
    that is None, ``data[dataset_key]`` (a manifest line's ``dataset``: built-in name or YAML path)."""

    def __init__(self, keys, *, label_map: LabelMap | str | Path | None, class_names: Sequence[str],
                 image_key: str | None, catalog: ClassCatalog | None, labelled_key: str, dataset_key: str,
                 allow_missing_keys: bool) -> None:
        super().__init__(keys, allow_missing_keys)
        self.catalog = catalog or load_catalog()
        self.class_names = self.catalog.resolve(class_names)
        self.image_key, self.labelled_key, self.dataset_key = image_key, labelled_key, dataset_key
        self._maps: dict[str, LabelMap] = {}
        self.label_map = self._map(label_map) if label_map is not None else None

    def _map(self, spec: LabelMap | str | Path) -> LabelMap:
        if isinstance(spec, LabelMap):
            return spec
        if str(spec) not in self._maps:
            self._maps[str(spec)] = LabelMap.load(spec, catalog=self.catalog)
        return self._maps[str(spec)]

    def convert(self, d: dict, key: str, label: MetaTensor, label_map: LabelMap, hu: np.ndarray | None) -> None:
        """Replace ``d[key]`` (``label``) by what it becomes; ``hu``: the image, if any."""
        raise NotImplementedError

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        label_map = self.label_map or self._map(d[self.dataset_key])
        image = d.get(self.image_key) if self.image_key else None
        for key in self.key_iterator(d):
            label = d[key]
            if not isinstance(label, MetaTensor):
                raise LabelMapError(f"{key!r}: expected a MONAI MetaTensor with an affine, got {type(label)}")
            if label.shape[0] != 1:
                raise LabelMapError(f"{key!r}: expected one channel first, got shape {tuple(label.shape)}")
            self.convert(d, key, label, label_map, _numpy(image[0]) if image is not None else None)
        return d


def _like(label: MetaTensor, array: np.ndarray) -> MetaTensor:
    """``array`` as a MetaTensor with ``label``'s metadata and transform history."""
    return MetaTensor(torch.from_numpy(array), meta=dict(label.meta), applied_operations=list(label.applied_operations))


class LabelMapToTargetsd(_LabelMapd):
    """Replace a raw label (MetaTensor, 1xXxYxZ) by K target channels and add ``labelled`` (K).

    Place after LoadImaged + EnsureChannelFirstd (and Orientationd/Spacingd, nearest for
    labels), before cropping. If the image is still in HU it gives the body midline.
    ``label_map=None`` reads each sample's map from ``data[dataset_key]`` (a manifest line's
    ``dataset``: built-in name or YAML path). With ``target_key`` the targets go to that key
    and the raw label is dropped; by default they replace the raw label under its own key.
    """

    def __init__(self, keys=("label",), *, label_map: LabelMap | str | Path | None,
                 class_names: Sequence[str], image_key: str | None = "image",
                 catalog: ClassCatalog | None = None, labelled_key: str = "labelled",
                 dataset_key: str = "dataset", target_key: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, label_map=label_map, class_names=class_names, image_key=image_key, catalog=catalog,
                         labelled_key=labelled_key, dataset_key=dataset_key, allow_missing_keys=allow_missing_keys)
        if target_key is not None and len(self.keys) != 1:
            raise LabelMapError(f"target_key {target_key!r} needs exactly one label key, got {self.keys}")
        self.target_key = target_key

    def convert(self, d: dict, key: str, label: MetaTensor, label_map: LabelMap, hu: np.ndarray | None) -> None:
        targets, labelled, _ = build_targets(label_map, _numpy(label[0]), _numpy(label.affine),
                                             self.class_names, image=hu, catalog=self.catalog)
        if self.target_key is not None:
            del d[key]
        d[self.target_key or key] = _like(label, targets)
        d[self.labelled_key] = torch.from_numpy(labelled)


class LabelMapToCodesd(_LabelMapd):
    """Replace a raw label (MetaTensor, 1xXxYxZ) by its class-code map (int16, 1xXxYxZ) under
    ``code_key``, and add its code table (uint8, [M, K]) under ``table_key`` and ``labelled`` (K).

    What :class:`LabelMapToTargetsd` gives, in 2 bytes a voxel instead of K
    (:func:`clipseg3d.data.targets.build_code_map`); :class:`clipseg3d.data.code_maps.CodesToTargetsd`
    makes the K channels of a crop. Placed as :class:`LabelMapToTargetsd` is.
    """

    def __init__(self, keys=("label",), *, label_map: LabelMap | str | Path | None,
                 class_names: Sequence[str], image_key: str | None = "image",
                 catalog: ClassCatalog | None = None, labelled_key: str = "labelled",
                 dataset_key: str = "dataset", code_key: str = "codes", table_key: str = "code_table",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, label_map=label_map, class_names=class_names, image_key=image_key, catalog=catalog,
                         labelled_key=labelled_key, dataset_key=dataset_key, allow_missing_keys=allow_missing_keys)
        if len(self.keys) != 1:
            raise LabelMapError(f"LabelMapToCodesd needs exactly one label key, got {self.keys}")
        self.code_key, self.table_key = code_key, table_key

    def convert(self, d: dict, key: str, label: MetaTensor, label_map: LabelMap, hu: np.ndarray | None) -> None:
        codes, table, labelled, _ = build_code_map(label_map, _numpy(label[0]), _numpy(label.affine),
                                                   self.class_names, image=hu, catalog=self.catalog)
        del d[key]
        d[self.code_key] = _like(label, codes[None])
        d[self.table_key] = torch.from_numpy(table)
        d[self.labelled_key] = torch.from_numpy(labelled)


def _label_tensor(label: np.ndarray, affine: np.ndarray, source: str) -> MetaTensor:
    """A label volume as LoadImaged + EnsureChannelFirstd would give it (1xXxYxZ, RAS affine)."""
    affine_t = torch.as_tensor(affine, dtype=torch.float64)
    meta = {"affine": affine_t, "original_affine": affine_t.clone(), "space": "RAS",
            "spatial_shape": np.array(label.shape), "original_channel_dim": 0, "filename_or_obj": source}
    return MetaTensor(torch.from_numpy(label[None].astype(np.int16)), meta=meta)


class _LoadLabelFormd(MapTransform):
    """Reads ``data[key]`` (a folder) and writes ``data[label_key]`` through the sample's label map."""

    def __init__(self, keys, *, label_key: str = "label", label_map: LabelMap | str | Path | None = None,
                 catalog: ClassCatalog | None = None, dataset_key: str = "dataset",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.catalog = catalog
        self.label_key, self.dataset_key = label_key, dataset_key
        self.label_map = label_map if isinstance(label_map, LabelMap) or label_map is None \
            else LabelMap.load(label_map, catalog=catalog)

    def read(self, label_map: LabelMap, folder: Path, data: Mapping) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label_map = self.label_map or LabelMap.load(d[self.dataset_key], catalog=self.catalog)
            label, affine = self.read(label_map, Path(d.pop(key)), d)
            d[self.label_key] = _label_tensor(label, affine, str(data[key]))
        return d


class LoadSegmentationsd(_LoadLabelFormd):
    """Load a folder of per-structure masks as an id-keyed label MetaTensor (1xXxYxZ).

    Masks named after the map's raw labels (``<name>.nii.gz``), or, when the map's layout has
    ``masks``, the NIfTI files and DICOM series folders its patterns match.
    """

    def __init__(self, keys=("segmentations",), **kwargs) -> None:
        super().__init__(keys, **kwargs)

    def read(self, label_map: LabelMap, folder: Path, data: Mapping) -> tuple[np.ndarray, np.ndarray]:
        if label_map.layout.get("masks"):
            return read_structure_masks(label_map, folder)
        return label_volume_from_masks(label_map, folder)


class LoadSliceMasksd(_LoadLabelFormd):
    """Load a folder of per-slice PNG masks of the DICOM series ``data[image_key]`` (its folder, or
    the image LoadImaged loaded from it) as a label MetaTensor."""

    def __init__(self, keys=("slices",), *, image_key: str = "image", **kwargs) -> None:
        super().__init__(keys, **kwargs)
        self.image_key = image_key

    def read(self, label_map: LabelMap, folder: Path, data: Mapping) -> tuple[np.ndarray, np.ndarray]:
        image = data[self.image_key]
        series = image.meta["filename_or_obj"] if isinstance(image, MetaTensor) else image
        return read_slice_masks(label_map, folder, Path(str(series)))
