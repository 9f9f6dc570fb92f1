"""``clipseg3d segment``: segment CT scans with a trained checkpoint and write the results.

Per scan: read (NIfTI or DICOM series) -> RAS orientation and the checkpoint's voxel spacing
(MONAI ``Orientation`` + ``Spacing`` on a ``MetaTensor``) -> HU window to [0, 1] -> sliding
window (gaussian blending) -> sigmoid probabilities -> back onto the scan's own grid ->
post-processing -> outputs in ``OUT/<scan name>/``.

Memory. The model grid's class probabilities never exist as one float32 K-channel volume:

* :func:`sliding_window_logits` runs the backbone once per window and adds each class's
  window logits, weighted by the gaussian importance map *divided by the total weight that
  voxel receives from all windows* (a single-channel float32 map computed up front), into
  one float16 accumulator per class. Each accumulator therefore already holds the blended
  logit (no final division, so float16 never overflows) and equals MONAI's
  ``SlidingWindowInferer`` to float16 precision. MONAI's inferer keeps a float32 K-channel
  output volume; this keeps 2 bytes per voxel and class.
* The accumulators are turned into probabilities and resampled to the scan grid one class at
  a time (:meth:`ModelGrid.to_scan`), thresholded to a bool mask at once and freed. Only
  tumour classes keep a probability volume on the scan grid, as uint8 0..255 (for the lesions'
  peak probability in the report).

So memory grows with the class count through float16 model-grid probabilities and bool
scan-grid masks only (post-processing replaces each mask in place, so it adds about one volume).

The way back to the scan grid is a separable linear interpolation at the scan's voxel
centres: the model grid is the scan grid permuted, flipped and rescaled per axis, so each axis
is resampled on its own. It equals MONAI's ``Spacing``/``Orientation`` inverse (bilinear,
border padding) to float precision and takes about 0.5-1.5 s per class for 512 x 512 x 300
voxels on one core, where that MONAI inverse takes about 6 s per class; MONAI's inverse of
all K channels at once is faster per class but builds a float64 K-channel volume on the scan
grid (20 GB for 32 classes at that size).

Classes of the same depth in the parent relation (organs and other structures: depth 0,
tumours: 1) are made mutually exclusive before post-processing: a voxel above threshold for
several goes to the most probable (a running argmax per depth while the classes come in). A
tumour and its parent organ keep sharing voxels. ``labels.nii.gz`` gives each voxel its most
specific class; ``masks/<class>.nii.gz`` holds the full mask of every class that shares voxels
(tumours, their parents, any class partly hidden in the label map), or of all with
``--all-masks``.

``--tta`` averages the window logits over flips of the anterior-posterior and
superior-inferior axes (4 passes). The left-right axis is not flipped: classes come in
left/right pairs, and a mirrored body would swap them.

``--probabilities`` writes ``probabilities/<class>.nii.gz`` as uint8 0..255 with the NIfTI
scale slope 1/255, so readers that apply the scaling (nibabel's ``get_fdata``) see 0..1.
Every output is written into ``OUT/.<name>.partial`` and the folder is renamed to
``OUT/<name>`` when complete, so a scan's folder exists complete or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing
from tqdm import tqdm

from clipseg3d.catalog import CatalogError, ClassCatalog
from clipseg3d.inference.io import (
    Scan,
    ScanError,
    find_scans,
    read_scan,
    replace_atomically,
    scan_stem,
    write_dicom_seg,
    write_nifti_atomic,
)
from clipseg3d.inference.overlay import save_overlay_png
from clipseg3d.inference.postprocess import PostprocessConfig, body_midline_x, merge_label_map, postprocess
from clipseg3d.inference.report import build_report, write_report_atomic
from clipseg3d.model import CheckpointError, UniversalModel, load_model

DEFAULT_HU_WINDOW = (-175.0, 250.0)
# Window logits are clamped to this magnitude so float16 sums stay finite (sigmoid saturates long before).
LOGIT_LIMIT = 1.0e4
PARTIAL_SUFFIX = ".partial"

Predictor = Callable[[torch.Tensor], torch.Tensor]


class SegmentError(ValueError):
    """A command line that cannot be carried out (bad options, output folder, checkpoint)."""


# -- the model's view of a scan ---------------------------------------------------------------
@dataclass
class ModelGrid:
    """The grid the network sees (RAS, model spacing) and the scan grid it came from."""

    affine: np.ndarray
    shape: tuple[int, int, int]
    scan_affine: np.ndarray
    scan_shape: tuple[int, int, int]

    def axis_mapping(self) -> list[tuple[int, float, float]]:
        """Per model axis: (scan axis, scale, offset) with model index = scale * scan index + offset."""
        mapping = np.linalg.inv(self.affine) @ self.scan_affine
        linear = mapping[:3, :3]
        axes = []
        for model_axis in range(3):
            row = np.abs(linear[model_axis])
            scan_axis = int(np.argmax(row))
            if np.count_nonzero(row > 1e-6 * row.max()) != 1:
                raise ValueError(f"model grid is not axis-aligned with the scan grid (voxel mapping {linear.round(4)})")
            axes.append((scan_axis, float(linear[model_axis, scan_axis]), float(mapping[model_axis, 3])))
        if sorted(axis for axis, _, _ in axes) != [0, 1, 2]:
            raise ValueError(f"model grid axes do not map one-to-one onto scan axes ({linear.round(4)})")
        return axes

    def to_scan(self, volume: torch.Tensor) -> torch.Tensor:
        """A model-grid volume ``[*shape]`` linearly interpolated at the scan's voxel centres (float32).

        Points beyond the model grid take the nearest edge value (MONAI's border padding).
        """
        if tuple(volume.shape) != tuple(self.shape):
            raise ValueError(f"volume of shape {tuple(volume.shape)} is not on the model grid {self.shape}")
        result = volume.float()
        scan_axes = []
        for model_axis, (scan_axis, scale, offset) in enumerate(self.axis_mapping()):
            positions = scale * torch.arange(self.scan_shape[scan_axis], dtype=torch.float64) + offset
            result = _interpolate_axis(result, model_axis, positions)
            scan_axes.append(scan_axis)
        return result.permute([scan_axes.index(axis) for axis in range(3)]).contiguous()


def _interpolate_axis(volume: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of ``volume`` along ``dim`` at fractional ``positions`` (clamped to the edges)."""
    size = volume.shape[dim]
    if len(positions) == size and torch.equal(positions, torch.arange(size, dtype=positions.dtype)):
        return volume
    positions = positions.clamp(0, size - 1)
    low = positions.floor().long().clamp(max=max(size - 2, 0))
    high = (low + 1).clamp(max=size - 1)
    shape = [1] * volume.ndim
    shape[dim] = -1
    weight = (positions - low).to(volume.dtype).reshape(shape)
    result = volume.index_select(dim, low)
    return result.lerp_(volume.index_select(dim, high), weight)


def preprocess(scan: Scan, spacing: Sequence[float] | None = None,
               hu_window: Sequence[float] = DEFAULT_HU_WINDOW) -> tuple[torch.Tensor, ModelGrid]:
    """The network input ``[1, *S]`` (RAS, ``spacing`` mm or native, HU window -> [0, 1]) and its grid."""
    spatial = [Orientation(axcodes="RAS", labels=None)]
    if spacing is not None:
        spatial.append(Spacing(pixdim=tuple(float(size) for size in spacing), mode="bilinear",
                               padding_mode="border", dtype=np.float32))
    image = MetaTensor(torch.from_numpy(scan.array)[None], affine=torch.as_tensor(scan.affine, dtype=torch.float64))
    image = Compose(spatial)(image)
    low, high = (float(value) for value in hu_window)
    image = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True, dtype=torch.float32)(image)
    grid = ModelGrid(affine=image.affine.numpy().astype(np.float64), shape=tuple(image.shape[1:]),
                     scan_affine=np.asarray(scan.affine, dtype=np.float64), scan_shape=scan.shape)
    return image.as_tensor().contiguous(), grid


