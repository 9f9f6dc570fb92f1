"""Scoring ``clipseg3d segment`` output folders against ground-truth label volumes.

A prediction folder ``SEG_DIR/<case>/`` holds ``labels.nii.gz`` (each voxel's most specific
class), ``classes.json`` (label value -> class) and ``masks/<class>.nii.gz`` for the classes that
share voxels. A class is read from its mask file when there is one (a tumour's parent keeps its
tumour voxels there), else from the voxels of its value in ``labels.nii.gz``.

The truth ``LABEL_DIR/<case>.nii.gz`` becomes one channel per class through the dataset's label
map (:func:`clipseg3d.data.targets.build_targets`), so left/right splits and tumour -> parent
inclusion hold as in training. The classes scored are those both predicted and labelled by the
map; metrics are taken on the truth's own grid with its voxel spacing. :func:`score_truth` is that
scoring of masks against a raw label volume, which ``clipseg3d test`` runs on masks in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import nibabel as nib
import numpy as np

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.grids import same_grid
from clipseg3d.data.labelmap import LabelMap
from clipseg3d.data.scans import voxel_spacing
from clipseg3d.data.targets import RawLabels, build_targets
from clipseg3d.evaluation.detection import (
    DEFAULT_DETECTION_ML,
    LesionCounts,
    PatientDetection,
    detect_patient,
    match_lesions,
)
from clipseg3d.evaluation.metrics import ClassScore, nsd_tolerance, score_class

LABELS_FILE = "labels.nii.gz"
CLASSES_FILE = "classes.json"
MASKS_FOLDER = "masks"
TRUTH_SUFFIXES = (".nii.gz", ".nii")


class CaseError(ValueError):
    """Input of one case that cannot be scored (missing file, grid mismatch, unknown label value)."""


@dataclass
class Prediction:
    """One ``segment`` output folder: its label volume, grid and ``value -> class`` table."""

    folder: Path
    labels: np.ndarray
    affine: np.ndarray
    classes: dict[int, str]
    present: set[int]
    catalog: ClassCatalog

    def mask(self, name: str) -> np.ndarray:
        """The full mask of class ``name``: its mask file if written, else its voxels in the labels.

        A class whose tumour has voxels in the labels needs its mask file: the labels give those
        voxels to the tumour.
        """
        path = self.folder / MASKS_FOLDER / f"{name}.nii.gz"
        if path.exists():
            image = _load(path)
            if image.shape != self.labels.shape or not same_grid(image.affine, self.affine):
                raise CaseError(f"{path}: grid (shape {image.shape}) differs from {LABELS_FILE} "
                                f"(shape {self.labels.shape})")
            return np.asanyarray(image.dataobj) > 0
        values = {class_name: value for value, class_name in self.classes.items()}
        hiding = [child.name for child in self.catalog.tumours_of(name) if values.get(child.name) in self.present]
        if hiding:
            raise CaseError(f"{path} is missing: {', '.join(hiding)} voxels in {LABELS_FILE} belong to {name} too")
        return self.labels == values[name]


@dataclass(frozen=True)
class ClassResult:
    """The scores of one class in one case (detection only for tumour classes)."""

    case: str
    name: str
    kind: str
    score: ClassScore
    patient: PatientDetection | None = None
    lesions: LesionCounts | None = None

    def row(self) -> dict:
        """One CSV row: case, class, kind, the metrics, and the detection counts of a tumour."""
        row = {"case": self.case, "class": self.name, "kind": self.kind, **asdict(self.score)}
        row.update(tumour_in_truth=None, detected=None, true_lesions=None, predicted_lesions=None,
                   lesion_hits=None, false_positive_lesions=None)
        if self.patient is not None and self.lesions is not None:
            row.update(tumour_in_truth=self.patient.has_tumour, detected=self.patient.detected,
                       true_lesions=self.lesions.true_lesions, predicted_lesions=self.lesions.predicted_lesions,
                       lesion_hits=self.lesions.hits, false_positive_lesions=self.lesions.false_positives)
        return row


def _load(path: Path) -> nib.spatialimages.SpatialImage:
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for unreadable files
        raise CaseError(f"{path}: cannot read ({err})") from err
    if len(image.shape) != 3:
        raise CaseError(f"{path}: expected a 3-D volume, got shape {image.shape}")
    return image


def _read_classes(path: Path, catalog: ClassCatalog) -> dict[int, str]:
    try:
        table = json.loads(path.read_text())
        classes = {int(value): str(name) for value, name in table.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise CaseError(f"{path}: not a readable {{label value: class}} table ({err})") from err
    unknown = [name for name in classes.values() if name not in catalog]
    if unknown:
        raise CaseError(f"{path}: unknown class(es) {unknown}")
    return {value: catalog[name].name for value, name in sorted(classes.items())}


def read_prediction(folder: Path, catalog: ClassCatalog) -> Prediction:
    """Read a ``segment`` output folder; a label value missing from ``classes.json`` is an error."""
    folder = Path(folder)
    for name in (LABELS_FILE, CLASSES_FILE):
        if not (folder / name).is_file():
            raise CaseError(f"{folder}: no {name} (not a clipseg3d segment output folder)")
    image = _load(folder / LABELS_FILE)
    labels = np.asanyarray(image.dataobj)
    classes = _read_classes(folder / CLASSES_FILE, catalog)
    present = set(np.unique(labels).tolist()) - {0}
    unknown = sorted(present - set(classes))
    if unknown:
        raise CaseError(f"{folder / LABELS_FILE}: label value(s) {unknown[:10]} are not in {CLASSES_FILE}")
    return Prediction(folder, labels, np.asarray(image.affine, dtype=np.float64), classes, present, catalog)


def prediction_label_map(prediction: Prediction, catalog: ClassCatalog) -> LabelMap:
    """A label map for truth written in the prediction's own numbering (value -> class of ``classes.json``)."""
    labels = {value: {"name": name, "class": name} for value, name in prediction.classes.items()}
    return LabelMap.from_mapping({"name": "segment", "label_count": max(labels), "labels": labels},
                                 source=str(prediction.folder / CLASSES_FILE), catalog=catalog)


