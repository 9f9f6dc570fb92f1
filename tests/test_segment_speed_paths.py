"""``segment``'s speed options against its float32 reference path, and ``--fast``'s checkpoint rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from clipseg3d.cli.segment import SegmentError, build_parser, load_segmenter, main
from clipseg3d.data.preprocess import Preprocessing
from clipseg3d.data.scans import read_scan
from test_inference_paths import CLASSES, MODEL_SPACING_MM, random_task, save_checkpoint, write_tiny_scan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# float16 accumulators through a sigmoid (see test_inference_paths)
PROBABILITY_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("speed")
    scan = write_tiny_scan(folder)["image"]
    task = random_task()
    fine = save_checkpoint(task, Preprocessing(MODEL_SPACING_MM), folder / "fine.ckpt")
    coarse = save_checkpoint(task, Preprocessing((3.0, 3.0, 4.0)), folder / "coarse.ckpt")
    return {"scan": scan, "fine": fine, "coarse": coarse, "out": folder / "out"}


def probabilities(case: dict[str, Path], options=(), checkpoint: str = "fine", **inferer) -> list[torch.Tensor]:
    args = build_parser().parse_args([str(case["scan"]), "--ckpt", str(case[checkpoint]), "-o", str(case["out"]),
                                      "--device", "cpu", *options])
    segmenter = load_segmenter(args)
    for key, value in inferer.items():
        setattr(segmenter.inferer, key, value)
    return [channel.float() for channel in segmenter.probabilities(read_scan(case["scan"]))[0]]


def dice(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(2 * (ours & theirs).sum() / (ours.sum() + theirs.sum()))


@pytest.fixture(scope="module")
def reference(case) -> list[torch.Tensor]:
    maps = probabilities(case)
    for name, channel in zip(CLASSES, maps):
        assert float(channel.max() - channel.min()) > 0.05, f"{name}: a flat map would prove nothing"
    return maps


def masks(maps: list[torch.Tensor], reference: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each class's mask at the reference map's median (random weights: a 0.5 threshold may mask all)."""
    return [channel >= theirs.median() for channel, theirs in zip(maps, reference)]


@pytest.mark.parametrize("options, inferer", [(["--sw-batch", "3"], {}), (["--channels-last"], {})])
def test_float32_speed_paths_give_the_reference_probabilities(case, reference, options, inferer):
    for name, ours, theirs in zip(CLASSES, probabilities(case, options, **inferer), reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=PROBABILITY_TOLERANCE, msg=name)


def test_bfloat16_masks_agree_with_the_reference(case, reference):
    ours = probabilities(case, ["--bfloat16"])
    assert max(float((a - b).abs().max()) for a, b in zip(ours, reference)) > 1e-4  # bfloat16 did run
    for name, mask, theirs in zip(CLASSES, masks(ours, reference), masks(reference, reference)):
        assert dice(mask, theirs) >= 0.99, name


