"""The text-driven dynamic segmentation head.

For every (image, class) pair a controller turns [image feature ; class text feature] (each
projected to ``hidden`` channels) into the weights of a tiny stack of 1x1x1 convolutions
(``channels -> channels -> channels -> 1``) that runs on a ``channels``-wide projection of the
decoder map and gives that class's logit map. The class set is whatever rows the class-feature
table passed to :meth:`DynamicHead.forward` has.

Classes added to a trained model may each own a :class:`ClassAdapter`: a low-rank update of the
controller's output and an update of the decoder-map projection (two 3x3x3 convolutions that let
the class read decoder channels the shared projection leaves out, in their neighbourhood: a lesion
differs from its surroundings more than from a fixed value), both zero at the start and used by
that class only. :meth:`DynamicHead.forward` takes, beside the class embeddings, each class's
adapter slot (``-1``: none). Classes without an adapter run as a group of their own, untouched by
any adapter, so they give bit for bit the outputs they gave before classes were added (batched
matrix products may round differently when the batch changes, hence the separate group).

The dynamic convolutions are batched over images and classes and run over the voxels in chunks
with fused ``baddbmm`` + in-place ReLU, so the K x channels x voxels intermediates stay small
(a whole-window einsum streams them through memory several times and is several times slower).
At inference the classes also run in groups: a fixed working set per pass whatever the class
count, so the time grows linearly with it (one pass over all classes outgrows the caches).

With ``fused`` set (inference only, e.g. ``clipseg3d segment --compile``) the layers run as one
``torch.compile``-d kernel (:func:`fused_dynamic_layers`): every layer's multiply-adds for a voxel
in registers, no intermediate volume in memory. It compiles once per process (seconds; Inductor
caches the code on disk for later processes) for fixed class-group and chunk sizes, so any class
count and window size reuse it; on a CPU it runs the head about 3x faster. The shared projection
runs fused as well (:func:`fused_projection`: the group norm folded into a per-channel scale and
shift, ReLU and the 1x1x1 projection in one pass over the decoder map).
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import torch
from torch import nn

# Inference runs the dynamic convolutions over class groups x voxel chunks of a fixed size, so the
# time grows linearly with the class count: one class's channels x voxels block (float32) stays
# within a core's L1 data cache, one group's blocks within its L2 cache.
CLASS_BLOCK_BYTES = 16 << 10
WORKING_SET_BYTES = 512 << 10
# The fused kernel's fixed shapes: classes per group (a last, smaller group is padded) and voxels
# per chunk (a last, shorter chunk is padded).
FUSED_CLASSES = 32
FUSED_VOXELS = 16384


def pairwise_sum(terms: list[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` added as a balanced tree: independent additions that a CPU overlaps (a chain of
    them waits on each one; compiled, the tree runs the dynamic layers about a fifth faster)."""
    while len(terms) > 1:
        terms = [a + b for a, b in zip(terms[::2], terms[1::2])] + terms[len(terms) - len(terms) % 2:]
    return terms[0]


def fused_dynamic_layers(features: torch.Tensor, *layers: torch.Tensor) -> torch.Tensor:
    """Logits [G, n] of G classes on one image's features [C, n]; ``layers`` are weights [G, out, in]
    and biases [G, out, 1] in turn. Written as one multiply-add per weight on whole rows, so that
    ``torch.compile`` fuses all layers into one loop over the voxels."""
    hidden = list(features)
    pairs = list(zip(layers[::2], layers[1::2]))
    for depth, (weight, bias) in enumerate(pairs):
        rows = []
        for out in range(weight.shape[1]):
            row = bias[:, out] + pairwise_sum([weight[:, out, inp, None] * value for inp, value in enumerate(hidden)])
            rows.append(torch.relu(row) if depth < len(pairs) - 1 else row)
        hidden = rows
    return hidden[0]


