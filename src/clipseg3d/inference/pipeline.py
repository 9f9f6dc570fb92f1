"""Segmenting one scan end to end: preprocessing, sliding window, masks, post-processing, outputs.

``labels.nii.gz`` gives each voxel its most specific class; ``masks/<class>.nii.gz`` holds the
full mask of every class that shares voxels (tumours, their parents, any class partly hidden in
the label map), or of all with ``all_masks``. ``probabilities/<class>.nii.gz`` (optional) holds
uint8 0..255 with the NIfTI scale slope 1/255, so readers that apply the scaling (nibabel's
``get_fdata``) see 0..1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.preprocess import DEFAULT_HU_WINDOW, ModelGrid, Preprocessing
from clipseg3d.data.scans import Scan
from clipseg3d.files import write_text_atomic
from clipseg3d.inference.masks import hidden_classes, nested_classes, scan_masks
from clipseg3d.inference.outputs import (
    write_dicom_seg,
    write_nifti_atomic,
    write_probability_nifti,
)
from clipseg3d.inference.overlay import save_overlay_png
from clipseg3d.inference.postprocess import (
    PostprocessConfig,
    body_midline_x,
    merge_label_map,
    postprocess,
)
from clipseg3d.inference.report import build_report, write_report_atomic
from clipseg3d.inference.sliding_window import StreamingInferer, class_predictor
from clipseg3d.inference.threads import each_in_threads
from clipseg3d.models.model import UniversalModel

# -- settings ---------------------------------------------------------------------------------
DEFAULT_ROI_SIZE = (96, 96, 96)
DEFAULT_OVERLAP = 0.5


@dataclass(frozen=True)
class CheckpointSettings:
    """What a checkpoint records about its input: the preprocessing and the sliding window."""

    preprocessing: Preprocessing
    roi_size: tuple[int, int, int] = DEFAULT_ROI_SIZE
    overlap: float = DEFAULT_OVERLAP

    @classmethod
    def from_dict(cls, recorded: dict[str, Any] | None) -> "CheckpointSettings":
        """From a checkpoint's ``preprocessing`` record (``roi_size`` and ``sw_overlap`` beside
        :meth:`Preprocessing.to_dict`'s keys); missing entries take the defaults."""
        recorded = recorded or {}
        return cls(Preprocessing.from_dict(recorded), tuple(recorded.get("roi_size") or DEFAULT_ROI_SIZE),
                   float(recorded.get("sw_overlap", DEFAULT_OVERLAP)))


@dataclass
class OutputSettings:
    """What to write for each scan (post-processing thresholds live in ``postprocess``)."""

    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    all_masks: bool = False
    probabilities: bool = False
    dicom_seg: bool = False
    overlay: bool = True
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW


# -- from model-grid probabilities to results on the scan grid ---------------------------------
def model_grid_probabilities(model: UniversalModel, image: torch.Tensor, class_names: Sequence[str],
                             inferer: StreamingInferer) -> list[torch.Tensor]:
    """Float16 probabilities of ``class_names`` for a network input ``[1, *S]`` (on the model's device)."""
    indices = [model.class_names.index(name) for name in class_names]
    with torch.inference_mode():
        return [channel.sigmoid_() for channel in inferer(image[None], class_predictor(model, indices))]


def scan_results(scan: Scan, grid: ModelGrid, probabilities: list[torch.Tensor], class_names: Sequence[str],
                 catalog: ClassCatalog, config: PostprocessConfig,
                 save_probability: Callable[[str, torch.Tensor], None] | None = None,
                 ) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
    """Post-processed masks on the scan grid and the tumours' uint8 probabilities (see
    :func:`~clipseg3d.inference.masks.scan_masks`, which consumes ``probabilities``)."""
    masks, tumour_probabilities = scan_masks(grid, probabilities, class_names, catalog, config, save_probability)
    try:
        midline = body_midline_x(scan.array, scan.affine)
    except ValueError:
        midline = None
    masks = postprocess(masks, catalog, class_names, scan.spacing, scan.affine, config, midline, in_place=True)
    return masks, tumour_probabilities


