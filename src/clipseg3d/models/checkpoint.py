"""Self-describing checkpoints: reading them back into a :class:`UniversalModel`.

A checkpoint written by the training task stores, beside the weights, everything needed to
rebuild and run the model without the text encoder (see :meth:`UniversalModel.metadata`) under
the ``clipseg3d`` key, and the preprocessing (spacing, HU window, window size).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clipseg3d.files import UnsafeFileError, load_torch_data
from clipseg3d.models.model import UniversalModel

CHECKPOINT_KEY = "clipseg3d"


class CheckpointError(RuntimeError):
    """A file that is not a readable clipseg3d checkpoint."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, checked to be a clipseg3d checkpoint."""
    path = Path(path)
    try:
        checkpoint = load_torch_data(path)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: checkpoint not found") from err
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from err
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(f"{path}: not a clipseg3d checkpoint (no {CHECKPOINT_KEY!r} metadata)")
    return checkpoint


def restore_model(checkpoint: dict[str, Any], path: str | Path = "<checkpoint>") -> UniversalModel:
    """The trained :class:`UniversalModel` of a checkpoint dict read by :func:`read_checkpoint`."""
    model = UniversalModel.from_metadata(checkpoint[CHECKPOINT_KEY])
    prefix = "model."
    state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks weights for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[UniversalModel, dict[str, Any]]:
    """Rebuild a trained :class:`UniversalModel` from a checkpoint; returns it with the metadata."""
    checkpoint = read_checkpoint(path)
    return restore_model(checkpoint, path).to(map_location).eval(), checkpoint[CHECKPOINT_KEY]
