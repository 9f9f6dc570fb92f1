"""The files of an evaluation: ``metrics.csv``, ``summary.md`` and ``metrics.png``, written atomically.

``metrics.csv`` has one row per case and class, one column per metric (empty: not defined, e.g.
every metric of a class absent from both truth and prediction; ``nan``: MONAI's HD95 of a surface
against nothing). ``summary.md`` gives mean ± sd per class and metric: Dice and NSD over the cases
where the class is in the truth or the prediction (a missed or spurious class counts 0), HD95 over
the cases where it is finite; then the tumour detection table, the classes not scored, and the
cases that failed. ``metrics.png`` is a box plot of Dice and NSD per class.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from clipseg3d.evaluation.detection import DEFAULT_DETECTION_ML, DetectionTally
from clipseg3d.evaluation.scoring import ClassResult
from clipseg3d.files import replace_atomically, write_text_atomic

METRICS = (("dice", "Dice"), ("nsd", "NSD"), ("hd95_mm", "HD95 (mm)"))
PLOTTED = (("dice", "Dice"), ("nsd", "NSD"))
COUNTED = ("absent", "missed", "spurious")
AVERAGING = ("Dice and NSD: mean ± sd over the cases where the class is in the truth or the prediction (missed or "
             "spurious: 0). HD95: over the cases where it is finite. Absent, missed, spurious: cases with the class "
             "in neither, only in the truth, only in the prediction.")


@dataclass
class Evaluation:
    """Everything an evaluation run found: the scores, the unscored classes and the failed cases."""

    results: list[ClassResult] = field(default_factory=list)
    label_map: str = ""
    detection_ml: float = DEFAULT_DETECTION_ML
    not_labelled: list[str] = field(default_factory=list)
    not_predicted: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """The scored classes, in the order first met."""
        return list(dict.fromkeys(result.name for result in self.results))

    def of_class(self, name: str) -> list[ClassResult]:
        return [result for result in self.results if result.name == name]

    def values(self, name: str, metric: str) -> list[float]:
        """The values of ``metric`` that the summary averages (see the module docstring)."""
        values = [getattr(result.score, metric) for result in self.of_class(name)]
        return [value for value in values if value is not None and math.isfinite(value)]

    def detection(self, name: str) -> DetectionTally:
        tally = DetectionTally()
        for result in self.of_class(name):
            if result.patient is not None and result.lesions is not None:
                tally.add(result.patient, result.lesions)
        return tally


def metrics_csv(results: Sequence[ClassResult]) -> str:
    """The CSV text: a header and one row per (case, class)."""
    rows = [result.row() for result in results]
    columns = list(rows[0]) if rows else ["case", "class", "kind", "status"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def mean_sd(values: Sequence[float], digits: int) -> str:
    """``mean ± sd (n=N)``; sd is the sample standard deviation (none for one value)."""
    if not values:
        return "–"
    text = f"{statistics.fmean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return f"{text} (n={len(values)})"


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _metric_rows(evaluation: Evaluation) -> list[list[object]]:
    rows = []
    for name in evaluation.classes:
        results = evaluation.of_class(name)
        statuses = [sum(result.score.status == status for result in results) for status in COUNTED]
        tolerances = sorted({result.score.nsd_tolerance_mm for result in results})
        rows.append([name, results[0].kind, len(results), *statuses, ", ".join(f"{t:g}" for t in tolerances)]
                    + [mean_sd(evaluation.values(name, metric), 2 if metric == "hd95_mm" else 3)
                       for metric, _ in METRICS])
    return rows


def _detection_rows(evaluation: Evaluation) -> list[list[object]]:
    rows = []
    for name in evaluation.classes:
        tally = evaluation.detection(name)
        if not tally.scans:
            continue
        rows.append([name, tally.patients_with_tumour, tally.detected, _fraction(tally.sensitivity),
                     tally.patients_without_tumour, tally.cleared, _fraction(tally.specificity),
                     tally.true_lesions, tally.hits, _fraction(tally.lesion_recall), tally.predicted_lesions,
                     tally.false_positives, _fraction(tally.lesion_precision),
                     _fraction(tally.false_positives_per_scan)])
    return rows


def summary_markdown(evaluation: Evaluation) -> str:
    """The text of ``summary.md``."""
    cases = len({result.case for result in evaluation.results})
    counts = f"Label map: {evaluation.label_map}. Cases scored: {cases}; failed: {len(evaluation.failures)}."
    lines = ["# Evaluation", "", counts, "", AVERAGING, "", "## Segmentation", ""]
    lines += _table(["class", "kind", "cases", *COUNTED, "NSD tolerance (mm)"] + [title for _, title in METRICS],
                    _metric_rows(evaluation))
    detection = _detection_rows(evaluation)
    if detection:
        rule = (f"Per patient: positive when the predicted volume is at least {evaluation.detection_ml:g} ml. "
                "Per lesion: 26-connected components; a predicted component accounts for at most one true lesion.")
        lines += ["", "## Tumour detection", "", rule, ""]
        lines += _table(["class", "with tumour", "detected", "sensitivity", "without tumour", "cleared",
                         "specificity", "true lesions", "hits", "lesion recall", "predicted lesions",
                         "false positives", "lesion precision", "FP per scan"], detection)
    if evaluation.not_labelled or evaluation.not_predicted:
        lines += ["", "## Not scored", ""]
        if evaluation.not_labelled:
            lines.append(f"- predicted, not labelled by {evaluation.label_map}: {', '.join(evaluation.not_labelled)}")
        if evaluation.not_predicted:
            lines.append(f"- labelled by {evaluation.label_map}, not predicted: {', '.join(evaluation.not_predicted)}")
    if evaluation.failures:
        lines += ["", "## Failed cases", ""] + [f"- {case}: {why}" for case, why in evaluation.failures.items()]
    return "\n".join(lines) + "\n"


def box_plot(evaluation: Evaluation) -> Figure:
    """One panel per plotted metric, one box per class."""
    names = evaluation.classes
    figure = Figure(figsize=(max(6.0, 0.45 * len(names) + 2.0), 3.2 * len(PLOTTED)), layout="constrained")
    for row, (metric, title) in enumerate(PLOTTED, start=1):
        axes = figure.add_subplot(len(PLOTTED), 1, row)
        if names:
            axes.boxplot([evaluation.values(name, metric) for name in names], tick_labels=names)
        else:
            axes.text(0.5, 0.5, "no class scored", ha="center", va="center", transform=axes.transAxes)
        axes.set_ylabel(title)
        axes.set_ylim(-0.05, 1.05)
        axes.tick_params(axis="x", labelrotation=60, labelsize=8, labelbottom=row == len(PLOTTED))
        axes.grid(axis="y", alpha=0.3)
    return figure


def write_reports(evaluation: Evaluation, out: Path) -> list[Path]:
    """Write ``metrics.csv``, ``summary.md`` and ``metrics.png`` into ``out``; returns their paths."""
    out = Path(out)
    figure = box_plot(evaluation)
    return [write_text_atomic(out / "metrics.csv", metrics_csv(evaluation.results)),
            write_text_atomic(out / "summary.md", summary_markdown(evaluation)),
            replace_atomically(out / "metrics.png", lambda temp: figure.savefig(temp, dpi=120))]
