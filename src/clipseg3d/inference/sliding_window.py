"""Sliding-window inference whose memory does not grow with a float32 K-channel volume.

:class:`StreamingInferer` runs the network once per window and adds each class's window logits,
weighted by the gaussian importance map *divided by the total weight that voxel receives from
all windows* (a single-channel float32 map computed up front), into one float16 accumulator per
class. Each accumulator therefore already holds the blended logit (no final division, so float16
never overflows) and equals MONAI's ``SlidingWindowInferer`` to float16 precision. MONAI's
inferer keeps a float32 K-channel output volume; this keeps 2 bytes per voxel and class.

``tta`` averages the window logits over flips of the anterior-posterior and superior-inferior
axes (4 passes). The left-right axis is not flipped: classes come in left/right pairs, and a
mirrored body would swap them.

Speed options (the float32 defaults are the reference): ``channels_last`` hands the network its
windows in the channels-last memory format (convolutions may pick other kernels: equal to
rounding); ``bfloat16`` runs it under bfloat16 autocast (where the CPU has bf16 instructions;
masks agree, probabilities move by a few thousandths). Without AVX-512, PyTorch's CPU convolutions
have no bfloat16 kernels and run about 100x slower in bfloat16 than in float32
(:func:`cpu_runs_bfloat16`).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import Inferer
from tqdm import tqdm

from clipseg3d.inference.heap import freed_memory_reused
from clipseg3d.models.model import UniversalModel

# Window logits are clamped to this magnitude so float16 sums stay finite (sigmoid saturates long before).
LOGIT_LIMIT = 1.0e4
# Tensor dims of a window batch [N, 1, X, Y, Z] that test-time augmentation flips: A-P and S-I, never L-R.
TTA_FLIP_DIMS = (3, 4)
Predictor = Callable[[torch.Tensor], torch.Tensor]


def cpu_runs_bfloat16() -> bool:
    """Whether this CPU has oneDNN's bfloat16 convolutions (AVX-512 and up). Without them a
    bfloat16 U-Net window took 3.3 s against 0.04 s in float32 (32³, oneDNN limited to AVX2)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else True


def class_predictor(model: UniversalModel, class_indices: Sequence[int]) -> Predictor:
    """Windows ``[N, 1, *roi]`` -> logits ``[N, k, *roi]`` for the chosen rows of the embedding table."""
    embeddings, adapter_slots = model.class_inputs(class_indices)

    def predict(windows: torch.Tensor) -> torch.Tensor:
        decoder_map, global_feature = model.backbone(windows)
        return model.head(decoder_map, global_feature, embeddings, adapter_slots)

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


class StreamingInferer(Inferer):
    """MONAI's sliding window (same windows, zero padding of sides smaller than the window,
    interval ``int(roi * (1 - overlap))``, gaussian or constant blending) with the result
    accumulated per class in float16: see the module docstring.

    ``inferer(inputs [1, 1, *S], network)`` -> C float16 volumes ``[*S]`` of blended logits on
    the inputs' device, where ``network(windows [N, 1, *roi]) -> [N, C, *roi]``. Runs without
    autograd. ``channels_last`` and ``bfloat16``: see the module docstring.
    """

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 1,
                 mode: str = "gaussian", sigma_scale: float = 0.125, tta: bool = False, progress: bool = False,
                 channels_last: bool = False, bfloat16: bool = False):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be at least 1, got {sw_batch_size}")
        self.roi_size = tuple(int(size) for size in roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.mode = mode
        self.sigma_scale = sigma_scale
        self.tta = tta
        self.progress = progress
        self.channels_last = channels_last
        self.bfloat16 = bfloat16

    def _windows(self, image: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[slice, ...]]]:
        """The zero-padded image, the padding per spatial axis and the window slices."""
        spatial = tuple(image.shape[2:])
        pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(self.roi_size, spatial)]
        if any(sum(pad) for pad in pads):
            image = F.pad(image, [value for pad in reversed(pads) for value in pad])
        padded = tuple(image.shape[2:])
        interval = [r if r == s else max(int(r * (1.0 - self.overlap)), 1) for r, s in zip(self.roi_size, padded)]
        return image, pads, dense_patch_slices(padded, self.roi_size, interval)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any,
                 **kwargs: Any) -> list[torch.Tensor]:
        if inputs.ndim != 5 or tuple(inputs.shape[:2]) != (1, 1):
            raise ValueError(f"expected one single-channel 3D image [1, 1, X, Y, Z], got {tuple(inputs.shape)}")
        if isinstance(inputs, MetaTensor):
            inputs = inputs.as_tensor()

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            if self.channels_last:
                windows = windows.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
                return network(windows, *args, **kwargs)

        predict = flip_averaged(predictor, TTA_FLIP_DIMS) if self.tta else predictor
        spatial = tuple(inputs.shape[2:])
        image, pads, windows = self._windows(inputs)
        importance = compute_importance_map(self.roi_size, mode=self.mode, sigma_scale=self.sigma_scale,
                                            device=image.device, dtype=torch.float32)
        total_weight = torch.zeros(image.shape[2:], device=image.device)
        for window in windows:
            total_weight[window] += importance
        accumulators: list[torch.Tensor] = []
        starts = range(0, len(windows), self.sw_batch_size)
        with freed_memory_reused():  # each window's activations land on the last one's pages
            for start in tqdm(starts, desc="windows", unit="batch", leave=False) if self.progress else starts:
                batch = windows[start:start + self.sw_batch_size]
                logits = predict(torch.cat([image[(slice(None), slice(None), *window)] for window in batch]))
                logits = logits.to(device=image.device, dtype=torch.float32)
                if not accumulators:
                    accumulators = [torch.zeros(image.shape[2:], dtype=torch.float16, device=image.device)
                                    for _ in range(logits.shape[1])]
                elif logits.shape[1] != len(accumulators):
                    raise ValueError(f"network gave {logits.shape[1]} channels, then {len(accumulators)}")
                for window, window_logits in zip(batch, logits):
                    window_logits.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT).mul_(importance / total_weight[window])
                    for accumulator, class_logits in zip(accumulators, window_logits):
                        accumulator[window] += class_logits
        if tuple(image.shape[2:]) != spatial:
            crop = tuple(slice(low, low + size) for (low, _), size in zip(pads, spatial))
            accumulators = [accumulator[crop].clone() for accumulator in accumulators]
        return accumulators
