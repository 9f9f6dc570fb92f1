"""Timings: dynamic head vs backbone, sliding windows vs MONAI's, a training step vs the bare backbone.

Run as a script (``python speed.py --window streaming|monai --budget quick|full``) it measures one
sliding-window method in its own process and prints ``{"seconds": ..., "peak_rss_gb": ...}``, so
each method's peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import head_rows, peak_rss_gb  # noqa: E402

from claims.config import FULL, OVERLAP, QUICK, TEXT_DIM, Budget  # noqa: E402
from claims.models import PlainConvNet, make_backbone  # noqa: E402

HEAD_CLASSES = (32, 128, 512)
WINDOW_METHODS = ("streaming", "monai")


def head_vs_backbone(budget: Budget) -> list[dict]:
    """Forward time of the dynamic head at 32, 128 and 512 classes over that of the backbone,
    behind the U-Net (16..256) and Swin UNETR, on one cubic window."""
    torch.manual_seed(0)
    return head_rows(budget.head_window, HEAD_CLASSES, repeats=budget.timing_repeats, swin_feature=budget.swin_feature,
                     text_dim=TEXT_DIM)


def window_run(method: str, budget: Budget) -> dict:
    """One sliding-window pass of a plain conv-head network over a random scan, in this process."""
    from monai.inferers import sliding_window_inference

    from clipseg3d.inference.sliding_window import StreamingInferer

    torch.manual_seed(0)
    network = PlainConvNet(make_backbone(budget), budget.window_classes).eval()
    image = torch.rand(1, 1, *budget.window_scan)
    before = peak_rss_gb()
    started = time.perf_counter()
    with torch.no_grad():
        if method == "streaming":
            output = StreamingInferer(budget.crop, overlap=OVERLAP, mode="gaussian")(image, network)
        else:
            output = sliding_window_inference(image, budget.crop, 1, network, overlap=OVERLAP, mode="gaussian")
    seconds = time.perf_counter() - started
    del output
    return {"seconds": seconds, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": before}


def window_methods(quick: bool, scan: Sequence[int]) -> dict[str, dict]:
    """:func:`window_run` of each method on a ``scan``-sized volume, each in a fresh process (a failed
    one reports its error)."""
    results = {}
    for method in WINDOW_METHODS:
        done = subprocess.run([sys.executable, __file__, "--window", method, "--budget", "quick" if quick else "full",
                               "--scan", *map(str, scan)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode == 0:
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            results[method] = {"error": f"exit status {done.returncode}: {reason}"}
    return results


def step_vs_backbone(task, data, repeats: int) -> dict[str, float]:
    """Median seconds of a full training step of ``task`` (loss, backward, clipping, AdamW) and of a
    bare backbone forward + backward on the same batch, and of drawing a batch from the loader,
    taken in turn so that load on the machine weighs on all three alike."""
    iterator = iter(data.train_dataloader())
    batch = next(iterator)
    optimizer = torch.optim.AdamW(task.trainable_parameters(), lr=0.0)
    task.train()
    times: dict[str, list[float]] = {"step_s": [], "backbone_s": [], "loader_s": []}
    for _ in range(repeats):
        started = time.perf_counter()
        next(iterator)
        times["loader_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        task.partial_label_loss(*task.model.backbone(batch["image"]), batch["target"], batch["labelled"]).backward()
        torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times["step_s"].append(time.perf_counter() - started)
        started = time.perf_counter()
        decoder_map, _ = task.model.backbone(batch["image"])
        decoder_map.mean().backward()
        times["backbone_s"].append(time.perf_counter() - started)
        optimizer.zero_grad()
    return {key: statistics.median(values) for key, values in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one sliding-window measurement in its own process")
    parser.add_argument("--window", choices=WINDOW_METHODS, required=True)
    parser.add_argument("--budget", choices=("quick", "full"), default="full")
    parser.add_argument("--scan", type=int, nargs=3, help="volume size (default: the budget's)")
    args = parser.parse_args()
    budget = QUICK if args.budget == "quick" else FULL
    if args.scan:
        budget = dataclasses.replace(budget, window_scan=tuple(args.scan))
    print(json.dumps(window_run(args.window, budget)))