# -- sliding window with float16 streaming aggregation ------------------------------------------
def class_predictor(model: UniversalModel, class_indices: Sequence[int]) -> Predictor:
    """Windows ``[N, 1, *roi]`` -> logits ``[N, k, *roi]`` for the chosen rows of the embedding table."""
    features = model.text_features()[list(class_indices)]

    def predict(windows: torch.Tensor) -> torch.Tensor:
        decoder_map, global_feature = model.backbone(windows)
        return model.head(decoder_map, global_feature, features)

    return predict


def flip_averaged(predictor: Predictor, flip_dims: Sequence[int]) -> Predictor:
    """``predictor`` averaged over every combination of flips along ``flip_dims`` (tensor dims)."""
    combos = [list(combo) for count in range(len(flip_dims) + 1) for combo in combinations(flip_dims, count)]

    def predict(windows: torch.Tensor) -> torch.Tensor:
        total = predictor(windows)
        for dims in combos[1:]:
            total += predictor(windows.flip(dims)).flip(dims)
        return total / len(combos)

    return predict


def sliding_window_logits(image: torch.Tensor, predictor: Predictor, num_classes: int, roi_size: Sequence[int],
                          overlap: float = 0.5, sw_batch_size: int = 1, mode: str = "gaussian",
                          sigma_scale: float = 0.125, device: str | torch.device = "cpu",
                          progress: bool = False) -> list[torch.Tensor]:
    """Blended window logits of ``image [1, 1, *S]`` as ``num_classes`` float16 volumes ``[*S]``.

    Same windows, padding and blending as MONAI's ``SlidingWindowInferer`` (constant zero
    padding of sides smaller than the window, interval ``int(roi * (1 - overlap))``), but the
    result is accumulated per class in float16: see the module docstring.
    """
    if image.ndim != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected one single-channel 3D image [1, 1, X, Y, Z], got {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = tuple(int(size) for size in roi_size)
    spatial = tuple(image.shape[2:])
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, spatial)]
    if any(sum(pad) for pad in pads):
        image = F.pad(image, [value for pad in reversed(pads) for value in pad])
    padded = tuple(image.shape[2:])
    interval = [r if r == s else max(int(r * (1.0 - overlap)), 1) for r, s in zip(roi, padded)]
    windows = dense_patch_slices(padded, roi, interval)
    importance = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, dtype=torch.float32)
    total_weight = torch.zeros(padded)
    for window in windows:
        total_weight[window] += importance
    accumulators = [torch.zeros(padded, dtype=torch.float16) for _ in range(num_classes)]
    starts = range(0, len(windows), sw_batch_size)
    for start in tqdm(starts, desc="windows", unit="batch", leave=False) if progress else starts:
        batch = windows[start:start + sw_batch_size]
        inputs = torch.cat([image[(slice(None), slice(None), *window)] for window in batch]).to(device)
        logits = predictor(inputs).float().cpu()
        if logits.shape[1] != num_classes:
            raise ValueError(f"predictor gave {logits.shape[1]} channels, expected {num_classes}")
        for window, window_logits in zip(batch, logits):
            window_logits.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT).mul_(importance / total_weight[window])
            for accumulator, class_logits in zip(accumulators, window_logits):
                accumulator[window] += class_logits
    if padded != spatial:
        crop = tuple(slice(low, low + size) for (low, _), size in zip(pads, spatial))
        accumulators = [accumulator[crop].clone() for accumulator in accumulators]
    return accumulators


