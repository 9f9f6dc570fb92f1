"""Swin UNETR as the released Universal Model and SuPreM weights were trained: the patch merging
of MONAI before version 1.5.

That merging concatenates the eight 2x2x2 sub-grid samples in the (d, h, w) offset order of
:data:`LEGACY_MERGE_OFFSETS`, which repeats (0, 1, 0) and (0, 0, 1) and leaves out (1, 1, 0)
and (0, 1, 1); later MONAI versions take each offset once. The rest is MONAI's Swin UNETR,
without its output convolution: the head reads the ``decoder1`` map (feature size channels) and
the ``encoder10`` bottleneck (16 x feature size channels, at 1/32). Module names follow the
released state dicts (``swinViT``, ``encoder1`` ... ``decoder1``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMergingV2

from clipseg3d.models.backbones import Backbone, register_backbone

LEGACY_MERGE_OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
_PARTS = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
          "decoder5", "decoder4", "decoder3", "decoder2", "decoder1")


class LegacyPatchMerging(PatchMergingV2):
    """Patch merging with the pre-1.5 sample order (inputs [B, D, H, W, C]; odd sides are padded)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"legacy patch merging takes [B, D, H, W, C] inputs, got {tuple(x.shape)}")
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in LEGACY_MERGE_OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


@register_backbone("swinunetr_legacy")
class LegacySwinUNETRBackbone(Backbone):
    """Swin UNETR with the pre-1.5 patch merging; inputs multiples of 32.

    ``pooled_global`` as for :class:`~clipseg3d.models.genesis_unet.GenesisUNetBackbone`: the
    averaged bottleneck [B, C] when true, the bottleneck map when false (the original head).
    """

    def __init__(self, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), pooled_global: bool = True):
        super().__init__()
        self.init_args = dict(feature_size=feature_size, depths=list(depths), num_heads=list(num_heads),
                              pooled_global=pooled_global)
        self.pooled_global = pooled_global
        net = SwinUNETR(in_channels=1, out_channels=feature_size, feature_size=feature_size, depths=depths,
                        num_heads=num_heads, downsample=LegacyPatchMerging)
        for name in _PARTS:
            setattr(self, name, getattr(net, name))
        self.normalize = net.normalize
        self.out_channels = feature_size
        self.global_channels = 16 * feature_size
        self.size_multiple = 32

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        hidden = self.swinViT(x, self.normalize)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        bottleneck = self.encoder10(hidden[4])
        dec = self.decoder5(bottleneck, hidden[3])
        for block, skip in ((self.decoder4, enc3), (self.decoder3, enc2), (self.decoder2, enc1), (self.decoder1, enc0)):
            dec = block(dec, skip)
        return dec, bottleneck.mean(dim=(2, 3, 4)) if self.pooled_global else bottleneck

