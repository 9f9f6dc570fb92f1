"""Scoring on held-out phantoms at the model grid, with each model's sliding-window time."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from claims.config import OVERLAP, Budget
from claims.models import PlainConvSegmentation
from clipseg3d.catalog import load_catalog
from clipseg3d.evaluation.metrics import nsd_tolerance, score_class
from clipseg3d.inference.sliding_window import StreamingInferer
from clipseg3d.models.model import UniversalModel

#: image [1, 1, *S] -> class name -> logits [*S] on the same grid
Predictor = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def universal_predictor(model: UniversalModel, budget: Budget) -> Predictor:
    """Every class of the universal model from one sliding-window pass."""
    inferer = StreamingInferer(budget.crop, overlap=OVERLAP)

    def predict(image: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(model.class_names, inferer(image, model.eval())))

    return predict


def specialists_predictor(specialists: Mapping[str, PlainConvSegmentation], budget: Budget) -> Predictor:
    """The union of the specialists' classes: one sliding-window pass per specialist; a class two
    datasets label is taken from the first."""
    inferer = StreamingInferer(budget.crop, overlap=OVERLAP)

    def predict(image: torch.Tensor) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for specialist in specialists.values():
            for name, logits in zip(specialist.class_names, inferer(image, specialist.model.eval())):
                found.setdefault(name, logits)
        return found

    return predict


def evaluate(data, classes: Sequence[str], predictors: Mapping[str, Predictor], spacing_mm: float
             ) -> tuple[dict[str, dict[str, dict[str, list[float]]]], dict[str, float]]:
    """Score every predictor on every scan of ``data``'s validation loader.

    Returns (model -> class -> {"dice": [...], "nsd": [...]} over the scans where the class is
    present in the truth or the prediction, model -> sliding-window seconds). The predictors run
    in turn on each scan, so load on the machine weighs on all of them alike.
    """
    catalog = load_catalog()
    data.setup("validate")
    scores = {name: {cls: {"dice": [], "nsd": []} for cls in classes} for name in predictors}
    seconds = dict.fromkeys(predictors, 0.0)
    for batch in data.val_dataloader():
        image, target, labelled = batch["image"], batch["target"][0], batch["labelled"][0].bool()
        for name, predict in predictors.items():
            started = time.perf_counter()
            logits = predict(image)
            seconds[name] += time.perf_counter() - started
            for k, cls in enumerate(classes):
                if not labelled[k] or cls not in logits:
                    continue
                score = score_class((logits[cls] > 0).numpy(), (target[k] > 0).numpy(), (spacing_mm,) * 3,
                                    nsd_tolerance(catalog[cls]))
                if score.dice is not None:
                    scores[name][cls]["dice"].append(score.dice)
                    scores[name][cls]["nsd"].append(score.nsd)
    return scores, seconds


def class_means(scores: Mapping[str, Mapping[str, list[float]]], metric: str) -> dict[str, float]:
    """Each class's mean ``metric`` over the scans that had it."""
    return {cls: float(np.mean(values[metric])) for cls, values in scores.items() if values[metric]}


def kind_mean(scores: Mapping[str, Mapping[str, list[float]]], metric: str, tumours: bool) -> float:
    """Mean over classes of :func:`class_means`, organs only or tumours only (NaN when none)."""
    catalog = load_catalog()
    means = [value for cls, value in class_means(scores, metric).items()
             if (catalog[cls].kind == "tumour") == tumours]
    return float(np.mean(means)) if means else float("nan")
