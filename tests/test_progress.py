"""The time estimate of a run budgeted by steps."""

from __future__ import annotations

import logging

import pytest

from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.training.progress import TimeEstimate

from conftest import REPO


def test_the_estimate_comes_after_the_timed_steps_and_scales_to_max_steps(tmp_path, caplog):
    estimate = TimeEstimate(after_steps=2)
    cli = lightning_main(["--config", str(REPO / "experiments" / "tiny.yaml"), "--trainer.max_steps=4",
                          "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
                          "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false"], run=False)
    cli.trainer.callbacks.append(estimate)
    with caplog.at_level(logging.INFO):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert estimate.seconds_per_step > 0
    lines = [record.getMessage() for record in caplog.records if "s/step" in record.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 steps in ") and "4 steps take about" in lines[0]


def test_the_estimate_needs_a_step():
    with pytest.raises(ValueError, match="after_steps must be at least 1"):
        TimeEstimate(after_steps=0)
