"""Atomic file writes: a file is either complete under its name or absent.

Every output the package writes (scan results, manifests, phantoms, embeddings, reports) goes
through :func:`replace_atomically`: the content is written to a temporary file beside the target
and renamed over it, so an interrupted run never leaves a half-written file under a real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _suffix(path: Path) -> str:
    """The suffixes a reader may look at (``.nii.gz`` counts as one)."""
    return "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix


def replace_atomically(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp)`` on a temporary file next to ``path`` (same suffixes), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_suffix(path), dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return replace_atomically(path, lambda temp: temp.write_text(text))


def write_json_atomic(path: Path | str, data: Any) -> Path:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