def predict_probabilities(model: UniversalModel, image: torch.Tensor, class_indices: Sequence[int],
                          roi_size: Sequence[int], overlap: float, sw_batch_size: int = 1, tta: bool = False,
                          device: str | torch.device = "cpu", progress: bool = False) -> list[torch.Tensor]:
    """Per-class float16 probabilities on the model grid for a preprocessed image ``[1, *S]``."""
    with torch.inference_mode():
        predictor = class_predictor(model, class_indices)
        if tta:
            predictor = flip_averaged(predictor, (3, 4))  # A-P and S-I; never left-right (see module docstring)
        logits = sliding_window_logits(image[None], predictor, len(class_indices), roi_size, overlap,
                                       sw_batch_size, device=device, progress=progress)
        return [channel.sigmoid_() for channel in logits]


# -- per-scan outputs ---------------------------------------------------------------------------
@dataclass
class OutputSettings:
    """What to write for each scan (post-processing thresholds live in ``postprocess``)."""

    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    all_masks: bool = False
    probabilities: bool = False
    dicom_seg: bool = False
    overlay: bool = True
    hu_window: tuple[float, float] = DEFAULT_HU_WINDOW


def depth(name: str, catalog: ClassCatalog) -> int:
    """0 for a class without parents, else one more than its deepest parent in ``catalog`` (tumours: 1)."""
    parents = [parent for parent in catalog[name].parents if parent in catalog]
    return 1 + max((depth(parent, catalog) for parent in parents), default=0) if catalog[name].parents else 0


