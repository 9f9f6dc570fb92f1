"""Resuming a fit: ``--ckpt_path last`` resumes from the newest last checkpoint or fails, never
starting afresh in silence (Lightning only warns)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class ResumeError(ValueError):
    """A run to resume that cannot be found."""


def find_last_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint ``ckpt_path="last"`` resolves to, as Lightning resolves it, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "no last checkpoint" notice: the caller decides
        return trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last", model_provided=True,
                                                              model_connected=True)


def checkpoint_folder(callback: ModelCheckpoint, trainer: L.Trainer) -> str:
    """Where ``callback`` writes (and ``last`` looks), in words when a logger's version folder decides it."""
    if callback.dirpath:
        return str(callback.dirpath)
    if not trainer.loggers:
        return str(Path(trainer.default_root_dir) / "checkpoints")
    return "the logger's version folder (set the ModelCheckpoint's dirpath, so that a rerun looks where it wrote)"


def require_last_checkpoint(trainer: L.Trainer) -> str:
    """The last checkpoint; :class:`ResumeError` naming where it was looked for when there is none."""
    found = find_last_checkpoint(trainer)
    if found:
        return str(found)
    folders = [checkpoint_folder(callback, trainer) for callback in trainer.checkpoint_callbacks
               if isinstance(callback, ModelCheckpoint)]
    where = f"in {', '.join(map(str, folders))}" if folders else "(no ModelCheckpoint is configured)"
    raise ResumeError(f"--ckpt_path last: no last checkpoint {where}; ModelCheckpoint(save_last=true) writes "
                      "one. Pass a checkpoint file, or leave out --ckpt_path to start afresh")
