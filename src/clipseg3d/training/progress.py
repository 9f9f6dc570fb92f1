"""A training-time estimate, so a run budgeted by steps says early how long it will take."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class TimeEstimate(L.Callback):
    """After ``after_steps`` optimiser steps, print the measured time per step and the estimated
    total for the run's ``max_steps`` (the first steps include warm-up costs, so it errs long).

    Args:
        after_steps: how many steps to time before estimating.
    """

    def __init__(self, after_steps: int = 20):
        if after_steps < 1:
            raise ValueError(f"TimeEstimate: after_steps must be at least 1, got {after_steps}")
        self.after_steps = after_steps
        self._started: float | None = None
        self.seconds_per_step: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        done = trainer.global_step - self._first_step
        if self.seconds_per_step is not None or self._started is None or done < self.after_steps:
            return
        self.seconds_per_step = (time.perf_counter() - self._started) / done
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        left = "" if total is None else (f"; {total} steps take about "
                                        f"{self.seconds_per_step * (total - self._first_step) / 60:.1f} min here")
        rank_zero_info(f"{done} steps in {time.perf_counter() - self._started:.0f} s "
                       f"({self.seconds_per_step:.2f} s/step){left}")