def nested_classes(class_names: Sequence[str], catalog: ClassCatalog) -> list[str]:
    """Classes meant to share voxels: classes with a parent among ``class_names``, and those parents."""
    present = set(class_names)
    chosen: set[str] = set()
    for name in class_names:
        parents = {catalog[parent].name for parent in catalog[name].parents if parent in catalog} & present
        if parents:
            chosen |= parents | {name}
    return [name for name in class_names if name in chosen]


def hidden_classes(masks: dict[str, np.ndarray], label_map: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Classes with voxels that the label map gives to another class."""
    return [name for label, name in enumerate(class_names, start=1)
            if np.any(masks[name] & (label_map != label))]


class DepthArgmax:
    """Makes classes of the same depth mutually exclusive: a voxel claimed by several goes to the
    most probable one. Classes are fed one at a time; memory is 3 bytes per voxel and depth."""

    def __init__(self, shape: tuple[int, ...], num_classes: int):
        self.shape = shape
        self.owner_dtype = np.uint8 if num_classes < 255 else np.uint16
        self.levels: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def add(self, label: int, level: int, probability: torch.Tensor, mask: np.ndarray) -> None:
        if level not in self.levels:
            self.levels[level] = (torch.zeros(self.shape, dtype=torch.float16), np.zeros(self.shape, self.owner_dtype))
        best, owner = self.levels[level]
        wins = torch.from_numpy(mask) & (probability > best)
        best[wins] = probability[wins].half()
        owner[wins.numpy()] = label

    def keep(self, label: int, level: int, mask: np.ndarray) -> np.ndarray:
        """``mask`` restricted to the voxels where ``label`` won its depth."""
        return mask & (self.levels[level][1] == label)


def as_uint8(probability: torch.Tensor) -> np.ndarray:
    """Probabilities (0..1) as uint8 0..255: a quarter of float32, and finer than the reports need."""
    return torch.round(probability.float().clamp(0, 1) * 255).to(torch.uint8).numpy()


def write_probability_nifti(probability: torch.Tensor, affine: np.ndarray, path: Path) -> Path:
    """``probability`` (0..1) as uint8 0..255 with scale slope 1/255, written atomically."""
    data = as_uint8(probability)
    image = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return replace_atomically(path, lambda temp: nib.save(image, temp))


def scan_masks(grid: ModelGrid, probabilities: list[torch.Tensor], class_names: Sequence[str],
               catalog: ClassCatalog, config: PostprocessConfig,
               save_probability: Callable[[str, torch.Tensor], None] | None = None,
               ) -> tuple[dict[str, np.ndarray], list[np.ndarray | None]]:
    """Thresholded masks on the scan grid, same-depth classes made exclusive (see module docstring).

    Returns the masks and, per class, the uint8 (0..255) scan-grid probabilities of tumour classes
    (``None`` for the others). ``probabilities`` (model grid) is consumed one class at a time;
    ``save_probability(name, probability)`` sees each class's scan-grid probabilities.
    """
    levels = {name: depth(name, catalog) for name in class_names}
    exclusive = DepthArgmax(grid.scan_shape, len(class_names))
    masks: dict[str, np.ndarray] = {}
    tumour_probabilities: list[np.ndarray | None] = []
    for index, name in enumerate(class_names):
        on_scan = grid.to_scan(probabilities[index])
        probabilities[index] = None
        masks[name] = (on_scan >= config.thresholds.get(name, config.default_threshold)).numpy()
        exclusive.add(index + 1, levels[name], on_scan, masks[name])
        if save_probability is not None:
            save_probability(name, on_scan)
        tumour_probabilities.append(as_uint8(on_scan) if catalog[name].kind == "tumour" else None)
        del on_scan
    for index, name in enumerate(class_names):
        masks[name] = exclusive.keep(index + 1, levels[name], masks[name])
    return masks, tumour_probabilities


def write_scan_outputs(folder: Path, scan: Scan, grid: ModelGrid, probabilities: list[torch.Tensor],
                       class_names: Sequence[str], catalog: ClassCatalog, settings: OutputSettings,
                       provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every output of one scan into ``folder``; returns the report.

    ``probabilities`` are the model-grid class probabilities in ``class_names`` order; the list
    is consumed (its items are replaced by ``None`` as each class is moved to the scan grid).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = settings.postprocess

    def save(name: str, probability: torch.Tensor) -> None:
        write_probability_nifti(probability, scan.affine, folder / "probabilities" / f"{name}.nii.gz")

    masks, tumour_probabilities = scan_masks(grid, probabilities, class_names, catalog, config,
                                             save if settings.probabilities else None)
    try:
        midline = body_midline_x(scan.array, scan.affine)
    except ValueError:
        midline = None
    masks = postprocess(masks, catalog, class_names, scan.spacing, scan.affine, config, midline, in_place=True)
    label_map, table = merge_label_map(masks, class_names, catalog)
    write_nifti_atomic(label_map, scan.affine, folder / "labels.nii.gz", dtype=label_map.dtype, header=scan.header)
    table_text = json.dumps({str(label): name for label, name in table.items()}, indent=2) + "\n"
    replace_atomically(folder / "classes.json", lambda temp: temp.write_text(table_text))
    if settings.all_masks:
        mask_names = list(class_names)
    else:
        with_masks = set(nested_classes(class_names, catalog)) | set(hidden_classes(masks, label_map, class_names))
        mask_names = [name for name in class_names if name in with_masks]
    for name in mask_names:
        write_nifti_atomic(masks[name], scan.affine, folder / "masks" / f"{name}.nii.gz", dtype=np.uint8,
                           header=scan.header)
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


# -- output folders -----------------------------------------------------------------------------
def partial_folder(output_dir: Path, name: str) -> Path:
    """A fresh ``OUT/.<name>.partial`` folder (a leftover from an interrupted run is removed)."""
    partial = output_dir / f".{name}{PARTIAL_SUFFIX}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def publish_folder(partial: Path, final: Path) -> Path:
    """Rename a complete ``partial`` folder to ``final``, replacing an existing one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old)
    else:
        partial.rename(final)
    return final