def fused_projection(decoder: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> torch.Tensor:
    """Features [out, n] = ``weight`` [out, C] @ relu(``decoder`` [C, n] * ``scale`` + ``shift``) +
    ``bias`` [out, 1] (``scale``, ``shift``: [C, 1]), written as one multiply-add per weight on whole
    rows so that ``torch.compile`` makes it one loop over the voxels."""
    normalised = [torch.relu(row * scale[channel] + shift[channel]) for channel, row in enumerate(decoder)]
    return torch.stack([bias[out] + pairwise_sum([weight[out, channel] * value
                                                  for channel, value in enumerate(normalised)])
                        for out in range(weight.shape[0])])


def group_statistics(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) over the last dimension of ``groups`` (compiled: a reduction more than ten times
    faster than eager ``var_mean`` on a CPU)."""
    return torch.var_mean(groups, dim=-1, unbiased=False)


def fused_dynamic_layers_into(out: torch.Tensor, features: torch.Tensor, *layers: torch.Tensor) -> None:
    """:func:`fused_dynamic_layers` written into ``out`` [G, n]: compiled, the kernel stores each
    logit where it belongs instead of in a new tensor that is then copied (with huge pages, see
    :func:`clipseg3d.cli.main.use_huge_pages`, each new one costs a fresh page: 2.7x the time at 512 classes)."""
    out.copy_(fused_dynamic_layers(features, *layers))


def in_fused_chunks(kernel: Callable[..., torch.Tensor], rows: torch.Tensor, arguments: list[torch.Tensor],
                    out: torch.Tensor, kernel_into: Callable[..., None] | None = None) -> None:
    """``out`` [R, n] = ``kernel(rows, *arguments)`` for ``rows`` [C, n], over chunks of
    ``FUSED_VOXELS`` voxels so that the kernel sees one shape: whole chunks through ``kernel_into``
    (the same, writing into its first argument) when given, a last, shorter chunk padded."""
    voxels = rows.shape[-1]
    whole = voxels - voxels % FUSED_VOXELS if kernel_into is not None else 0
    for start in range(0, whole, FUSED_VOXELS):
        kernel_into(out[:, start:start + FUSED_VOXELS], rows[:, start:start + FUSED_VOXELS], *arguments)
    for start in range(whole, voxels, FUSED_VOXELS):
        chunk = rows[:, start:start + FUSED_VOXELS]
        count = chunk.shape[-1]
        if count < FUSED_VOXELS:
            chunk = torch.nn.functional.pad(chunk, (0, FUSED_VOXELS - count))
        out[:, start:start + count] = kernel(chunk, *arguments)[:, :count]


@cache
def compiled(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``function`` compiled (static shapes), once per process."""
    return torch.compile(function, dynamic=False, fullgraph=True)


class ClassAdapter(nn.Module):
    """One added class's own head parameters, all zero-started so the class starts unchanged.

    ``controller_update(x)``: rank-``rank`` update ``up(down(x))`` of the controller output;
    ``features``: 3x3x3 convolution (to twice the head's width), ReLU, 3x3x3 convolution of the
    normalised decoder map (the last one zero-started), added to the class's features.
    """

    def __init__(self, controller_in: int, controller_out: int, rank: int, decoder_channels: int, channels: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"adapter rank must be at least 1, got {rank}")
        self.down = nn.Linear(controller_in, rank, bias=False)
        self.up = nn.Linear(rank, controller_out)
        width = 2 * channels
        self.features = nn.Sequential(nn.Conv3d(decoder_channels, width, kernel_size=3, padding=1),
                                      nn.ReLU(inplace=True),
                                      nn.Conv3d(width, channels, kernel_size=3, padding=1))
        for zero in (self.up.weight, self.up.bias, self.features[-1].weight, self.features[-1].bias):
            nn.init.zeros_(zero)

    def controller_update(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class DynamicHead(nn.Module):
    """Controller + dynamic 1x1x1 convolutions producing one logit map per class.

    ``adapters`` class adapters (controller updates of rank ``adapter_rank``) serve the classes
    whose adapter slot names them (see the module docstring).
    """

    def __init__(self, decoder_channels: int, global_channels: int, text_dim: int, hidden: int = 256,
                 channels: int = 8, layers: int = 3, chunk_voxels: int = 4096, train_chunk_voxels: int = 32768,
                 adapters: int = 0, adapter_rank: int = 4, working_set_bytes: int = WORKING_SET_BYTES):
        super().__init__()
        if layers < 1:
            raise ValueError("the dynamic head needs at least one layer")
        self.text_dim = text_dim
        self.channels = channels
        self.chunk_voxels = chunk_voxels
        self.train_chunk_voxels = train_chunk_voxels
        self.working_set_bytes = working_set_bytes
        self.fused = False  # inference through the compiled kernel (see the module docstring)
        widths = [channels] * layers + [1]
        self.layer_shapes = list(zip(widths[1:], widths[:-1]))  # (out, in) per dynamic layer
        self.num_params = sum(out * inp + out for out, inp in self.layer_shapes)
        groups = 16 if decoder_channels % 16 == 0 else 1
        self.feature_proj = nn.Sequential(nn.GroupNorm(groups, decoder_channels), nn.ReLU(inplace=True),
                                          nn.Conv3d(decoder_channels, channels, kernel_size=1))
        # Both controller inputs are standardised first: the pooled bottleneck grows as the backbone
        # trains (and the generated weights act multiplicatively, so an unnormalised input makes the
        # logits blow up), and unit-norm text embeddings have components of only ~1/sqrt(text_dim).
        self.image_proj = nn.Sequential(nn.LayerNorm(global_channels), nn.Linear(global_channels, hidden))
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.ReLU(inplace=True))
        self.controller = nn.Linear(2 * hidden, self.num_params)
        self.adapters = nn.ModuleList(ClassAdapter(2 * hidden, self.num_params, adapter_rank, decoder_channels, channels)
                                      for _ in range(adapters))
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

    def class_parameters(self, global_feature: torch.Tensor, class_embeddings: torch.Tensor,
                         adapter_slot: int = -1) -> torch.Tensor:
        """[B, K, num_params] dynamic-convolution parameters of [K, text_dim] class embeddings, with
        the update of adapter ``adapter_slot`` (``-1``: none) added."""
        if class_embeddings.shape[-1] != self.text_dim:
            raise ValueError(f"class embeddings have {class_embeddings.shape[-1]} columns; this head takes "
                             f"{self.text_dim}")
        # contiguous: a strided view may take another matrix-product kernel and round differently
        inputs = self.controller_input(global_feature, class_embeddings.contiguous())
        params = self.controller(inputs)
        if adapter_slot >= 0:
            params = params + self.adapters[adapter_slot].controller_update(inputs)
        return params

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

    def inference_blocks(self, classes: int, voxels: int) -> tuple[int, int]:
        """(classes per group, voxels per chunk) of an inference pass: chunks of at most
        ``chunk_voxels`` voxels whose one-class block fits ``CLASS_BLOCK_BYTES``, and as many classes
        as keep the group's float32 intermediates within ``working_set_bytes``."""
        step = max(1, min(self.chunk_voxels, CLASS_BLOCK_BYTES // (4 * self.channels), voxels))
        return max(1, min(self.working_set_bytes // (4 * self.channels * step), classes)), step

    def apply_dynamic(self, features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Run the dynamic convolutions: features [B, C, *S], params [B, K, P] -> logits [B, K, *S]."""
        batch, classes = params.shape[:2]
        spatial = features.shape[2:]
        flat = features.reshape(batch, self.channels, -1)
        voxels = flat.shape[-1]
        layers = self.split_parameters(params)
        if torch.is_grad_enabled():
            # Every intermediate is kept for backward anyway, so chunks are larger (fewer allocations)
            # and concatenated (slice assignment would make each chunk's backward copy the whole gradient).
            step = self.train_chunk_voxels
            chunks = [self._dynamic_chunk(flat[:, :, start:start + step], layers, batch, classes)
                      for start in range(0, voxels, step)]
            return torch.cat(chunks, dim=-1).reshape(batch, classes, *spatial)
        if self.fused:
            return self._apply_fused(flat, layers, batch, classes).reshape(batch, classes, *spatial)
        # Without autograd: class groups x voxel chunks sized so the intermediates stay in cache
        # (one working set, whatever the class count, so the time grows linearly with it).
        group, step = self.inference_blocks(classes, voxels)
        logits = flat.new_empty((batch, classes, voxels))
        per_class = [(weight.reshape(batch, classes, *weight.shape[1:]), bias.reshape(batch, classes, *bias.shape[1:]))
                     for weight, bias in layers]
        for first in range(0, classes, group):
            count = min(group, classes - first)
            group_layers = [(weight[:, first:first + count].reshape(batch * count, *weight.shape[2:]),
                             bias[:, first:first + count].reshape(batch * count, *bias.shape[2:]))
                            for weight, bias in per_class]
            for start in range(0, voxels, step):
                chunk = flat[:, :, start:start + step]
                logits[:, first:first + count, start:start + chunk.shape[-1]] = self._dynamic_chunk(
                    chunk, group_layers, batch, count)
        return logits.reshape(batch, classes, *spatial)

    def _apply_fused(self, flat: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int,
                     classes: int) -> torch.Tensor:
        """Logits [B, K, n] of features [B, C, n] through the compiled kernel, padded to its fixed
        class-group and chunk sizes."""
        kernel, kernel_into = compiled(fused_dynamic_layers), compiled(fused_dynamic_layers_into)
        voxels = flat.shape[-1]
        groups = -(-classes // FUSED_CLASSES)
        padded = []  # per layer [B, groups * G, ...], zero weights for the padding classes
        for tensor in (part for layer in layers for part in layer):
            tensor = tensor.reshape(batch, classes, *tensor.shape[1:])
            padding = tensor.new_zeros((batch, groups * FUSED_CLASSES - classes, *tensor.shape[2:]))
            padded.append(torch.cat([tensor, padding], dim=1))
        logits = flat.new_empty((batch, groups * FUSED_CLASSES, voxels))
        for image in range(batch):
            for first in range(0, groups * FUSED_CLASSES, FUSED_CLASSES):
                group = [tensor[image, first:first + FUSED_CLASSES] for tensor in padded]
                in_fused_chunks(kernel, flat[image], group, logits[image, first:first + FUSED_CLASSES], kernel_into)
        return logits[:, :classes]

    def _fused_features(self, decoder_map: torch.Tensor) -> torch.Tensor:
        """``feature_proj(decoder_map)`` through the compiled :func:`fused_projection`: the group
        statistics in one pass, then normalisation, ReLU and projection in another, in chunks."""
        norm, _, projection = self.feature_proj
        batch, channels = decoder_map.shape[:2]
        flat = decoder_map.reshape(batch, channels, -1)
        variance, mean = compiled(group_statistics)(flat.reshape(batch, norm.num_groups, -1))
        per_channel = channels // norm.num_groups
        inverse = torch.rsqrt(variance + norm.eps).repeat_interleave(per_channel, dim=1)  # [B, C]
        scale = inverse * norm.weight
        shift = norm.bias - mean.repeat_interleave(per_channel, dim=1) * scale
        weight = projection.weight.reshape(self.channels, channels)
        bias = projection.bias.reshape(self.channels, 1)
        kernel = compiled(fused_projection)
        features = flat.new_empty((batch, self.channels, flat.shape[-1]))
        for image in range(batch):
            in_fused_chunks(kernel, flat[image],
                            [scale[image, :, None], shift[image, :, None], weight, bias], features[image])
        return features.reshape(batch, self.channels, *decoder_map.shape[2:])

    def _dynamic_chunk(self, chunk: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int,
                       classes: int) -> torch.Tensor:
        """Logits [B, K, n] of a feature chunk [B, C, n] under per-(image, class) layers ([B*K, out, in], [B*K, out, 1])."""
        (w_first, b_first), *rest = layers
        # The first layer shares each image's features across classes: one [K*out, in] matmul per image.
        w_first = w_first.reshape(batch, classes * w_first.shape[1], self.channels)
        b_first = b_first.reshape(batch, classes * b_first.shape[1], 1)
        hidden = torch.baddbmm(b_first, w_first, chunk)
        hidden = hidden.reshape(batch * classes, -1, chunk.shape[-1])
        for weight, bias in rest:
            hidden = torch.relu_(hidden)
            hidden = torch.baddbmm(bias, weight, hidden)
        return hidden.reshape(batch, classes, -1)

    def forward(self, decoder_map: torch.Tensor, global_feature: torch.Tensor, class_embeddings: torch.Tensor,
                adapter_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K, *S] of the K classes with embeddings ``class_embeddings`` [K, text_dim] and
        adapter slots ``adapter_slots`` [K] (long, ``-1``: no adapter; default: none has one)."""
        classes = class_embeddings.shape[0]
        if adapter_slots is None:
            adapter_slots = torch.full((classes,), -1, dtype=torch.long, device=class_embeddings.device)
        if adapter_slots.shape != (classes,) or bool((adapter_slots >= len(self.adapters)).any()):
            raise ValueError(f"adapter slots {adapter_slots.tolist()} do not fit {classes} classes and "
                             f"{len(self.adapters)} adapters")
        plain = (adapter_slots < 0).nonzero().flatten()
        adapted = (adapter_slots >= 0).nonzero().flatten()
        if not adapted.numel() and self.fused and not torch.is_grad_enabled():
            return self.apply_dynamic(self._fused_features(decoder_map),
                                      self.class_parameters(global_feature, class_embeddings))
        normalised = self.feature_proj[:-1](decoder_map)
        features = self.feature_proj[-1](normalised)
        if not adapted.numel():
            return self.apply_dynamic(features, self.class_parameters(global_feature, class_embeddings))
        rows, parts = [], []
        if plain.numel():
            rows.append(plain)
            parts.append(self.apply_dynamic(features, self.class_parameters(global_feature, class_embeddings[plain])))
        for row, slot in zip(adapted, adapter_slots[adapted].tolist()):
            own = features + self.adapters[slot].features(normalised)
            parts.append(self.apply_dynamic(own, self.class_parameters(global_feature, class_embeddings[row:row + 1],
                                                                       slot)))
            rows.append(row[None])
        return torch.cat(parts, dim=1)[:, torch.cat(rows).argsort()]
