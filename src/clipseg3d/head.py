"""The text-driven dynamic segmentation head.

For every (image, class) pair a controller turns [image feature ; class text feature] (each
projected to ``hidden`` channels) into the weights of a tiny stack of 1x1x1 convolutions
(``channels -> channels -> channels -> 1``) that runs on a ``channels``-wide projection of the
decoder map and gives that class's logit map. The class set is whatever rows the embedding
table passed to :meth:`DynamicHead.forward` has.

The dynamic convolutions are batched over images and classes and run over the voxels in chunks
with fused ``baddbmm`` + in-place ReLU, so the K x channels x voxels intermediates stay small
(a whole-window einsum streams them through memory several times and is several times slower).
"""

from __future__ import annotations

import torch
from torch import nn


class DynamicHead(nn.Module):
    """Controller + dynamic 1x1x1 convolutions producing one logit map per class."""

    def __init__(self, decoder_channels: int, global_channels: int, text_dim: int, hidden: int = 256,
                 channels: int = 8, layers: int = 3, chunk_voxels: int = 4096, train_chunk_voxels: int = 32768):
        super().__init__()
        if layers < 1:
            raise ValueError("the dynamic head needs at least one layer")
        self.channels = channels
        self.chunk_voxels = chunk_voxels
        self.train_chunk_voxels = train_chunk_voxels
        widths = [channels] * layers + [1]
        self.layer_shapes = list(zip(widths[1:], widths[:-1]))  # (out, in) per dynamic layer
        self.num_params = sum(out * inp + out for out, inp in self.layer_shapes)
        groups = 16 if decoder_channels % 16 == 0 else 1
        self.feature_proj = nn.Sequential(nn.GroupNorm(groups, decoder_channels), nn.ReLU(inplace=True),
                                          nn.Conv3d(decoder_channels, channels, kernel_size=1))
        self.image_proj = nn.Linear(global_channels, hidden)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(inplace=True))
        self.controller = nn.Linear(2 * hidden, self.num_params)
        self.reset_controller()

    @torch.no_grad()
    def reset_controller(self) -> None:
        """Start every class from one well-scaled convolution stack (He-initialised, via the bias).

        With a plain linear initialisation the generated weights are tiny, the logits of all
        classes start flat, and training idles for hundreds of steps before classes separate.
        """
        biases = []
        for out, inp in self.layer_shapes:
            biases += [torch.randn(out * inp) * (2.0 / inp) ** 0.5, torch.zeros(out)]
        self.controller.bias.copy_(torch.cat(biases))

    def controller_input(self, global_feature: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, K, 2*hidden]: every image feature paired with every class feature."""
        image = self.image_proj(global_feature)
        text = self.text_proj(text_embeddings)
        batch, classes = image.shape[0], text.shape[0]
        return torch.cat([image[:, None].expand(batch, classes, -1), text[None].expand(batch, classes, -1)], dim=-1)

    def class_parameters(self, global_feature: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, K, num_params] dynamic-convolution parameters."""
        return self.controller(self.controller_input(global_feature, text_embeddings))

    def split_parameters(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: weights [B*K, out, in] and biases [B*K, out, 1]."""
        flat = params.reshape(-1, self.num_params)
        layers, offset = [], 0
        for out, inp in self.layer_shapes:
            weight = flat[:, offset:offset + out * inp].reshape(-1, out, inp)
            offset += out * inp
            bias = flat[:, offset:offset + out].reshape(-1, out, 1)
            offset += out
            layers.append((weight, bias))
        return layers

    def apply_dynamic(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Run the dynamic convolutions: features [B, C, *S], params [B, K, P] -> logits [B, K, *S]."""
        batch, classes = params.shape[:2]
        spatial = features.shape[2:]
        flat = features.reshape(batch, self.channels, -1)
        voxels = flat.shape[-1]
        (w_first, b_first), *rest = self.split_parameters(params)
        # First layer shares each image's features across classes: one [K*out, in] matmul per image.
        w_first = w_first.reshape(batch, classes * w_first.shape[1], self.channels)
        b_first = b_first.reshape(batch, classes * b_first.shape[1], 1)
        # Without autograd, small chunks land in one preallocated output. With it, every
        # intermediate is kept for backward anyway, so chunks are larger (fewer allocations) and
        # concatenated (slice assignment would make each chunk's backward copy the whole gradient).
        training = torch.is_grad_enabled()
        step = self.train_chunk_voxels if training else self.chunk_voxels
        logits = None if training else flat.new_empty((batch, classes, voxels))
        chunks = []
        for start in range(0, voxels, step):
            chunk = flat[:, :, start:start + step]
            hidden = torch.baddbmm(b_first, w_first, chunk)
            hidden = hidden.reshape(batch * classes, -1, chunk.shape[-1])
            for weight, bias in rest:
                hidden = torch.relu_(hidden)
                hidden = torch.baddbmm(bias, weight, hidden)
            if logits is None:
                chunks.append(hidden.reshape(batch, classes, -1))
            else:
                logits[:, :, start:start + chunk.shape[-1]] = hidden.reshape(batch, classes, -1)
        if logits is None:
            logits = torch.cat(chunks, dim=-1)
        return logits.reshape(batch, classes, *spatial)

    def forward(self, decoder_map: torch.Tensor, global_feature: torch.Tensor,
                text_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, *S] for the K classes whose embeddings are the rows of ``text_embeddings``."""
        params = self.class_parameters(global_feature, text_embeddings)
        return self.apply_dynamic(self.feature_proj(decoder_map), params)