def test_bfloat16_on_a_cpu_without_bfloat16_convolutions_runs_float32_after_one_line(case, reference, monkeypatch,
                                                                                    capsys):
    monkeypatch.setattr("clipseg3d.cli.segment.cpu_runs_bfloat16", lambda: False)
    capsys.readouterr()
    maps = probabilities(case, ["--bfloat16"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "bfloat16" in line]
    assert len(lines) == 1 and "AVX-512" in lines[0] and "float32" in lines[0]
    for name, ours, theirs in zip(CLASSES, maps, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)  # the reference path itself


def test_fast_needs_a_coarse_checkpoint_and_keeps_its_overlap(case, capsys):
    def segmenter(*options: str, checkpoint: str = "coarse"):
        return load_segmenter(build_parser().parse_args([str(case["scan"]), "--ckpt", str(case[checkpoint]), "-o",
                                                         str(case["out"]), *options]))

    assert segmenter().inferer.overlap == 0.5  # the checkpoint's
    assert segmenter("--fast").inferer.overlap == 0.5  # another overlap would move the masks (BENCHMARKS.md)
    assert segmenter("--fast", "--overlap", "0.25").inferer.overlap == 0.25
    with pytest.raises(SegmentError, match=r"trained on 1\.5x1\.5x1\.5 mm; --fast needs .* 3 mm or coarser"):
        segmenter("--fast", checkpoint="fine")
    assert main([str(case["scan"]), "--ckpt", str(case["fine"]), "-o", str(case["out"]), "--fast"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(case["fine"]) in lines[0] and not case["out"].exists()


def test_no_speed_option_changes_the_checkpoints_overlap(case):
    """Another overlap moves an unsure model's masks (BENCHMARKS.md): only ``--overlap`` sets it."""
    options = ["--fast", "--channels-last", "--bfloat16", "--compile", "--sw-batch", "2", "--openvino"]
    args = build_parser().parse_args([str(case["scan"]), "--ckpt", str(case["coarse"]), "-o", str(case["out"]),
                                      "--device", "cpu", *options])
    assert load_segmenter(args).inferer.overlap == 0.5  # the checkpoint's


@pytest.mark.slow  # compiles the fused head kernel (tens of seconds on 2 cores)
def test_the_compiled_head_gives_the_reference_probabilities(case, reference):
    for name, ours, theirs in zip(CLASSES, probabilities(case, ["--compile"]), reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=PROBABILITY_TOLERANCE, msg=name)


RUNTIMES = [("--onnx", "onnxruntime"), ("--openvino", "openvino")]


@pytest.mark.parametrize("option, runtime", RUNTIMES)
def test_a_runtime_backbone_gives_the_reference_probabilities(case, reference, option, runtime):
    pytest.importorskip(runtime)
    args = build_parser().parse_args([str(case["scan"]), "--ckpt", str(case["fine"]), "-o", str(case["out"]),
                                      "--device", "cpu", option])
    assert getattr(load_segmenter(args).model.backbone, "runtime", None) == runtime
    for name, ours, theirs in zip(CLASSES, probabilities(case, [option]), reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=PROBABILITY_TOLERANCE, msg=name)


@pytest.mark.parametrize("option, runtime", RUNTIMES)
def test_without_the_runtime_the_backbone_falls_back_to_pytorch_with_one_line(case, reference, monkeypatch, capsys,
                                                                              option, runtime):
    monkeypatch.setitem(sys.modules, runtime, None)  # import <runtime> now raises ImportError
    capsys.readouterr()
    maps = probabilities(case, [option])
    lines = [line for line in capsys.readouterr().err.splitlines() if runtime in line.lower()]
    assert len(lines) == 1 and f"{runtime} is not installed" in lines[0] and "PyTorch" in lines[0]
    for name, ours, theirs in zip(CLASSES, maps, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)  # the reference path itself


@pytest.mark.parametrize("option, runtime, refusing", [
    ("--onnx", "onnxruntime", "InferenceSession"), ("--openvino", "openvino", "Core"),  # loading the model
    ("--onnx", "onnxruntime", "InferenceSession.run"), ("--openvino", "openvino", "InferRequest.infer"),  # running it
    ("--onnx", "onnxruntime", None), ("--openvino", "openvino", None)])  # None: the ONNX export itself
def test_a_backbone_the_runtime_cannot_take_runs_in_pytorch_after_one_line(case, reference, monkeypatch, capsys,
                                                                         option, runtime, refusing):
    module = pytest.importorskip(runtime)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operator")
    owner, name = (torch.onnx, "export") if refusing is None else (module, refusing)
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, name.split(".")[-1], refuse)
    capsys.readouterr()
    maps = probabilities(case, [option])
    lines = [line for line in capsys.readouterr().err.splitlines() if runtime in line.lower()]
    assert len(lines) == 1 and "unsupported operator" in lines[0] and "PyTorch" in lines[0]
    for name, ours, theirs in zip(CLASSES, maps, reference):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_openvino_in_bfloat16_keeps_the_masks(case, reference):
    pytest.importorskip("openvino")
    ours = probabilities(case, ["--openvino", "--bfloat16"])
    for name, mask, theirs in zip(CLASSES, masks(ours, reference), masks(reference, reference)):
        assert dice(mask, theirs) >= 0.99, name


def test_one_runtime_at_a_time(case):
    with pytest.raises(SegmentError, match="choose one"):
        load_segmenter(build_parser().parse_args([str(case["scan"]), "--ckpt", str(case["fine"]), "-o",
                                                  str(case["out"]), "--onnx", "--openvino"]))
