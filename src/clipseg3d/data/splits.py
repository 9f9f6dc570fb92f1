"""Seeded train/val/test split files beside manifests, read by ``fit``, ``test`` and ``evaluate``.

``clipseg3d index ... -o data.jsonl --split 0.7 0.1 0.2 --seed 0`` writes ``data.split.json``:

```json
{"manifest": "data.jsonl", "seed": 0, "fractions": [0.7, 0.1, 0.2],
 "train": ["case_003", ...], "val": [...], "test": [...]}
```

The cases are sorted by id and permuted by ``seed``, so the split depends on the case ids and
the seed only (not on the order the files were found in). Each part gets ``round(fraction * n)``
cases, val and test first, the rest training. A split file is written once: an existing file that
assigns the cases differently is only replaced with ``overwrite``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from clipseg3d.files import write_json_atomic

PARTS = ("train", "val", "test")
SPLIT_SUFFIX = ".split.json"


class SplitError(ValueError):
    """A split that cannot be made, read or used; the message names the file."""


def split_path(manifest: str | Path) -> Path:
    """``data.jsonl`` -> ``data.split.json`` (beside the manifest)."""
    manifest = Path(manifest)
    stem = manifest.name[: -len(manifest.suffix)] if manifest.suffix else manifest.name
    return manifest.with_name(stem + SPLIT_SUFFIX)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Three fractions (train, val, test), each in [0, 1], summing to 1."""
    if len(fractions) != len(PARTS):
        raise SplitError(f"a split needs {len(PARTS)} fractions (train val test), got {list(fractions)}")
    values = tuple(float(value) for value in fractions)
    if any(not math.isfinite(value) or not 0.0 <= value <= 1.0 for value in values) \
            or abs(sum(values) - 1.0) > 1e-6:
        raise SplitError(f"split fractions {list(values)} must each lie in [0, 1] and sum to 1")
    return values


def make_split(cases: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """The case ids of each part: sorted ids permuted by ``seed``, val and test counts rounded."""
    _, val_fraction, test_fraction = check_fractions(fractions)
    ordered = sorted(set(cases))
    if len(ordered) != len(cases):
        raise SplitError("case ids must be unique to be split")
    order = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    test = int(round(test_fraction * len(order)))
    val = min(int(round(val_fraction * len(order))), len(order) - test)
    parts = {"test": order[:test], "val": order[test:test + val], "train": order[test + val:]}
    return {part: sorted(parts[part]) for part in PARTS}


def plan_split(manifest: str | Path, cases: Sequence[str], fractions: Sequence[float], seed: int,
               overwrite: bool = False) -> dict:
    """The split file's content for ``cases``; an existing split file beside ``manifest`` that assigns
    them differently is refused unless ``overwrite`` (check this before writing anything)."""
    parts = make_split(cases, fractions, seed)
    path = split_path(manifest)
    if path.exists() and not overwrite and read_split(path) != parts:
        raise SplitError(f"{path} exists and assigns the cases differently; pass --overwrite to replace it "
                         "(numbers published with it could no longer be reproduced)")
    return {"manifest": Path(manifest).name, "seed": int(seed), "fractions": list(check_fractions(fractions)),
            **parts}


def write_split(manifest: str | Path, planned: dict) -> Path:
    """Write :func:`plan_split`'s content beside ``manifest`` (atomically)."""
    return write_json_atomic(split_path(manifest), planned)


def read_split(path: str | Path) -> dict[str, list[str]]:
    """The case ids of each part of a split file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitError(f"{path}: no such split file; write it with clipseg3d index ... --split TRAIN VAL TEST") \
            from None
    except (OSError, ValueError) as err:
        raise SplitError(f"{path}: not a readable split file ({err})") from err
    if not isinstance(data, dict) or any(not isinstance(data.get(part), list) for part in PARTS):
        raise SplitError(f"{path}: a split file needs the lists {list(PARTS)}")
    parts = {part: [str(case) for case in data[part]] for part in PARTS}
    seen = [case for part in PARTS for case in parts[part]]
    if len(set(seen)) != len(seen):
        raise SplitError(f"{path}: a case is in more than one part")
    return parts


def select(records: Sequence[dict], manifest: str | Path, part: str) -> list[dict]:
    """The records of ``manifest`` that its split file puts in ``part``; a case the split names but
    the manifest lacks is an error (the split was made for other data)."""
    path = split_path(manifest)
    wanted = read_split(path)[part]
    if any("case" not in record for record in records):
        raise SplitError(f"{manifest}: records without a 'case' id cannot be split; index the dataset again")
    by_case = {str(record["case"]): record for record in records}
    missing = [case for case in wanted if case not in by_case]
    if missing:
        raise SplitError(f"{path}: {len(missing)} {part} case(s) missing from {manifest} (e.g. {missing[0]!r}); "
                         "index the dataset again with the same --split and --seed")
    return [by_case[case] for case in wanted]