def write_scan_outputs(folder: Path, scan: Scan, grid: ModelGrid, probabilities: list[torch.Tensor],
                       class_names: Sequence[str], catalog: ClassCatalog, settings: OutputSettings,
                       provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every output of one scan into ``folder``; returns the report.

    ``probabilities`` are the model-grid class probabilities in ``class_names`` order; the list
    is consumed (its items are replaced by ``None`` as each class is moved to the scan grid).
    """
    folder.mkdir(parents=True, exist_ok=True)

    def save(name: str, probability: torch.Tensor) -> None:
        write_probability_nifti(probability, scan.affine, folder / "probabilities" / f"{name}.nii.gz")

    masks, tumour_probabilities = scan_results(scan, grid, probabilities, class_names, catalog, settings.postprocess,
                                               save if settings.probabilities else None)
    label_map, table = merge_label_map(masks, class_names, catalog)
    write_nifti_atomic(label_map, scan.affine, folder / "labels.nii.gz", dtype=label_map.dtype, header=scan.header)
    table_text = json.dumps({str(label): name for label, name in table.items()}, indent=2) + "\n"
    write_text_atomic(folder / "classes.json", table_text)
    if settings.all_masks:
        mask_names = list(class_names)
    else:
        with_masks = set(nested_classes(class_names, catalog)) | set(hidden_classes(masks, label_map, class_names))
        mask_names = [name for name in class_names if name in with_masks]

    def write_mask(name: str) -> Path:
        return write_nifti_atomic(masks[name], scan.affine, folder / "masks" / f"{name}.nii.gz", dtype=np.uint8,
                                  header=scan.header)

    list(each_in_threads(write_mask, mask_names))  # zlib releases the GIL: the files compress side by side
    # Only tumour entries are read by build_report (lesion peak probabilities), so the others stay None.
    report = build_report(masks, class_names, catalog, scan.affine, scan.spacing, probs=tumour_probabilities)
    report.update(provenance or {})
    write_report_atomic(report, folder / "report.json")
    if settings.overlay:
        save_overlay_png(scan.array, masks, class_names, scan.affine, folder / "overlay.png",
                         window=settings.hu_window, catalog=catalog)
    if settings.dicom_seg and scan.kind == "dicom":
        write_dicom_seg(masks, scan, folder / "seg.dcm", kinds={name: catalog[name].kind for name in class_names})
    return report


@dataclass
class Segmenter:
    """A loaded checkpoint with the settings of one ``segment`` run."""

    model: UniversalModel
    checkpoint: Path
    class_names: list[str]
    preprocessing: Preprocessing
    inferer: StreamingInferer
    settings: OutputSettings
    checkpoint_sha256: str = ""

    @property
    def catalog(self) -> ClassCatalog:
        return self.model.catalog

    def record(self, input_path: Path) -> dict[str, Any]:
        """What the outputs of ``input_path`` are made from: the input, the checkpoint's sha256, the
        classes and every setting that changes them (a rerun with an equal record has nothing to redo)."""
        spacing, settings = self.preprocessing.spacing, self.settings
        return {"input": str(input_path), "checkpoint_sha256": self.checkpoint_sha256,
                "class_names": list(self.class_names),
                "settings": {"spacing_mm": list(spacing) if spacing is not None else None,
                             "hu_window": list(self.preprocessing.hu_window),
                             "roi_size": list(self.inferer.roi_size), "overlap": self.inferer.overlap,
                             "tta": self.inferer.tta, "threshold": settings.postprocess.default_threshold,
                             **({"bfloat16": True} if self.inferer.bfloat16 else {}),  # changes the masks
                             "outputs": {"all_masks": settings.all_masks, "probabilities": settings.probabilities,
                                         "dicom_seg": settings.dicom_seg, "overlay": settings.overlay}}}

    def provenance(self, scan: Scan) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), **self.record(scan.path)}

    def probabilities(self, scan: Scan) -> tuple[list[torch.Tensor], ModelGrid]:
        """The class probabilities of ``scan`` on the model grid (float16, on the model's device)."""
        image, grid = self.preprocessing(scan)
        device = next(self.model.parameters()).device
        return model_grid_probabilities(self.model, image.to(device), self.class_names, self.inferer), grid

    def segment(self, scan: Scan, folder: Path) -> dict[str, Any]:
        """Predict ``scan`` and write its outputs into ``folder``; returns the report."""
        probabilities, grid = self.probabilities(scan)
        return write_scan_outputs(folder, scan, grid, probabilities, self.class_names, self.catalog, self.settings,
                                  self.provenance(scan))
