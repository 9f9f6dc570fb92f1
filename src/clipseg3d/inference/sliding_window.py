"""Sliding-window inference whose memory does not grow with a float32 K-channel volume.

:func:`sliding_window_logits` runs the backbone once per window and adds each class's window
logits, weighted by the gaussian importance map *divided by the total weight that voxel receives
from all windows* (a single-channel float32 map computed up front), into one float16 accumulator
per class. Each accumulator therefore already holds the blended logit (no final division, so
float16 never overflows) and equals MONAI's ``SlidingWindowInferer`` to float16 precision.
MONAI's inferer keeps a float32 K-channel output volume; this keeps 2 bytes per voxel and class.

``tta`` averages the window logits over flips of the anterior-posterior and superior-inferior
axes (4 passes). The left-right axis is not flipped: classes come in left/right pairs, and a
mirrored body would swap them.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from tqdm import tqdm

from clipseg3d.models.model import UniversalModel

# Window logits are clamped to this magnitude so float16 sums stay finite (sigmoid saturates long before).
LOGIT_LIMIT = 1.0e4
Predictor = Callable[[torch.Tensor], torch.Tensor]


# -- sliding window with float16 streaming aggregation ------------------------------------------
def class_predictor(model: UniversalModel, class_indices: Sequence[int]) -> Predictor:
    """Windows ``[N, 1, *roi]`` -> logits ``[N, k, *roi]`` for the chosen rows of the embedding table."""
    features = model.text_features()[list(class_indices)]

    def predict(windows: torch.Tensor) -> torch.Tensor:
        decoder_map, global_feature = model.backbone(windows)
        return model.head(decoder_map, global_feature, features)

    return predict


def flip_averaged(predictor: Predictor, flip_dims: Sequence[int]) -> Predictor:
    """``predictor`` averaged over every combination of flips along ``flip_dims`` (tensor dims)."""
    combos = [list(combo) for count in range(len(flip_dims) + 1) for combo in combinations(flip_dims, count)]

    def predict(windows: torch.Tensor) -> torch.Tensor:
        total = predictor(windows)
        for dims in combos[1:]:
            total += predictor(windows.flip(dims)).flip(dims)
        return total / len(combos)

    return predict


def sliding_window_logits(image: torch.Tensor, predictor: Predictor, num_classes: int, roi_size: Sequence[int],
                          overlap: float = 0.5, sw_batch_size: int = 1, mode: str = "gaussian",
                          sigma_scale: float = 0.125, device: str | torch.device = "cpu",
                          progress: bool = False) -> list[torch.Tensor]:
    """Blended window logits of ``image [1, 1, *S]`` as ``num_classes`` float16 volumes ``[*S]``.

    Same windows, padding and blending as MONAI's ``SlidingWindowInferer`` (constant zero
    padding of sides smaller than the window, interval ``int(roi * (1 - overlap))``), but the
    result is accumulated per class in float16: see the module docstring.
    """
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected one single-channel 3D image [1, 1, X, Y, Z], got {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(size) for size in roi_size)
    spatial = tuple(image.shape[2:])
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, spatial)]
    if any(sum(pad) for pad in pads):
        image = F.pad(image, [value for pad in reversed(pads) for value in pad])
    padded = tuple(image.shape[2:])
    interval = [r if r == s else max(int(r * (1.0 - overlap)), 1) for r, s in zip(roi, padded)]
    windows = dense_patch_slices(padded, roi, interval)
    importance = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, dtype=torch.float32)
    total_weight = torch.zeros(padded)
    for window in windows:
        total_weight[window] += importance
    accumulators = [torch.zeros(padded, dtype=torch.float16) for _ in range(num_classes)]
    starts = range(0, len(windows), sw_batch_size)
    for start in tqdm(starts, desc="windows", unit="batch", leave=False) if progress else starts:
        batch = windows[start:start + sw_batch_size]
        inputs = torch.cat([image[(slice(None), slice(None), *window)] for window in batch]).to(device)
        logits = predictor(inputs).float().cpu()
        if logits.shape[1] != num_classes:
            raise ValueError(f"predictor gave {logits.shape[1]} channels, expected {num_classes}")
        for window, window_logits in zip(batch, logits):
            window_logits.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT).mul_(importance / total_weight[window])
            for accumulator, class_logits in zip(accumulators, window_logits):
                accumulator[window] += class_logits
    if padded != spatial:
        crop = tuple(slice(low, low + size) for (low, _), size in zip(pads, spatial))
        accumulators = [accumulator[crop].clone() for accumulator in accumulators]
    return accumulators


def predict_probabilities(model: UniversalModel, image: torch.Tensor, class_indices: Sequence[int],
                          roi_size: Sequence[int], overlap: float, sw_batch_size: int = 1, tta: bool = False,
                          device: str | torch.device = "cpu", progress: bool = False) -> list[torch.Tensor]:
    """Per-class float16 probabilities on the model grid for a preprocessed image ``[1, *S]``."""
    with torch.inference_mode():
        predictor = class_predictor(model, class_indices)
        if tta:
            predictor = flip_averaged(predictor, (3, 4))  # A-P and S-I; never left-right (see module docstring)
        logits = sliding_window_logits(image[None], predictor, len(class_indices), roi_size, overlap,
                                       sw_batch_size, device=device, progress=progress)
        return [channel.sigmoid_() for channel in logits]
