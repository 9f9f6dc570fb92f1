"""The backbone through ONNX Runtime: an optional extra (``pip install 'clipseg3d[onnx]'``).

:func:`onnx_backbone` exports a backbone in inference mode to ONNX (torch's TorchScript-based
exporter, in memory) and wraps an ONNX Runtime session in a module with the backbone's interface:
window batches in, ``(decoder_map, global_feature)`` out. Where onnxruntime is not installed, or
the export fails, it says so in one line and returns the backbone itself: the PyTorch path is the
fallback. The dynamic head stays in PyTorch (its weights are made per window).
"""

from __future__ import annotations

import io
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

from clipseg3d.models.backbones import Backbone

INSTALL_HINT = "pip install 'clipseg3d[onnx]'"


class OnnxBackbone(nn.Module):
    """An ONNX Runtime session in place of ``like`` (whose sizes and name it reports)."""

    def __init__(self, session, like: Backbone):
        super().__init__()
        self.session = session
        self.registry_name = like.registry_name
        self.out_channels = like.out_channels
        self.global_channels = like.global_channels
        self.size_multiple = like.size_multiple

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder_map, global_feature = self.session.run(None, {"windows": windows.detach().float().cpu().numpy()})
        return torch.from_numpy(decoder_map).to(windows.device), torch.from_numpy(global_feature).to(windows.device)


def onnx_backbone(backbone: Backbone, roi_size: Sequence[int], say: Callable[[str], None] = print) -> nn.Module:
    """``backbone`` run by ONNX Runtime on CPU windows of ``roi_size`` (any batch size), or
    ``backbone`` itself, after one line through ``say``, where that cannot be had."""
    try:
        import onnxruntime
    except ImportError:
        say(f"note: onnxruntime is not installed ({INSTALL_HINT}); the backbone runs in PyTorch")
        return backbone
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on traced control flow and deprecation
            torch.onnx.export(backbone.eval(), (torch.zeros(1, 1, *roi_size),), buffer, dynamo=False,
                              input_names=["windows"], output_names=["decoder_map", "global_feature"],
                              dynamic_axes={"windows": {0: "batch"}, "decoder_map": {0: "batch"},
                                            "global_feature": {0: "batch"}})
    except Exception as err:  # an exporter failure leaves the PyTorch path, which always works
        say(f"note: the {backbone.registry_name} backbone could not be exported to ONNX "
            f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); it runs in PyTorch")
        return backbone
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return OnnxBackbone(session, backbone)
