"""The Models Genesis 3D U-Net, the released Universal Model and SuPreM U-Net backbone.

A unit is a 3x3x3 convolution (with bias), batch normalisation and ReLU. The normalisation always
uses the statistics of the batch it sees, in evaluation too (the running statistics are kept in
the state dict for the released weights' sake but never used), so a window's output depends on
the other windows of its batch: :attr:`GenesisUNetBackbone.batch_independent` is False and
:meth:`GenesisUNetBackbone.forward` runs the images of a batch one at a time.

Down path 1->32->64 | pool | 64->64->128 | pool | 128->128->256 | pool | 256->256->512; up path:
a 2x2x2 transposed convolution keeping the channels, the skip concatenated, two units
(768->256->256, 384->128->128, 192->64->64). The module names follow the released state dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipseg3d.models.backbones import Backbone, register_backbone


class BatchStatisticsNorm3d(nn.BatchNorm3d):
    """BatchNorm3d that normalises with the current batch's statistics in training and evaluation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class Unit(nn.Module):
    """3x3x3 convolution, batch-statistics normalisation, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = BatchStatisticsNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class Down(nn.Module):
    """Two units, optionally preceded by 2x2x2 max pooling (the first level has none)."""

    def __init__(self, in_channels: int, middle: int, out_channels: int, pool: bool):
        super().__init__()
        self.pool = pool
        self.ops = nn.Sequential(Unit(in_channels, middle), Unit(middle, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops(F.max_pool3d(x, 2) if self.pool else x)


class Up(nn.Module):
    """Upsampling by a transposed convolution, the skip concatenated, two units."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(Unit(in_channels + skip_channels, out_channels), Unit(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


@register_backbone("genesis_unet")
class GenesisUNetBackbone(Backbone):
    """Models Genesis 3D U-Net: a 64-channel decoder map and a 512-channel bottleneck at 1/8.

    With ``pooled_global`` the global feature is the averaged bottleneck [B, 512] (the
    :class:`Backbone` contract); without, the bottleneck map itself, which the original head
    normalises before pooling.
    """

    batch_independent = False

    def __init__(self, pooled_global: bool = True):
        super().__init__()
        self.init_args = dict(pooled_global=pooled_global)
        self.pooled_global = pooled_global
        self.down_tr64 = Down(1, 32, 64, pool=False)
        self.down_tr128 = Down(64, 64, 128, pool=True)
        self.down_tr256 = Down(128, 128, 256, pool=True)
        self.down_tr512 = Down(256, 256, 512, pool=True)
        self.up_tr256 = Up(512, 256, 256)
        self.up_tr128 = Up(256, 128, 128)
        self.up_tr64 = Up(128, 64, 64)
        self.out_channels = 64
        self.global_channels = 512
        self.size_multiple = 8

    def forward_one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on ``x`` as one batch (its normalisation statistics span the whole batch)."""
        skip64 = self.down_tr64(x)
        skip128 = self.down_tr128(skip64)
        skip256 = self.down_tr256(skip128)
        bottleneck = self.down_tr512(skip256)
        decoder_map = self.up_tr64(self.up_tr128(self.up_tr256(bottleneck, skip256), skip128), skip64)
        return decoder_map, bottleneck.mean(dim=(2, 3, 4)) if self.pooled_global else bottleneck

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image of the batch on its own, so a window's output never depends on its neighbours."""
        self.check_input(x)
        parts = [self.forward_one(x[index:index + 1]) for index in range(x.shape[0])]
        return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
