"""Tumour detection per patient (volume threshold) and per lesion (26-connected components)."""

import numpy as np
import pytest

from clipseg3d.evaluation.detection import (
    DetectionTally,
    LesionCounts,
    PatientDetection,
    detect_patient,
    match_lesions,
)

SHAPE = (40, 40, 12)


def paint(mask: np.ndarray, low, high) -> None:
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = True


def constructed_lesions() -> tuple[np.ndarray, np.ndarray]:
    """Five true lesions and five predicted components (see the test below)."""
    truth, predicted = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    # T1: two cubes meeting at one corner only: one lesion under 26-connectivity.
    paint(truth, (2, 2, 2), (5, 5, 5))
    paint(truth, (5, 5, 5), (8, 8, 8))
    paint(predicted, (3, 3, 3), (4, 4, 4))              # P1 inside T1's first cube
    # T2 with two predicted components on it.
    paint(truth, (12, 2, 2), (18, 8, 6))
    paint(predicted, (12, 2, 2), (14, 4, 4))            # P2a
    paint(predicted, (16, 6, 3), (18, 9, 5))            # P2b, partly outside T2
    # T3: missed.
    paint(truth, (25, 2, 2), (28, 5, 5))
    # T4 and T5, two lesions one voxel apart, merged by one predicted component P4.
    paint(truth, (2, 20, 2), (6, 24, 6))
    paint(truth, (7, 20, 2), (11, 24, 6))
    paint(predicted, (4, 21, 3), (9, 23, 5))
    # P3: a false positive far from every lesion.
    paint(predicted, (30, 30, 8), (33, 33, 10))
    return predicted, truth


def test_constructed_lesions_count_hits_misses_and_false_positives():
    # Hits: T1 (P1), T2 (P2a; P2b is no false positive), one of T4/T5 (P4 counts once). Missed:
    # T3 and the other of T4/T5. False positive: P3.
    counts = match_lesions(*constructed_lesions())
    assert counts == LesionCounts(true_lesions=5, predicted_lesions=5, hits=3, false_positives=1)
    tally = DetectionTally()
    tally.add(PatientDetection(True, True, 1.0), counts)
    assert tally.lesion_recall == pytest.approx(3 / 5)
    assert tally.lesion_precision == pytest.approx(4 / 5)
    assert tally.false_positives_per_scan == 1.0


def test_a_merging_component_and_a_second_one_account_for_both_lesions():
    # P4 touches T4 and T5, P5 touches T5 only: the best assignment hits both (P4 -> T4, P5 -> T5).
    truth, predicted = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    paint(truth, (2, 2, 2), (6, 6, 6))
    paint(truth, (7, 2, 2), (11, 6, 6))
    paint(predicted, (4, 3, 3), (9, 5, 5))
    paint(predicted, (10, 2, 8), (11, 3, 9))
    paint(predicted, (10, 2, 5), (11, 3, 6))
    counts = match_lesions(predicted, truth)
    assert counts == LesionCounts(true_lesions=2, predicted_lesions=3, hits=2, false_positives=1)


def test_six_connected_neighbours_only_by_an_edge_still_form_one_lesion():
    truth = np.zeros(SHAPE, bool)
    truth[5, 5, 5] = truth[6, 6, 5] = True     # edge neighbours
    truth[20, 20, 5] = truth[22, 20, 5] = True  # one voxel apart: two lesions
    assert match_lesions(np.zeros(SHAPE, bool), truth) == LesionCounts(3, 0, 0, 0)


def test_no_lesions_anywhere_counts_nothing():
    empty = np.zeros(SHAPE, bool)
    assert match_lesions(empty, empty.copy()) == LesionCounts(0, 0, 0, 0)
    tally = DetectionTally()
    tally.add(PatientDetection(False, False, 0.0), LesionCounts(0, 0, 0, 0))
    assert (tally.lesion_recall, tally.lesion_precision, tally.false_positives_per_scan) == (None, None, 0.0)


def test_a_patient_is_detected_from_the_predicted_volume_threshold():
    spacing = (2.0, 2.0, 2.0)  # 0.008 ml per voxel
    truth = np.zeros(SHAPE, bool)
    truth[:2, :2, :2] = True
    predicted = np.zeros(SHAPE, bool)
    predicted.reshape(-1)[:13] = True           # 0.104 ml
    assert detect_patient(predicted, truth, spacing) == PatientDetection(True, True, pytest.approx(0.104))
    predicted.reshape(-1)[12] = False           # 0.096 ml
    assert not detect_patient(predicted, truth, spacing).detected
    assert detect_patient(predicted, truth, spacing, threshold_ml=0.05).detected
    assert not detect_patient(predicted, np.zeros(SHAPE, bool), spacing).has_tumour


def test_sensitivity_counts_patients_with_a_tumour_and_specificity_those_without():
    none = LesionCounts(0, 0, 0, 0)
    tally = DetectionTally()
    for has_tumour, detected in [(True, True), (True, False), (True, True), (False, False), (False, True)]:
        tally.add(PatientDetection(has_tumour, detected, 0.0), none)
    assert (tally.patients_with_tumour, tally.detected, tally.patients_without_tumour, tally.cleared) == (3, 2, 2, 1)
    assert tally.sensitivity == pytest.approx(2 / 3)
    assert tally.specificity == pytest.approx(1 / 2)
    assert DetectionTally().sensitivity is None
