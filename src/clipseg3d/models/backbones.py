"""Segmentation backbones: each returns a decoder feature map and a global (bottleneck) feature.

A backbone is an ``nn.Module`` subclass of :class:`Backbone` registered by name with
:func:`register_backbone`; :func:`build_backbone` creates one from its name and arguments (as
stored in a checkpoint). Adding a backbone is one class and one decorator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import SwinUNETR, UNet
from torch import nn

_REGISTRY: dict[str, type["Backbone"]] = {}


def register_backbone(name: str) -> Callable[[type["Backbone"]], type["Backbone"]]:
    """Class decorator that makes a backbone available by ``name``."""

    def add(cls: type[Backbone]) -> type[Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.registry_name = name
        _REGISTRY[name] = cls
        return cls

    return add


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, **kwargs) -> "Backbone":
    """Instantiate a registered backbone by name."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; registered: {', '.join(list_backbones())}")
    return _REGISTRY[name](**kwargs)


class Backbone(nn.Module):
    """A 3D encoder-decoder. ``forward(x)`` returns ``(decoder_map, global_feature)``.

    ``decoder_map`` is [B, out_channels, *x.shape[2:]]; ``global_feature`` is [B, global_channels],
    the spatially averaged bottleneck. Subclasses record their constructor arguments in
    ``self.init_args`` so that a checkpoint can rebuild them.
    """

    registry_name: str = ""
    out_channels: int
    global_channels: int
    size_multiple: int = 1
    init_args: dict

    def check_input(self, x: torch.Tensor) -> None:
        spatial = x.shape[2:]
        if any(s % self.size_multiple for s in spatial):
            raise ValueError(f"{self.registry_name} backbone needs input sizes that are multiples of "
                             f"{self.size_multiple}; got {tuple(spatial)}")


class _BottleneckHook:
    """Keeps the spatial average of a module's output from the last forward pass."""

    def __init__(self, module: nn.Module):
        self.pooled: torch.Tensor | None = None
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.pooled = output.mean(dim=tuple(range(2, output.ndim)))


@register_backbone("unet")
class UNetBackbone(Backbone):
    """MONAI's residual 3D U-Net; small enough for CPU work with the default channels."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                 out_channels: int = 32, num_res_units: int = 2, norm: str = "instance", dropout: float = 0.0):
        super().__init__()
        self.init_args = dict(channels=list(channels), strides=list(strides), out_channels=out_channels,
                              num_res_units=num_res_units, norm=norm, dropout=dropout)
        self.net = UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=channels, strides=strides,
                        num_res_units=num_res_units, norm=norm, dropout=dropout)
        self.out_channels = out_channels
        self.global_channels = channels[-1]
        self.size_multiple = 1
        for s in strides:
            self.size_multiple *= s
        self._bottleneck = _BottleneckHook(self._bottom_layer())

    def _bottom_layer(self) -> nn.Module:
        """The innermost block of MONAI's nested (down, skip(sub-block), up) structure."""
        block = self.net.model
        while True:
            inner = block[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                block = inner
            else:
                return inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        decoder_map = self.net(x)
        return decoder_map, self._bottleneck.pooled


@register_backbone("swinunetr")
class SwinUNETRBackbone(Backbone):
    """MONAI's Swin UNETR (the paper's backbone at feature size 48; inputs multiples of 32)."""

    def __init__(self, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), dropout_path_rate: float = 0.0,
                 use_checkpoint: bool = False, use_v2: bool = False):
        super().__init__()
        self.init_args = dict(feature_size=feature_size, depths=list(depths), num_heads=list(num_heads),
                              dropout_path_rate=dropout_path_rate, use_checkpoint=use_checkpoint, use_v2=use_v2)
        self.net = SwinUNETR(in_channels=1, out_channels=feature_size, feature_size=feature_size, depths=depths,
                             num_heads=num_heads, dropout_path_rate=dropout_path_rate,
                             use_checkpoint=use_checkpoint, use_v2=use_v2)
        self.out_channels = feature_size
        self.global_channels = 16 * feature_size
        self.size_multiple = 32
        self._bottleneck = _BottleneckHook(self.net.encoder10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        decoder_map = self.net(x)
        return decoder_map, self._bottleneck.pooled
