"""The text-driven head exactly as the released Universal Model and SuPreM weights compute it.

- ``precls_conv``: GroupNorm(16), ReLU, 1x1x1 convolution of the decoder map to 8 channels;
- ``GAP``: GroupNorm(16), ReLU, global average pool, 1x1x1 convolution of the bottleneck map to
  256 channels (the image feature);
- ``text_to_vision``: linear 512 -> 256, ReLU (the class feature);
- ``controller``: 1x1x1 convolution 512 -> 153 of [image feature ; class feature], giving per
  (image, class) the weights of three dynamic 1x1x1 layers (64, 64 and 8 values, row-major
  ``W[out, in] = p[8 * out + in]``) and then their biases (8, 8, 1); ReLU after layers 1 and 2,
  layer 3's output is the class logit.

Module names follow the released state dicts. Unlike :class:`~clipseg3d.models.head.DynamicHead`
it takes the bottleneck *map* (the backbone built with ``pooled_global=False``), since it
normalises before pooling, and it has no class adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 8
HIDDEN = 256
# (out, in) of the three dynamic layers; the controller gives all weights first, then all biases.
LAYER_SHAPES = ((CHANNELS, CHANNELS), (CHANNELS, CHANNELS), (1, CHANNELS))
NUM_PARAMS = sum(out * inp + out for out, inp in LAYER_SHAPES)


def split_parameters(params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: weights [N, out, in] and biases [N, out, 1] from controller outputs [N, 153]."""
    weights, biases, offset = [], [], 0
    for out, inp in LAYER_SHAPES:
        weights.append(params[:, offset:offset + out * inp].reshape(-1, out, inp))
        offset += out * inp
    for out, _ in LAYER_SHAPES:
        biases.append(params[:, offset:offset + out].reshape(-1, out, 1))
        offset += out
    return list(zip(weights, biases))


class OriginalHead(nn.Module):
    """The released weights' head (see the module docstring); ``chunk_voxels`` bounds the memory of
    the dynamic layers, which run over the voxels in chunks."""

    def __init__(self, decoder_channels: int, global_channels: int, text_dim: int = 512, chunk_voxels: int = 4096):
        super().__init__()
        self.text_dim = text_dim
        self.chunk_voxels = chunk_voxels
        self.precls_conv = nn.Sequential(nn.GroupNorm(16, decoder_channels), nn.ReLU(inplace=True),
                                         nn.Conv3d(decoder_channels, CHANNELS, kernel_size=1))
        self.GAP = nn.Sequential(nn.GroupNorm(16, global_channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1),
                                 nn.Conv3d(global_channels, HIDDEN, kernel_size=1))
        self.text_to_vision = nn.Linear(text_dim, HIDDEN)
        self.controller = nn.Conv3d(2 * HIDDEN, NUM_PARAMS, kernel_size=1)

    def class_parameters(self, global_map: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, K, 153] dynamic-layer parameters for every (image, class) pair."""
        if global_map.ndim != 5:
            raise ValueError("the original head needs the bottleneck map [B, C, D, H, W]; build the backbone "
                             "with pooled_global=False")
        if class_embeddings.shape[-1] != self.text_dim:
            raise ValueError(f"class embeddings have {class_embeddings.shape[-1]} features; this head takes "
                             f"{self.text_dim}")
        image = self.GAP(global_map).flatten(1)
        text = torch.relu(self.text_to_vision(class_embeddings))
        batch, classes = image.shape[0], text.shape[0]
        pairs = torch.cat([image[:, None].expand(batch, classes, -1), text[None].expand(batch, classes, -1)], dim=-1)
        return F.linear(pairs, self.controller.weight.flatten(1), self.controller.bias)

    def apply_dynamic(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The three dynamic layers: features [B, 8, *S], params [B, K, 153] -> logits [B, K, *S]."""
        batch, classes = params.shape[:2]
        flat = features.reshape(batch, CHANNELS, -1)
        (w_first, b_first), *rest = split_parameters(params.reshape(batch * classes, NUM_PARAMS))
        # the first layer reads the same features for every class: one [K*8, 8] product per image
        w_first = w_first.reshape(batch, classes * CHANNELS, CHANNELS)
        b_first = b_first.reshape(batch, classes * CHANNELS, 1)
        chunks = []
        for start in range(0, flat.shape[-1], self.chunk_voxels):
            chunk = flat[:, :, start:start + self.chunk_voxels]
            hidden = torch.baddbmm(b_first, w_first, chunk).reshape(batch * classes, CHANNELS, -1)
            for weight, bias in rest:
                hidden = torch.baddbmm(bias, weight, torch.relu(hidden))
            chunks.append(hidden.reshape(batch, classes, -1))
        return torch.cat(chunks, dim=-1).reshape(batch, classes, *features.shape[2:])

    def forward(self, decoder_map: torch.Tensor, global_map: torch.Tensor, class_embeddings: torch.Tensor,
                adapter_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K, *S] of the K classes with text embeddings ``class_embeddings`` [K, text_dim];
        ``adapter_slots`` [K], if given, must all be ``-1`` (this head has no adapters)."""
        if adapter_slots is not None and bool((adapter_slots >= 0).any()):
            raise ValueError(f"the original head has no class adapters; got slots {adapter_slots.tolist()}")
        return self.apply_dynamic(self.precls_conv(decoder_map), self.class_parameters(global_map, class_embeddings))
