"""A Lightning prediction writer that writes ``clipseg3d segment``'s outputs for ``clipseg3d predict``.

Contract with the predict dataloader: each batch is a dict with ``"image"`` (the network input
made by :func:`clipseg3d.data.preprocess.preprocess` with the same spacing and HU window) and
``"image_path"`` (the scan's file or DICOM folder, one per item). The task's ``predict_step``
returns class probabilities ``[B, K, *S]`` on that input's grid. For each item the writer reads
the scan again (for its grid, header and DICOM slices) and writes ``output_dir/<scan name>/``
exactly as ``clipseg3d segment`` does, atomically, skipping finished scans unless ``overwrite``.

Use it with ``trainer.predict(..., return_predictions=False)`` so that Lightning does not keep
every batch's K-channel probabilities in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from clipseg3d.data.preprocess import DEFAULT_HU_WINDOW, preprocess
from clipseg3d.data.scans import read_scan, scan_stem
from clipseg3d.inference.outputs import partial_folder, publish_folder
from clipseg3d.inference.pipeline import OutputSettings, write_scan_outputs
from clipseg3d.inference.postprocess import PostprocessConfig


class SegmentationWriter(BasePredictionWriter):
    """Writes labels, masks, report and overlay per scan of each predicted batch.

    Args:
        output_dir: folder that receives one subfolder per scan.
        threshold: probability threshold per class.
        all_masks, probabilities, overlay: as ``clipseg3d segment``'s ``--all-masks``,
            ``--probabilities`` and (not) ``--no-overlay``.
        overwrite: redo scans whose output folder exists.
        spacing, hu_window: the preprocessing of the ``"image"`` inputs; default: the datamodule's
            ``preprocessing`` (as :class:`~clipseg3d.data.datamodule.CTDataModule` records it), else
            the scan's own spacing and the default window.
    """

    def __init__(self, output_dir: str, threshold: float = 0.5, all_masks: bool = False,
                 probabilities: bool = False, overlay: bool = True, overwrite: bool = False,
                 spacing: Sequence[float] | None = None, hu_window: Sequence[float] | None = None):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.all_masks = all_masks
        self.probabilities = probabilities
        self.overlay = overlay
        self.overwrite = overwrite
        self.spacing = spacing
        self.hu_window = hu_window

    def _preprocessing(self, trainer: L.Trainer) -> tuple[Sequence[float] | None, tuple[float, float]]:
        recorded = getattr(trainer.datamodule, "preprocessing", {}) if trainer.datamodule is not None else {}
        spacing = self.spacing if self.spacing is not None else recorded.get("spacing")
        hu_window = self.hu_window if self.hu_window is not None else recorded.get("hu_window", DEFAULT_HU_WINDOW)
        return spacing, tuple(float(value) for value in hu_window)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: torch.Tensor,
                           batch_indices: Sequence[int] | None, batch: dict[str, Any], batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        spacing, hu_window = self._preprocessing(trainer)
        settings = OutputSettings(postprocess=PostprocessConfig(default_threshold=self.threshold),
                                  all_masks=self.all_masks, probabilities=self.probabilities,
                                  overlay=self.overlay, hu_window=hu_window)
        class_names = pl_module.model.class_names
        for item, path in enumerate(batch["image_path"]):
            final = self.output_dir / scan_stem(Path(path))
            if final.exists() and not self.overwrite:
                continue
            scan = read_scan(path)
            _, grid = preprocess(scan, spacing, hu_window)
            probabilities = list(prediction[item].detach().cpu().unbind(0))
            if tuple(probabilities[0].shape) != grid.shape:
                raise ValueError(f"{path}: prediction of shape {tuple(probabilities[0].shape)} is not on the scan's "
                                 f"model grid {grid.shape}; preprocess the predict inputs with "
                                 "clipseg3d.data.preprocess.preprocess and the same spacing")
            provenance = {"input": str(path), "checkpoint": str(trainer.ckpt_path or ""),
                          "class_names": list(class_names)}
            partial = partial_folder(self.output_dir, final.name)
            try:
                write_scan_outputs(partial, scan, grid, probabilities, class_names, pl_module.model.catalog,
                                   settings, provenance)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            publish_folder(partial, final)
