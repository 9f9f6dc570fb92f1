"""Freed memory kept between training steps (see :mod:`clipseg3d.inference.heap`)."""

from __future__ import annotations

import lightning as L

from clipseg3d.inference.heap import keep_freed_memory, release_freed_memory


class FreedMemoryKept(L.Callback):
    """Keeps freed blocks for the next step from the start of training to its end, or to the
    exception that ends it (so a failed fit in a notebook does not keep the memory)."""

    def __init__(self) -> None:
        self._holding = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._holding:
            keep_freed_memory()
            self._holding = True

    def _release(self) -> None:
        if self._holding:
            release_freed_memory()
            self._holding = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()
