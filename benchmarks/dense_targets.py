"""The training pipeline that cached dense K-channel uint8 targets: the reference the int16 code
maps are measured against (``benchmarks/loader.py``) and checked bit for bit against
(``tests/test_code_maps.py``)."""

import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    OneOf,
    RandCropByLabelClassesd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)

from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.transforms import LabelMapToTargetsd, LoadSegmentationsd, LoadSliceMasksd


class DenseTargetsDataModule(CTDataModule):
    """CTDataModule with K-channel uint8 targets (and their crop centres) in the cache."""

    def deterministic_transforms(self, label_map):
        p = self.preprocessing
        return [LoadImaged(keys=["image", "label"], image_only=True, allow_missing_keys=True),
                LoadSliceMasksd(keys=("slices",), label_map=label_map, allow_missing_keys=True),
                LoadSegmentationsd(keys=("segmentations",), label_map=label_map, allow_missing_keys=True),
                EnsureChannelFirstd(keys=["image", "label"]), *p.spatial_transforms("image", ("label",)),
                LabelMapToTargetsd(keys=("label",), label_map=label_map, class_names=self.class_names,
                                   image_key="image", target_key="target"),
                *p.intensity_transforms("image"), *p.crop_transforms("image", ("target",)),
                SpatialPadd(keys=["image", "target"], spatial_size=self.hparams.crop_size),
                EnsureTyped(keys=["image"], dtype=torch.float32, track_meta=False),
                EnsureTyped(keys=["target"], dtype=torch.uint8, track_meta=False)]

    def random_crops(self, label_map):
        h, keys = self.hparams, ["image", "target"]
        by_class = RandCropByLabelClassesd(keys=keys, label_key="target", spatial_size=h.crop_size,
                                           ratios=self.crop_ratios(label_map), num_classes=len(self.class_names),
                                           indices_key="target_cls_indices", num_samples=h.samples_per_volume,
                                           warn=False)
        anywhere = RandSpatialCropSamplesd(keys=keys, roi_size=h.crop_size, num_samples=h.samples_per_volume,
                                           random_size=False)
        return [OneOf([by_class, anywhere], weights=[h.positive_fraction, 1.0 - h.positive_fraction]),
                EnsureTyped(keys=keys, track_meta=False), DeleteItemsd(keys="target_cls_indices")]

    def _dataset(self, records, label_map, train):
        deterministic = self.deterministic_transforms(label_map)
        if train:
            deterministic.append(ClassesToIndicesd(keys="target", num_classes=len(self.class_names),
                                                   max_samples_per_class=self.hparams.max_crop_centres))
        base = CacheDataset(records, Compose(deterministic), progress=False)
        return Dataset(base, Compose(self.random_crops(label_map))) if train else base
