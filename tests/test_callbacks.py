import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb
import yaml
from PIL import Image

from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.inference.overlay import class_colour
from clipseg3d.training.callbacks import (
    GAP_PX,
    HEADER_PX,
    LABEL_PX,
    ContourImages,
    pick_slices,
)

from conftest import REPO

SHAPE = (16, 16, 8)  # X, Y, Z
SCALE = 4  # panel_px 64 / 16 voxels


class ImageLogger:
    def __init__(self):
        self.calls = []

    def log_image(self, key, images, step=None, **kwargs):
        self.calls.append({"key": key, "images": [np.asarray(image) for image in images], "step": step, **kwargs})


class FixedPrediction:
    """A module whose predict_step returns fixed probabilities [B, K, *S], as the task does: per
    volume, a list of K float16 volumes."""

    def __init__(self, probabilities: torch.Tensor, class_names):
        self.probabilities = [list(volume.half().unbind(0)) for volume in probabilities]
        self.class_names = class_names
        self.calls = 0

    def predict_step(self, batch, batch_idx):
        self.calls += 1
        return self.probabilities


def box(x, y, z):
    mask = np.zeros(SHAPE, bool)
    mask[slice(*x), slice(*y), slice(*z)] = True
    return mask


def rectangle_outline(rows, cols, size=(SHAPE[1] * SCALE, SHAPE[0] * SCALE)):
    """The one-pixel outline of pixel rows [r0, r1) x columns [c0, c1) in a panel."""
    outline = np.zeros(size, bool)
    outline[rows[0]:rows[1], cols[0]:cols[1]] = True
    outline[rows[0] + 1:rows[1] - 1, cols[0] + 1:cols[1] - 1] = False
    return outline


def panel(image, row, column):
    height, width = SHAPE[1] * SCALE, SHAPE[0] * SCALE
    top, left = HEADER_PX + row * (height + GAP_PX), LABEL_PX + column * (width + GAP_PX)
    return image[top:top + height, left:left + width]


def painted(panel_rgb, k):
    return np.all(panel_rgb == np.array(class_colour(k), np.uint8), axis=-1)


def test_pick_slices_spreads_over_the_slices_with_structures():
    assert pick_slices(box((0, 4), (0, 4), (2, 6))[None], 3) == [2, 4, 5]
    gap = np.stack([box((0, 4), (0, 4), (0, 2)), box((0, 4), (0, 4), (6, 8))])  # nothing in slices 2..5
    assert pick_slices(gap, 2) == [1, 7]
    assert pick_slices(np.zeros((1, *SHAPE), bool), 2) == [2, 6]


def test_contours_are_drawn_where_true_and_predicted_masks_are():
    truth = np.stack([box((2, 6), (8, 14), (2, 6)), box((0, 16), (0, 16), (0, 8))])  # class 1 is not labelled
    predicted = np.stack([box((4, 8), (8, 14), (2, 6)), box((10, 13), (2, 5), (3, 5))])
    image = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    batch = {"image": torch.from_numpy(image)[None, None], "target": torch.from_numpy(truth)[None].float(),
             "labelled": torch.tensor([[True, False]])}
    module = FixedPrediction(torch.from_numpy(predicted)[None].float() * 0.9, ["liver", "spleen"])
    logger = ImageLogger()
    callback = ContourImages(every_n_epochs=2, num_volumes=1, num_slices=3, panel_px=64)
    trainer = SimpleNamespace(loggers=[logger], sanity_checking=False, current_epoch=0, global_step=7)

    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    assert logger.calls == [] and module.calls == 0  # epoch 0 of every 2: nothing

    trainer.current_epoch = 1
    callback.on_validation_epoch_start(trainer, module)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    callback.on_validation_batch_end(trainer, module, None, batch, 1)  # num_volumes=1: the second is not drawn
    assert len(logger.calls) == 1 and module.calls == 1
    call = logger.calls[0]
    assert call["key"] == "val/contours" and call["step"] == 7 and "epoch 1" in call["caption"][0]
    montage = call["images"][0]

    # rows are slices z = 2, 4, 5; panels show x reversed in columns and y reversed in rows (axial from the feet)
    liver_truth = rectangle_outline(rows=((16 - 14) * SCALE, (16 - 8) * SCALE), cols=((16 - 6) * SCALE, (16 - 2) * SCALE))
    liver_predicted = rectangle_outline(rows=((16 - 14) * SCALE, (16 - 8) * SCALE), cols=((16 - 8) * SCALE, (16 - 4) * SCALE))
    for row in range(3):
        np.testing.assert_array_equal(painted(panel(montage, row, 0), 0), liver_truth)
        np.testing.assert_array_equal(painted(panel(montage, row, 1), 0), liver_predicted)
        assert not painted(panel(montage, row, 0), 1).any()  # unlabelled class: no true contour
    spleen_predicted = rectangle_outline(rows=((16 - 5) * SCALE, (16 - 2) * SCALE), cols=((16 - 13) * SCALE, (16 - 10) * SCALE))
    np.testing.assert_array_equal(painted(panel(montage, 1, 1), 1), spleen_predicted)  # z = 4 crosses it
    assert not painted(panel(montage, 0, 1), 1).any()  # z = 2 does not


def test_without_an_image_logger_it_warns_once_and_skips_the_work():
    module = FixedPrediction(torch.zeros(1, 1, *SHAPE), ["liver"])
    batch = {"image": torch.zeros(1, 1, *SHAPE), "target": torch.zeros(1, 1, *SHAPE)}
    trainer = SimpleNamespace(loggers=[object()], sanity_checking=False, current_epoch=0, global_step=0)
    callback = ContourImages()
    with pytest.warns(UserWarning, match="log_image") as record:
        for epoch in range(3):
            trainer.current_epoch = epoch
            callback.on_validation_epoch_start(trainer, module)
            callback.on_validation_batch_end(trainer, module, None, batch, 0)
    assert len([w for w in record if "ContourImages" in str(w.message)]) == 1
    assert module.calls == 0


def test_tiny_wandb_config_logs_metrics_learning_rate_and_contours_offline(tmp_path):
    lightning_main([
        "fit", "--config", str(REPO / "experiments" / "tiny_wandb.yaml"), "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.crop_size=[16,16,16]",
        "--data.init_args.train_volumes=2", "--data.init_args.val_volumes=1"])
    run_dir, mode = wandb.run.dir, wandb.run.settings.mode
    wandb.finish()
    assert mode == "offline"
    images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/contours_*.png"))
    assert len(images) == 1, run_dir
    assert Image.open(images[0]).width == LABEL_PX + 2 * 192 + GAP_PX  # two 192-pixel panels: truth, prediction
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    keys = (b"lr-AdamW", b"train/loss", b"val/dice_mean", b"val/dice/liver", b"val/contours")
    assert missing_keys(record, keys) == []


def missing_keys(record, keys, timeout=10.0):
    """Keys absent from an offline run's records file (which keeps metric names verbatim); the wandb
    service process may still be flushing it just after ``wandb.finish``, so wait a little."""
    deadline = time.monotonic() + timeout
    while True:
        logged = record.read_bytes()
        missing = [key for key in keys if key not in logged]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def test_tiny_wandb_is_tiny_plus_tracking():
    configs = [yaml.safe_load((REPO / "experiments" / name).read_text()) for name in ("tiny.yaml", "tiny_wandb.yaml")]
    for config in configs:
        for key in ("logger", "callbacks", "default_root_dir"):
            config["trainer"].pop(key, None)
    assert configs[0] == configs[1]