def truth_path(label_dir: Path, case: str) -> Path:
    """``LABEL_DIR/<case>.nii.gz`` (or ``.nii``)."""
    for suffix in TRUTH_SUFFIXES:
        path = Path(label_dir) / f"{case}{suffix}"
        if path.is_file():
            return path
    raise CaseError(f"no ground truth {Path(label_dir) / (case + TRUTH_SUFFIXES[0])}")


def scored_classes(predicted: Sequence[str], label_map: RawLabels) -> list[str]:
    """The predicted classes that the label map labels, in prediction order."""
    labelled = set(label_map.labelled_classes)
    return [name for name in predicted if name in labelled]


def _check_grid(prediction: Prediction, shape: tuple[int, ...], affine: np.ndarray, truth: Path) -> None:
    if shape != prediction.labels.shape:
        raise CaseError(f"grid mismatch: prediction shape {prediction.labels.shape}, truth {truth} shape {shape}")
    if not same_grid(affine, prediction.affine):
        difference = float(np.abs(affine - prediction.affine).max())
        raise CaseError(f"grid mismatch: the affines of the prediction and of truth {truth} differ by up to "
                        f"{difference:.4g} mm")


def score_truth(case: str, mask: Callable[[str], np.ndarray], predicted: Sequence[str], label: np.ndarray,
                affine: np.ndarray, label_map: RawLabels, catalog: ClassCatalog, source: str,
                detection_ml: float = DEFAULT_DETECTION_ML) -> list[ClassResult]:
    """Score every class of ``predicted`` that ``label_map`` labels: ``mask(name)`` against the raw
    label volume ``label`` on the grid ``affine`` (``source`` names the truth in errors)."""
    _, _, report = build_targets(label_map, label, affine, [], catalog=catalog)
    if report["unknown_values"]:
        values = [item["value"] for item in report["unknown_values"]]
        raise CaseError(f"{source}: label value(s) {values[:10]} are not in label map {label_map.name!r}")
    spacing = voxel_spacing(affine)
    results = []
    for name in scored_classes(predicted, label_map):
        entry, predicted_mask = catalog[name], mask(name)
        truth_mask = build_targets(label_map, label, affine, [name], catalog=catalog)[0][0].astype(bool)
        score = score_class(predicted_mask, truth_mask, spacing, nsd_tolerance(entry))
        if entry.kind == "tumour":
            patient = detect_patient(predicted_mask, truth_mask, spacing, detection_ml)
            lesions = match_lesions(predicted_mask, truth_mask)
            results.append(ClassResult(case, name, entry.kind, score, patient, lesions))
        else:
            results.append(ClassResult(case, name, entry.kind, score))
    return results


def score_case(case: str, prediction: Prediction, truth: Path, label_map: RawLabels, catalog: ClassCatalog,
               detection_ml: float = DEFAULT_DETECTION_ML) -> list[ClassResult]:
    """Score every class of ``prediction`` that ``label_map`` labels against the truth file ``truth``."""
    image = _load(truth)
    label, affine = np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)
    _check_grid(prediction, label.shape, affine, truth)
    return score_truth(case, prediction.mask, list(prediction.classes.values()), label, affine, label_map, catalog,
                       str(truth), detection_ml)


def find_cases(seg_dir: Path) -> list[str]:
    """The case folders of a ``segment`` output folder (hidden, unfinished ones left out)."""
    return sorted(path.name for path in Path(seg_dir).iterdir() if path.is_dir() and not path.name.startswith("."))


def iter_scores(seg_dir: Path, label_dir: Path, cases: Sequence[str], label_map: RawLabels | None,
                catalog: ClassCatalog, detection_ml: float = DEFAULT_DETECTION_ML,
                ) -> Iterator[tuple[str, list[str], list[ClassResult] | CaseError]]:
    """(case, predicted classes, results or the case's error) for each case, in order.

    ``label_map`` None reads the truth in each prediction's own numbering.
    """
    for case in cases:
        predicted: list[str] = []
        try:
            prediction = read_prediction(Path(seg_dir) / case, catalog)
            predicted = list(prediction.classes.values())
            labels = label_map if label_map is not None else prediction_label_map(prediction, catalog)
            outcome: list[ClassResult] | CaseError = score_case(case, prediction, truth_path(label_dir, case),
                                                                labels, catalog, detection_ml)
        except ValueError as err:  # CaseError, or a truth volume its label map cannot read (non-integer values)
            outcome = CaseError(f"case {case}: {err}")
        yield case, predicted, outcome
