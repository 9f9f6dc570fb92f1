"""The backbone through an ONNX runtime: ONNX Runtime (``pip install 'clipseg3d[onnx]'``) or
OpenVINO (``pip install 'clipseg3d[openvino]'``), both optional extras.

:func:`onnx_backbone` and :func:`openvino_backbone` export a backbone in inference mode to ONNX
(torch's TorchScript-based exporter, in memory, any batch size) and wrap the runtime in a module
with the backbone's interface: window batches in, ``(decoder_map, global_feature)`` out. Where the
runtime is not installed, or the export or the runtime's loading fails, they say so in one line
and return the backbone itself: the PyTorch path is the fallback. The dynamic head stays in
PyTorch (its weights are made per window).
"""

from __future__ import annotations

import importlib
import io
import warnings
from types import ModuleType
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from clipseg3d.models.backbones import Backbone

INSTALL_HINTS = {"onnxruntime": "pip install 'clipseg3d[onnx]'", "openvino": "pip install 'clipseg3d[openvino]'"}


class RuntimeBackbone(nn.Module):
    """A runtime's ``run(windows) -> (decoder_map, global_feature)`` (numpy) in place of ``like``
    (whose sizes and name it reports)."""

    def __init__(self, run: Callable[[np.ndarray], Sequence[np.ndarray]], like: Backbone, runtime: str):
        super().__init__()
        self.run = run
        self.runtime = runtime
        self.registry_name = like.registry_name
        self.out_channels = like.out_channels
        self.global_channels = like.global_channels
        self.size_multiple = like.size_multiple

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder_map, global_feature = self.run(windows.detach().float().cpu().contiguous().numpy())
        return torch.from_numpy(decoder_map).to(windows.device), torch.from_numpy(global_feature).to(windows.device)


def brief(err: Exception) -> str:
    """An exporter's or runtime's error on one line, at most 200 characters of its text."""
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def exported(backbone: Backbone, roi_size: Sequence[int], runtime: str, say: Callable[[str], None]) -> bytes | None:
    """``backbone`` as an in-memory ONNX model with a free batch axis, or None (after one line
    through ``say``) where the export fails."""
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on traced control flow and deprecation
            torch.onnx.export(backbone.eval(), (torch.zeros(1, 1, *roi_size),), buffer, dynamo=False,
                              input_names=["windows"], output_names=["decoder_map", "global_feature"],
                              dynamic_axes={"windows": {0: "batch"}, "decoder_map": {0: "batch"},
                                            "global_feature": {0: "batch"}})
    except Exception as err:  # an exporter failure leaves the PyTorch path, which always works
        say(f"note: the {backbone.registry_name} backbone could not be exported to ONNX for {runtime} "
            f"({brief(err)}); it runs in PyTorch")
        return None
    return buffer.getvalue()


def runtime_backbone(backbone: Backbone, roi_size: Sequence[int], runtime: str,
                     load: Callable[[ModuleType, bytes], Callable[[np.ndarray], Sequence[np.ndarray]]],
                     say: Callable[[str], None]) -> nn.Module:
    """``backbone`` exported and handed to ``load(runtime module, ONNX model)``, which returns the
    runtime's ``run``; ``backbone`` itself, after one line through ``say``, where the runtime is
    not installed, the export fails, or ``load`` or a first run on a blank window raises."""
    try:
        module = importlib.import_module(runtime)
    except ImportError:
        say(f"note: {runtime} is not installed ({INSTALL_HINTS[runtime]}); the backbone runs in PyTorch")
        return backbone
    model = exported(backbone, roi_size, runtime, say)
    if model is None:
        return backbone
    try:
        run = load(module, model)
        run(np.zeros((1, 1, *roi_size), np.float32))  # some runtimes fail only when they first run
    except Exception as err:  # an operator the runtime lacks: the PyTorch path still works
        say(f"note: {runtime} could not load the exported {backbone.registry_name} backbone "
            f"({brief(err)}); it runs in PyTorch")
        return backbone
    return RuntimeBackbone(run, backbone, runtime)


def onnx_backbone(backbone: Backbone, roi_size: Sequence[int], say: Callable[[str], None] = print) -> nn.Module:
    """``backbone`` run by ONNX Runtime on CPU windows of ``roi_size`` (any batch size), or
    ``backbone`` itself, after one line through ``say``, where that cannot be had."""
    def load(onnxruntime: ModuleType, model: bytes):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return lambda windows: session.run(None, {"windows": windows})

    return runtime_backbone(backbone, roi_size, "onnxruntime", load, say)


def openvino_backbone(backbone: Backbone, roi_size: Sequence[int], bfloat16: bool = False,
                      say: Callable[[str], None] = print) -> nn.Module:
    """``backbone`` compiled by OpenVINO for the CPU (windows of ``roi_size``, any batch size), in
    float32, or in bfloat16 where ``bfloat16`` and the CPU has it; or ``backbone`` itself, after
    one line through ``say``, where that cannot be had."""
    def load(openvino: ModuleType, model: bytes):
        core = openvino.Core()
        # the precision is set either way: on CPUs with AMX, OpenVINO's default is bfloat16
        compiled = core.compile_model(core.read_model(model), "CPU", {
            "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32"})
        request = compiled.create_infer_request()

        def run(windows: np.ndarray) -> list[np.ndarray]:
            outputs = request.infer({"windows": windows})  # copies: the next call reuses the request's buffers
            return [outputs[index] for index in range(2)]
        return run

    return runtime_backbone(backbone, roi_size, "openvino", load, say)
