"""Tumour detection, per patient and per lesion.

Per patient (the original work's definition): a scan is called positive when its predicted tumour
volume is at least a threshold (default 0.1 ml). Sensitivity is counted over the patients whose
truth has a tumour, specificity over those whose truth has none.

Per lesion: lesions are connected components (26-connectivity). A predicted component that
shares at least one voxel with a true lesion can account for it, but for one lesion at most: the
hits are a maximum matching between true lesions and the predicted components overlapping them.
So a predicted component touching two true lesions gives one hit and one miss, and two predicted
components on one lesion give one hit (the second is no false positive). A predicted component
overlapping no true lesion is a false positive. Recall = hits / true lesions; precision = the
share of predicted components that overlap a true lesion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from clipseg3d.evaluation.metrics import union_box, voxel_volume_ml

DEFAULT_DETECTION_ML = 0.1
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion matching in one scan."""

    true_lesions: int
    predicted_lesions: int
    hits: int
    false_positives: int


@dataclass(frozen=True)
class PatientDetection:
    """Whether one scan's truth has a tumour and whether the prediction calls it positive."""

    has_tumour: bool
    detected: bool
    predicted_ml: float


def ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, or None when there is nothing to count over."""
    return numerator / denominator if denominator else None


def detect_patient(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                   threshold_ml: float = DEFAULT_DETECTION_ML) -> PatientDetection:
    """Per-patient detection: positive when the predicted volume is at least ``threshold_ml``."""
    predicted_ml = int(np.count_nonzero(predicted)) * voxel_volume_ml(spacing)
    return PatientDetection(bool(np.any(truth)), predicted_ml >= threshold_ml, predicted_ml)


def match_lesions(predicted: np.ndarray, truth: np.ndarray) -> LesionCounts:
    """Count true and predicted lesions (26-connected components), hits and false positives."""
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction shape {predicted.shape} differs from truth shape {truth.shape}")
    if not predicted.any() and not truth.any():
        return LesionCounts(0, 0, 0, 0)
    box = union_box(predicted, truth)
    true_ids, true_count = ndimage.label(truth[box], structure=CONNECTIVITY_26)
    pred_ids, pred_count = ndimage.label(predicted[box], structure=CONNECTIVITY_26)
    if not true_count or not pred_count:
        return LesionCounts(true_count, pred_count, 0, pred_count)
    shared = (true_ids > 0) & (pred_ids > 0)
    codes = np.unique((true_ids[shared].astype(np.int64) - 1) * pred_count + (pred_ids[shared] - 1))
    true_of, pred_of = np.divmod(codes, pred_count)
    overlaps = csr_matrix((np.ones(codes.size, dtype=np.int8), (true_of, pred_of)), shape=(true_count, pred_count))
    matched = maximum_bipartite_matching(overlaps, perm_type="column")
    touching = np.unique(pred_of).size
    return LesionCounts(true_count, pred_count, int(np.count_nonzero(matched >= 0)), pred_count - touching)


@dataclass
class DetectionTally:
    """Detection counts of one tumour class over many scans."""

    scans: int = 0
    patients_with_tumour: int = 0
    detected: int = 0
    patients_without_tumour: int = 0
    cleared: int = 0
    true_lesions: int = 0
    hits: int = 0
    predicted_lesions: int = 0
    false_positives: int = 0

    def add(self, patient: PatientDetection, lesions: LesionCounts) -> None:
        """Count one scan."""
        self.scans += 1
        if patient.has_tumour:
            self.patients_with_tumour += 1
            self.detected += patient.detected
        else:
            self.patients_without_tumour += 1
            self.cleared += not patient.detected
        self.true_lesions += lesions.true_lesions
        self.hits += lesions.hits
        self.predicted_lesions += lesions.predicted_lesions
        self.false_positives += lesions.false_positives

    @property
    def sensitivity(self) -> float | None:
        return ratio(self.detected, self.patients_with_tumour)

    @property
    def specificity(self) -> float | None:
        return ratio(self.cleared, self.patients_without_tumour)

    @property
    def lesion_recall(self) -> float | None:
        return ratio(self.hits, self.true_lesions)

    @property
    def lesion_precision(self) -> float | None:
        return ratio(self.predicted_lesions - self.false_positives, self.predicted_lesions)

    @property
    def false_positives_per_scan(self) -> float | None:
        return ratio(self.false_positives, self.scans)
