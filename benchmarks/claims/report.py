"""The "Paper claims on phantoms" section of BENCHMARKS.md, replaced atomically on every run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from clipseg3d.files import write_text_atomic

TITLE = "## Paper claims on phantoms"


def replace_section(path: Path, section: str) -> None:
    """Put ``section`` (starting with :data:`TITLE`) in place of the file's own, or append it;
    the rest of the file is kept as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == TITLE), None)
    if start is None:
        before, after = text.rstrip("\n") + "\n\n", ""
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before, after = "".join(lines[:start]), "".join(lines[end:])
    write_text_atomic(path, before + section.rstrip("\n") + "\n" + ("\n" + after if after else ""))


def number(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def claims_table(rows: Mapping[str, tuple[str, str]]) -> str:
    """The six rows: claim -> (what the paper says, what was measured)."""
    lines = ["| # | claim | the paper | measured here |", "|---|---|---|---|"]
    for index, (claim, (paper, measured)) in enumerate(rows.items(), start=1):
        lines.append(f"| {index} | {claim} | {paper} | {measured} |")
    return "\n".join(lines)


def class_table(columns: Mapping[str, Mapping[str, float]]) -> str:
    """Per-class values, one column per heading (a class missing from a column shows n/a)."""
    classes = list(dict.fromkeys(cls for values in columns.values() for cls in values))
    lines = ["| class | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for cls in classes:
        lines.append(f"| {cls} | " + " | ".join(number(values.get(cls)) for values in columns.values()) + " |")
    return "\n".join(lines)


def head_table(rows: list[dict]) -> str:
    lines = ["| backbone | classes | backbone forward (s) | head forward (s) | head / backbone |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['backbone']} | {row['classes']} | {row['backbone_s']:.3f} | {row['head_s']:.3f} | "
                     f"{row['head_s'] / row['backbone_s']:.2f} |")
    return "\n".join(lines)