def output_names(scans: Sequence[Path]) -> list[str]:
    """A distinct output folder name per scan: its stem, prefixed by parent folders where stems clash."""
    depth = [0] * len(scans)

    def candidate(index: int) -> str:
        path = Path(scans[index])
        parents = [part for part in path.parent.parts if part not in ("/", "")]
        return "_".join(parents[len(parents) - depth[index]:] + [scan_stem(path)]) if depth[index] else scan_stem(path)

    while True:
        names = [candidate(index) for index in range(len(scans))]
        clashing = [index for index, name in enumerate(names) if names.count(name) > 1
                    and depth[index] < len(Path(scans[index]).parent.parts)]
        if not clashing:
            break
        for index in clashing:
            depth[index] += 1
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def check_output_folder(output_dir: Path, inputs: Sequence[Path], scans: Sequence[Path]) -> None:
    """Refuse an output folder inside (or equal to) an input folder, or one that holds an input."""
    def spellings(path: Path) -> set[Path]:  # as given and with links resolved
        return {Path(os.path.abspath(path)), Path(path).resolve()}

    outs = spellings(output_dir)
    for folder in (Path(item) for item in list(inputs) + list(scans) if Path(item).is_dir()):
        if any(out == name or name in out.parents for out in outs for name in spellings(folder)):
            raise SegmentError(f"output folder {output_dir} is inside the input folder {folder}; choose another -o")
    for scan in scans:
        if any(out in name.parents for out in outs for name in spellings(scan)):
            raise SegmentError(f"input {scan} lies inside the output folder {output_dir}; choose another -o")


