"""Scoring test scans as researchers report them: on the scan's own grid, in its physical spacing.

Each test scan (:mod:`clipseg3d.data.test_scans`) goes the way ``clipseg3d segment`` goes: the
class probabilities on the model grid (:func:`~clipseg3d.inference.pipeline.model_grid_probabilities`),
back to the scan grid with the same thresholds, same-depth exclusivity and post-processing
(:func:`~clipseg3d.inference.pipeline.scan_results`). The truth is the raw label volume made into
per-class masks through the dataset's label map (a tumour's parent includes it), as
``clipseg3d evaluate`` reads it. Every class the model predicts and the label map labels is scored
with :mod:`clipseg3d.evaluation.metrics` and, for tumours, :mod:`clipseg3d.evaluation.detection`.

The means (:func:`metric_means`) average as ``evaluate``'s summary does: Dice and NSD over the
cases where the class is in the truth or the prediction, HD95 where it is finite; a class absent
from both in every case gets no mean (the per-case table says ``absent``).
"""

from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np
import torch

from clipseg3d.catalog import ClassCatalog
from clipseg3d.data.preprocess import ModelGrid
from clipseg3d.data.test_scans import TestCase
from clipseg3d.evaluation.detection import DEFAULT_DETECTION_ML
from clipseg3d.evaluation.report import Evaluation
from clipseg3d.evaluation.scoring import ClassResult, score_truth
from clipseg3d.inference.pipeline import model_grid_probabilities, scan_results
from clipseg3d.inference.postprocess import PostprocessConfig
from clipseg3d.inference.sliding_window import StreamingInferer
from clipseg3d.models.model import UniversalModel

#: Per tumour class: the logged key's name and the detection tally's property.
DETECTION_KEYS = (("tumour_sensitivity", "sensitivity"), ("tumour_specificity", "specificity"),
                  ("lesion_recall", "lesion_recall"), ("lesion_precision", "lesion_precision"),
                  ("fp_lesions_per_scan", "false_positives_per_scan"))
SEGMENTATION_KEYS = (("dice", "dice"), ("nsd", "nsd"), ("hd95", "hd95_mm"))


def score_masks(case: TestCase, masks: dict[str, np.ndarray], class_names: Sequence[str], catalog: ClassCatalog,
                detection_ml: float = DEFAULT_DETECTION_ML) -> list[ClassResult]:
    """The scores of every class of ``class_names`` that ``case``'s label map labels (masks on its grid),
    as ``evaluate`` scores them (:func:`~clipseg3d.evaluation.scoring.score_truth`)."""
    return score_truth(case.name, masks.__getitem__, class_names, case.label, case.scan.affine, case.label_map,
                       catalog, case.name, detection_ml)


def score_test_scan(model: UniversalModel, inferer: StreamingInferer, image: torch.Tensor, grid: ModelGrid,
                    case: TestCase, config: PostprocessConfig | None = None,
                    detection_ml: float = DEFAULT_DETECTION_ML) -> list[ClassResult]:
    """Segment one test scan as ``segment`` does (network input ``image`` [1, *S] on ``grid``) and score it."""
    names, catalog = model.class_names, model.catalog
    probabilities = model_grid_probabilities(model, image, names, inferer)
    masks, _ = scan_results(case.scan, grid, probabilities, names, catalog, config or PostprocessConfig())
    return score_masks(case, masks, names, catalog, detection_ml)


def metric_means(evaluation: Evaluation) -> dict[str, float]:
    """``dice/<class>``, ``nsd/<class>``, ``hd95/<class>``, the tumours' detection rates
    (:data:`DETECTION_KEYS`), ``dice_mean`` and ``nsd_mean``; what cannot be computed is left out."""
    means: dict[str, float] = {}
    for name in evaluation.classes:
        for key, metric in SEGMENTATION_KEYS:
            values = evaluation.values(name, metric)
            if values:
                means[f"{key}/{name}"] = statistics.fmean(values)
        tally = evaluation.detection(name)
        if tally.scans:
            for key, attribute in DETECTION_KEYS:
                value = getattr(tally, attribute)
                if value is not None:
                    means[f"{key}/{name}"] = float(value)
    for key in ("dice", "nsd"):
        per_class = [value for name, value in means.items() if name.startswith(f"{key}/")]
        if per_class:
            means[f"{key}_mean"] = statistics.fmean(per_class)
    return means


def gather_results(results: list[ClassResult]) -> list[ClassResult]:
    """Every process's results (one list under DDP), each (case, class) once, sorted by case."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, results)
        results = [result for part in parts for result in part]
    unique = {(result.case, result.name): result for result in results}
    return sorted(unique.values(), key=lambda result: result.case)


def collect_evaluation(results: Sequence[ClassResult], label_maps: Sequence[str],
                    detection_ml: float = DEFAULT_DETECTION_ML) -> Evaluation:
    """The :class:`Evaluation` of the test results (the form ``evaluate`` reports)."""
    return Evaluation(results=list(results), label_map=", ".join(dict.fromkeys(label_maps)),
                      detection_ml=detection_ml)
