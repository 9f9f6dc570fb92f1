"""What the benchmark trains and measures: the full budget and the ``--quick`` one."""

from __future__ import annotations

from dataclasses import dataclass

from clipseg3d.phantom import MULTI_DATASETS, Site

#: the scanner sites the six training datasets come from (A-C)
TRAINING_SITES = sorted({spec["site"] for spec in MULTI_DATASETS.values()})
#: the unseen site D: another grid, more noise, another HU calibration
SITE_D = Site("unseen_d", spacing=(2.0, 2.0, 2.5), noise_hu=30.0, hu_offset=25.0)
#: classes of the transfer task, none of which any training dataset labels
NEW_TASK = ["right_lung", "left_lung", "duodenum"]
#: the universal model's sampling weight per dataset (others 1); the specialists' steps follow it
DATASET_WEIGHTS = {"btcv_like": 3.0}
MIN_TUMOUR_MM = 15.0
HU_WINDOW = (-175.0, 250.0)
OVERLAP = 0.25
TEXT_DIM = 512  # CLIP ViT-B/32's embedding width, for the head timing
SEED = 0


@dataclass(frozen=True)
class Budget:
    """Sizes and step counts of one benchmark run."""

    cases_per_dataset: int
    heldout_per_site: int
    universal_steps: int
    transfer_steps: int
    transfer_cases: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    out_channels: int = 16
    spacing_mm: float = 5.0
    crop: tuple[int, int, int] = (64, 64, 48)
    lr: float = 3.0e-3
    warmup_steps: int = 50
    head_window: int = 64
    swin_feature: int = 48
    timing_repeats: int = 3
    window_scan: tuple[int, int, int] = (512, 512, 300)
    window_classes: int = 32


FULL = Budget(cases_per_dataset=8, heldout_per_site=2, universal_steps=2000, transfer_steps=150)
QUICK = Budget(cases_per_dataset=2, heldout_per_site=1, universal_steps=8, transfer_steps=2, channels=(8, 16, 32),
               strides=(2, 2), out_channels=8, crop=(32, 32, 32), warmup_steps=1, head_window=64, swin_feature=12,
               timing_repeats=1, window_scan=(96, 96, 60))
