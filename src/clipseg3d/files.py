"""Files in and out: atomic writes, and torch files read as data, never as code.

Every output the package writes (scan results, manifests, phantoms, embeddings, reports) goes
through :func:`replace_atomically`: the content is written to a temporary file beside the target
and renamed over it, so an interrupted run never leaves a half-written file under a real name.

Every torch file a user may have received from someone else (checkpoints, embedding tables,
imported weights) is read by :func:`load_torch_data`: ``torch.load(weights_only=True)``, which
rebuilds tensors and plain containers only. A file whose unpickling would call anything else (a
planted payload, or an object of some library) is refused before any of it runs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

# Globals that real files need beyond torch's own allow-list (tensors, dicts, lists, numbers, strings).
SAFE_GLOBALS: tuple = ()


def _suffix(path: Path) -> str:
    """The suffixes a reader may look at (``.nii.gz`` counts as one)."""
    return "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix


def _umask_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask): temporary files start at 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_atomically(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp)`` on a temporary file next to ``path`` (same suffixes), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_suffix(path), dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        os.chmod(temp, _umask_mode())
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


class UnsafeFileError(ValueError):
    """A torch file whose loading would run code other than rebuilding tensors and containers."""


def load_torch_data(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """The content of a torch file, read as data only (see the module docstring).

    Raises :class:`UnsafeFileError` naming the refused global, FileNotFoundError, or the
    reading error of a damaged file.
    """
    import torch  # here, so that writing files does not load torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        called = re.search(r"GLOBAL ([\w.]+)", text)
        if called:
            problem = f"loading it would call {called.group(1)}, which is code, not data"
        else:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            problem = f"not a plain torch file ({detail.group(1).strip() if detail else 'unreadable pickle'})"
        raise UnsafeFileError(f"{path}: refused: {problem}; only tensors and plain containers are read") from err
