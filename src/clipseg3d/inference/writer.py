"""A Lightning prediction writer that writes ``clipseg3d segment``'s outputs for ``clipseg3d predict``.

Contract with the predict dataloader (:class:`~clipseg3d.data.datamodule.ScanDataset` with
:func:`~clipseg3d.data.datamodule.collate_scans`): each batch is a dict with ``"image"`` (the
network inputs), ``"grid"`` (one :class:`~clipseg3d.data.preprocess.ModelGrid` per item) and
``"image_path"`` (the scan's file or DICOM folder, one per item). The task's ``predict_step``
returns, per item, a list of K float16 probability volumes on that item's model grid. For each
item the writer reads the scan again (for its header, HU values and DICOM slices; it is not
preprocessed again) and writes ``output_dir/<scan name>/`` exactly as ``clipseg3d segment`` does,
atomically, skipping finished scans unless ``overwrite``.

Use it with ``trainer.predict(..., return_predictions=False)`` so that Lightning does not keep
every batch's probabilities in memory.

Under DDP every process runs the writer on the scans its sampler gives it; the predict
dataloader's sampler (:func:`~clipseg3d.data.distributed.unrepeated_sampler`) gives each scan to
exactly one process, so each scan's folder is written once, by one process.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from clipseg3d.data.preprocess import DEFAULT_HU_WINDOW, ModelGrid
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
    """

    def __init__(self, output_dir: str, threshold: float = 0.5, all_masks: bool = False,
                 probabilities: bool = False, overlay: bool = True, overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.all_masks = all_masks
        self.probabilities = probabilities
        self.overlay = overlay
        self.overwrite = overwrite

    def settings(self, trainer: L.Trainer) -> OutputSettings:
        """The output settings; the overlay shows the datamodule's HU window (as ``segment`` shows the checkpoint's)."""
        datamodule = trainer.datamodule
        hu_window = datamodule.preprocessing.hu_window if datamodule is not None else DEFAULT_HU_WINDOW
        return OutputSettings(postprocess=PostprocessConfig(default_threshold=self.threshold),
                              all_masks=self.all_masks, probabilities=self.probabilities, overlay=self.overlay,
                              hu_window=hu_window)

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           prediction: list[list[torch.Tensor]], batch_indices: Sequence[int] | None,
                           batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        settings = self.settings(trainer)
        class_names = pl_module.model.class_names
        for path, grid, probabilities in zip(batch["image_path"], batch["grid"], prediction, strict=True):
            final = self.output_dir / scan_stem(Path(path))
            if final.exists() and not self.overwrite:
                continue
            self.write_scan(Path(path), grid, list(probabilities), class_names, pl_module, trainer, final, settings)

    def write_scan(self, path: Path, grid: ModelGrid, probabilities: list[torch.Tensor], class_names: list[str],
                   pl_module: L.LightningModule, trainer: L.Trainer, final: Path, settings: OutputSettings) -> None:
        """One scan's outputs, written into a partial folder and published when complete."""
        if len(probabilities) != len(class_names) or any(tuple(p.shape) != grid.shape for p in probabilities):
            raise ValueError(f"{path}: expected {len(class_names)} probability volumes on the model grid "
                             f"{grid.shape}, got {[tuple(p.shape) for p in probabilities]}")
        scan = read_scan(path)
        provenance = {"input": str(path), "checkpoint": str(trainer.ckpt_path or ""), "class_names": list(class_names)}
        partial = partial_folder(self.output_dir, final.name)
        try:
            write_scan_outputs(partial, scan, grid, probabilities, class_names, pl_module.model.catalog,
                               settings, provenance)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        publish_folder(partial, final)
