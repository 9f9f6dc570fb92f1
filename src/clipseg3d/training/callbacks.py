"""Lightning callbacks for watching training: slices with true and predicted contours.

:class:`ContourImages` renders, every few validation epochs, a montage of slices through the
first validation volumes: true contours on the left, predicted contours on the right, one
colour per class (the colours of :func:`clipseg3d.inference.overlay.class_colour`), and hands
it to every logger that can log images (``WandbLogger.log_image``).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from clipseg3d.inference.overlay import class_colour

HEADER_PX = 14  # row above the panels with the column titles
LABEL_PX = 40  # column left of the panels with the slice index
GAP_PX = 4
LEGEND_ROW_PX = 14
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)


def pick_slices(masks: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` indices along the last axis, spread evenly over the slices where any mask
    is set (the centres of equal bins of them), or over all slices when every mask is empty."""
    depth = masks.shape[-1]
    occupied = np.flatnonzero(masks.reshape(-1, depth).any(axis=0))
    candidates = occupied if occupied.size else np.arange(depth)
    positions = ((np.arange(count) + 0.5) * len(candidates) / count).astype(int)
    return sorted(set(candidates[positions].tolist()))


def _contour(mask: np.ndarray) -> np.ndarray:
    """The one-pixel inner boundary of a 2-D mask (pixels on the image edge count as boundary)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _axial_view(plane: np.ndarray, scale: int) -> np.ndarray:
    """An [X, Y] plane of a RAS-ordered volume as seen from the feet (patient right on the left,
    anterior up), each voxel a ``scale`` x ``scale`` square."""
    return np.kron(plane.T[::-1, ::-1], np.ones((scale, scale), plane.dtype))


def _panel(grey: np.ndarray, masks: np.ndarray, draw: Sequence[bool], scale: int) -> np.ndarray:
    """An RGB panel: the grey slice [X, Y] (in [0, 1]) with the contour of every drawn class of ``masks`` [K, X, Y]."""
    rgb = np.repeat(np.round(_axial_view(grey, scale) * 255.0).astype(np.uint8)[..., None], 3, axis=-1)
    for k, mask in enumerate(masks):
        if draw[k]:
            rgb[_contour(_axial_view(mask, scale))] = class_colour(k)
    return rgb


def contour_montage(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, class_names: Sequence[str],
                    labelled: Sequence[bool] | None = None, num_slices: int = 3, panel_px: int = 192) -> Image.Image:
    """Slices of a volume with true (left column) and predicted (right column) class contours.

    Args:
        image: the volume [X, Y, Z] (any range; shown min..max as black..white).
        truth, prediction: bool masks [K, X, Y, Z] in ``class_names`` order.
        labelled: which classes the truth labels (unlabelled ones get no true contour).
        num_slices: how many axial slices (rows), spread over the labelled structures.
        panel_px: the largest panel side is at least this big when the volume is smaller
            (integer upscaling, so one voxel is a square of pixels).
    """
    labelled = [True] * len(class_names) if labelled is None else list(labelled)
    if truth.shape != prediction.shape or truth.shape[1:] != image.shape or len(truth) != len(class_names):
        raise ValueError(f"image {image.shape}, truth {truth.shape} and prediction {prediction.shape} do not match "
                         f"{len(class_names)} classes")
    known_truth = truth[np.asarray(labelled, bool)]
    slices = pick_slices(known_truth if known_truth.any() else prediction, num_slices)
    low, high = float(image.min()), float(image.max())
    grey = (image - low) / (high - low) if high > low else np.zeros_like(image)
    scale = max(1, panel_px // max(image.shape[:2]))
    height, width = image.shape[1] * scale, image.shape[0] * scale
    present = [k for k in range(len(class_names))
               if (labelled[k] and truth[k][..., slices].any()) or prediction[k][..., slices].any()]

    panels_bottom = HEADER_PX + len(slices) * (height + GAP_PX)
    montage = Image.new("RGB", (LABEL_PX + 2 * width + GAP_PX, panels_bottom + LEGEND_ROW_PX * len(present)),
                        BACKGROUND)
    pen = ImageDraw.Draw(montage)
    font = ImageFont.load_default()
    for column, title in enumerate(("truth", "prediction")):
        pen.text((LABEL_PX + column * (width + GAP_PX) + 2, 1), title, fill=TEXT, font=font)
    for row, z in enumerate(slices):
        top = HEADER_PX + row * (height + GAP_PX)
        pen.text((2, top + height // 2 - 6), f"z={z}", fill=TEXT, font=font)
        for column, (masks, draw) in enumerate(((truth, labelled), (prediction, [True] * len(class_names)))):
            panel = _panel(grey[..., z], masks[..., z], draw, scale)
            montage.paste(Image.fromarray(panel), (LABEL_PX + column * (width + GAP_PX), top))
    for row, k in enumerate(present):
        top = panels_bottom + row * LEGEND_ROW_PX
        pen.rectangle((2, top + 2, 11, top + 11), fill=class_colour(k))
        pen.text((16, top), class_names[k], fill=TEXT, font=font)
    return montage


class ContourImages(L.Callback):
    """Every ``every_n_epochs`` validation epochs, log contour montages of the first validation volumes.

    The prediction comes from the module's ``predict_step`` (per volume, one probability volume
    per class, thresholded at ``threshold``); the truth from the batch's ``target`` and
    ``labelled`` entries. Images go to
    every logger with a ``log_image`` method (``WandbLogger``); without one the callback warns
    once and does nothing.

    Args:
        every_n_epochs: log after validation epochs ``n - 1``, ``2n - 1``, ...
        num_volumes: how many validation volumes (from the first batches) to draw.
        num_slices: axial slices per volume.
        panel_px: minimum panel size in pixels for small volumes.
        threshold: probability from which a voxel is predicted.
        key: the logged image key.
    """

    def __init__(self, every_n_epochs: int = 1, num_volumes: int = 1, num_slices: int = 3, panel_px: int = 192,
                 threshold: float = 0.5, key: str = "val/contours"):
        if every_n_epochs < 1 or num_volumes < 1 or num_slices < 1:
            raise ValueError("ContourImages: every_n_epochs, num_volumes and num_slices must be at least 1")
        self.every_n_epochs = every_n_epochs
        self.num_volumes = num_volumes
        self.num_slices = num_slices
        self.panel_px = panel_px
        self.threshold = threshold
        self.key = key
        self._drawn = 0
        self._warned = False

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drawn = 0

    def _image_loggers(self, trainer: L.Trainer) -> list:
        loggers = [logger for logger in trainer.loggers if callable(getattr(logger, "log_image", None))]
        if not loggers and not self._warned:
            rank_zero_warn("ContourImages: none of the trainer's loggers can log images (that needs a `log_image` "
                           "method, as WandbLogger has); contour images are not logged")
            self._warned = True
        return loggers

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if (trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs
                or self._drawn >= self.num_volumes):
            return
        loggers = self._image_loggers(trainer)
        if not loggers:
            return
        with torch.no_grad():
            probabilities = pl_module.predict_step(batch, batch_idx)
        count = min(len(probabilities), self.num_volumes - self._drawn)
        images, captions = [], []
        for b in range(count):
            predicted = np.stack([(volume >= self.threshold).cpu().numpy() for volume in probabilities[b]])
            images.append(contour_montage(
                batch["image"][b, 0].float().cpu().numpy(), batch["target"][b].bool().cpu().numpy(), predicted,
                pl_module.class_names, batch["labelled"][b].bool().tolist() if "labelled" in batch else None,
                self.num_slices, self.panel_px))
            captions.append(f"epoch {trainer.current_epoch}, volume {self._drawn + b}: truth left, prediction right")
        self._drawn += count
        for logger in loggers:
            logger.log_image(key=self.key, images=images, step=trainer.global_step, caption=captions)
