"""The released Universal Model and SuPreM weight files: finding the state dict, its layout, and
the name each key has in a :class:`~clipseg3d.models.model.UniversalModel`.

A released file is ``{"net": state_dict, ...}`` saved from DistributedDataParallel, so keys may
start with ``module.``. The backbone keys come either flat (``swinViT.*``, ``encoder1.*``,
``down_tr64.*``) or under ``backbone.``; the head keys (``precls_conv``, ``GAP``,
``text_to_vision``, ``controller``) and the ``organ_embedding`` table sit beside them. Both the
Swin UNETR and the Models Genesis U-Net backbones are recognised by their first-level names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

ARCHITECTURES = {"swinunetr": "swinunetr_legacy", "unet": "genesis_unet"}
_FIRST_NAMES = {"swinunetr": ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                              "decoder5", "decoder4", "decoder3", "decoder2", "decoder1"),
                "unet": ("down_tr64", "down_tr128", "down_tr256", "down_tr512", "up_tr256", "up_tr128", "up_tr64")}
HEAD_NAMES = ("precls_conv", "GAP", "text_to_vision", "controller")
EMBEDDING_KEY = "organ_embedding"


class LayoutError(ValueError):
    """A weight file whose keys are not a known released layout."""


@dataclass
class ReleasedWeights:
    """A released file's weights named as in the model (``backbone.*``, ``head.*``)."""

    arch: str  # "swinunetr" | "unet"
    layout: str  # how the backbone keys were written, e.g. "module.backbone.*"
    state: dict[str, torch.Tensor]
    embeddings: torch.Tensor | None  # the file's organ_embedding, if any


def state_dict_of(content: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded file: its ``net`` (or ``state_dict``) entry, or the file itself."""
    if isinstance(content, Mapping):
        for key in ("net", "state_dict"):
            if isinstance(content.get(key), Mapping):
                content = content[key]
                break
    if not isinstance(content, Mapping) or not content:
        raise LayoutError("no state dict: expected {'net': {name: tensor}} or {name: tensor}")
    bad = [str(key) for key, value in content.items() if not (isinstance(key, str) and torch.is_tensor(value))]
    if bad:
        raise LayoutError(f"not a state dict: entries that are not named tensors: {', '.join(bad[:5])}")
    return dict(content)


def _first(key: str) -> str:
    return key.split(".", 1)[0]


def _unmatched(keys: list[str]) -> LayoutError:
    shown = ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
    return LayoutError(f"unknown weight layout: {len(keys)} key(s) match no released layout, first: {shown}")


def detect_arch(names: list[str]) -> str | None:
    """``swinunetr`` or ``unet`` from backbone key names (``module.``/``backbone.`` removed); None
    when no name is one of either backbone's."""
    found = [arch for arch, firsts in _FIRST_NAMES.items() if any(_first(name) in firsts for name in names)]
    if len(found) > 1:
        raise LayoutError("unknown weight layout: keys of both the Swin UNETR and the U-Net backbone")
    return found[0] if found else None


def map_released(state: Mapping[str, torch.Tensor], arch: str = "auto") -> ReleasedWeights:
    """Rename every key of a released state dict; any key that fits no layout is a :class:`LayoutError`
    naming the first such keys as the file writes them."""
    module = "module." if all(key.startswith("module.") for key in state) else ""
    names = {key[len(module):]: value for key, value in state.items()}
    embeddings = names.pop(EMBEDDING_KEY, None)
    head = {name: value for name, value in names.items() if _first(name) in HEAD_NAMES}
    rest = [name for name in names if name not in head]
    nested = "backbone." if any(name.startswith("backbone.") for name in rest) else ""
    outside = [module + name for name in rest if not name.startswith(nested)]
    if outside:
        raise _unmatched(outside)
    backbone = {name[len(nested):]: names[name] for name in rest}
    found = detect_arch(list(backbone))
    if found is None:
        raise _unmatched([module + name for name in rest] or list(state))
    if arch not in ("auto", found):
        raise LayoutError(f"--arch {arch}: the file holds a {found} backbone")
    unknown = [module + nested + name for name in backbone if _first(name) not in _FIRST_NAMES[found]]
    if unknown:
        raise _unmatched(unknown)
    mapped = {f"backbone.{name}": value for name, value in backbone.items()}
    mapped.update({f"head.{name}": value for name, value in head.items()})
    return ReleasedWeights(arch=found, layout=f"{module}{nested}*", state=mapped, embeddings=embeddings)


def check_fits(weights: ReleasedWeights, expected: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`LayoutError` unless the mapped weights are exactly the model's weights and shapes.

    ``expected`` is the model's state dict without the class embedding table."""
    extra = [name for name in weights.state if name not in expected]
    if extra:
        raise _unmatched(extra)
    missing = [name for name in expected if name not in weights.state]
    if missing:
        raise LayoutError(f"incomplete weights: {len(missing)} key(s) of the {weights.arch} model are absent, "
                          f"first: {', '.join(missing[:5])}")
    wrong = [f"{name} {list(weights.state[name].shape)} (expected {list(value.shape)})"
             for name, value in expected.items() if weights.state[name].shape != value.shape]
    if wrong:
        raise LayoutError(f"wrong shapes for {len(wrong)} key(s), first: {'; '.join(wrong[:3])}")