def one_line(err: BaseException, path: Path) -> str:
    """An error as one line that names the scan."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, ScanError):
        text = f"{type(err).__name__}: {text}"
    return text if str(path) in text else f"{path}: {text}"


# -- the command --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipseg3d segment", description="Segment CT scans (NIfTI files, folders of them, DICOM series "
        "folders) with a trained checkpoint; writes OUT/<scan>/labels.nii.gz, classes.json, masks/, report.json, "
        "overlay.png.")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    parser.add_argument("--ckpt", required=True, type=Path, help="trained clipseg3d checkpoint")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (one subfolder per scan)")
    parser.add_argument("--classes", nargs="+", metavar="NAME", help="segment only these classes (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--roi", nargs=3, type=int, metavar=("X", "Y", "Z"), help="window size (default: checkpoint's)")
    parser.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: checkpoint's)")
    parser.add_argument("--sw-batch", type=int, default=1, metavar="N", help="windows per forward pass")
    parser.add_argument("--tta", action="store_true", help="average over flips (anterior-posterior, superior-inferior)")
    parser.add_argument("--probabilities", action="store_true", help="write probabilities/<class>.nii.gz (uint8, "
                        "scale slope 1/255)")
    parser.add_argument("--all-masks", action="store_true", help="write masks/<class>.nii.gz for every class "
                        "(default: only classes that overlap: tumours and their parents)")
    parser.add_argument("--dicom-seg", action="store_true", help="also write seg.dcm for DICOM inputs")
    parser.add_argument("--overwrite", action="store_true", help="redo scans whose output folder exists")
    parser.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default 0.5)")
    parser.add_argument("--no-overlay", action="store_true", help="do not write overlay.png")
    return parser


@dataclass
class Segmenter:
    """A loaded checkpoint with the settings of one ``segment`` run."""

    model: UniversalModel
    checkpoint: Path
    class_names: list[str]
    spacing: list[float] | None
    hu_window: tuple[float, float]
    roi_size: tuple[int, int, int]
    overlap: float
    sw_batch_size: int
    tta: bool
    device: str
    settings: OutputSettings

    @property
    def catalog(self) -> ClassCatalog:
        return self.model.catalog

    def provenance(self, scan: Scan) -> dict[str, Any]:
        return {"input": str(scan.path), "checkpoint": str(self.checkpoint), "class_names": list(self.class_names),
                "settings": {"spacing_mm": self.spacing, "hu_window": list(self.hu_window),
                             "roi_size": list(self.roi_size), "overlap": self.overlap, "tta": self.tta,
                             "threshold": self.settings.postprocess.default_threshold}}

    def segment(self, scan: Scan, folder: Path) -> dict[str, Any]:
        """Predict ``scan`` and write its outputs into ``folder``; returns the report."""
        image, grid = preprocess(scan, self.spacing, self.hu_window)
        indices = [self.model.class_names.index(name) for name in self.class_names]
        probabilities = predict_probabilities(self.model, image, indices, self.roi_size, self.overlap,
                                              self.sw_batch_size, self.tta, self.device, progress=True)
        del image
        return write_scan_outputs(folder, scan, grid, probabilities, self.class_names, self.catalog, self.settings,
                                  self.provenance(scan))


def load_segmenter(args: argparse.Namespace) -> Segmenter:
    """The model and run settings from parsed arguments; raises :class:`SegmentError` on bad options."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SegmentError("--device cuda: no CUDA device is available")
    try:
        model, meta = load_model(args.ckpt, map_location=device)
        class_names = model.class_names
        if args.classes:
            wanted = set(model.catalog.resolve(args.classes))
            class_names = [name for name in model.class_names if name in wanted]
    except (CheckpointError, CatalogError) as err:
        raise SegmentError(str(err)) from err
    preprocessing = meta.get("preprocessing", {})
    roi_size = tuple(args.roi or preprocessing.get("roi_size") or (96, 96, 96))
    multiple = model.backbone.size_multiple
    if any(size < 1 or size % multiple for size in roi_size):
        raise SegmentError(f"--roi {' '.join(map(str, roi_size))}: the {model.backbone.registry_name} backbone "
                           f"needs window sizes that are positive multiples of {multiple}")
    overlap = float(args.overlap if args.overlap is not None else preprocessing.get("sw_overlap", 0.5))
    if not 0.0 <= overlap < 1.0:
        raise SegmentError(f"--overlap {overlap}: must be in [0, 1)")
    if args.sw_batch < 1:
        raise SegmentError(f"--sw-batch {args.sw_batch}: must be at least 1")
    if not 0.0 < args.threshold <= 1.0:
        raise SegmentError(f"--threshold {args.threshold}: must be in (0, 1]")
    hu_window = tuple(float(value) for value in preprocessing.get("hu_window", DEFAULT_HU_WINDOW))
    settings = OutputSettings(postprocess=PostprocessConfig(default_threshold=args.threshold),
                              all_masks=args.all_masks, probabilities=args.probabilities,
                              dicom_seg=args.dicom_seg, overlay=not args.no_overlay, hu_window=hu_window)
    spacing = preprocessing.get("spacing")
    return Segmenter(model=model, checkpoint=args.ckpt, class_names=class_names,
                     spacing=list(spacing) if spacing else None, hu_window=hu_window, roi_size=roi_size,
                     overlap=overlap, sw_batch_size=args.sw_batch, tta=args.tta, device=device, settings=settings)


def _error(message: str) -> None:
    tqdm.write(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipseg3d segment``; 0 when every scan succeeded, 1 when any failed, 2 on unusable options."""
    args = build_parser().parse_args(argv)
    failures = 0
    scans: list[Path] = []
    for item in args.inputs:
        try:
            scans.extend(path for path in find_scans([item]) if path not in scans)
        except ScanError as err:
            _error(one_line(err, item))
            failures += 1
    try:
        check_output_folder(args.output, args.inputs, scans)
        segmenter = load_segmenter(args)
    except SegmentError as err:
        print(f"clipseg3d segment: error: {err}", file=sys.stderr)
        return 2
    output_dir = args.output
    output_dir.mkdir(parents=True, exist_ok=True)
    done = skipped = 0
    progress = tqdm(list(zip(scans, output_names(scans))), desc="segment", unit="scan")
    for path, name in progress:
        final = output_dir / name
        if final.exists() and not args.overwrite:
            skipped += 1
            continue
        progress.set_postfix_str(name)
        partial = None
        try:
            scan = read_scan(path)
            if args.dicom_seg and scan.kind != "dicom":
                tqdm.write(f"note: {path}: not a DICOM series; no seg.dcm written", file=sys.stderr)
            partial = partial_folder(output_dir, name)
            segmenter.segment(scan, partial)
            publish_folder(partial, final)
            done += 1
        except Exception as err:  # one bad scan must not stop the batch
            failures += 1
            _error(one_line(err, path))
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
    print(f"{done} segmented, {skipped} already done (use --overwrite to redo), {failures} failed; "
          f"outputs in {output_dir}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
