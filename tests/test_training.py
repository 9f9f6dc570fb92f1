"""The universal model learns every class from datasets that each label only half of them."""

import lightning as L
import torch

from clipseg3d.data.synthetic import SyntheticDataModule
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.training.task import UniversalSegmentation

CLASSES = ["spleen", "right_kidney", "liver", "stomach", "aorta", "pancreas"]


def test_partial_labels_train_every_class_to_high_dice(tmp_path):
    L.seed_everything(1)
    model = UniversalSegmentation(
        classes=CLASSES, lr=1e-3, warmup_steps=20, roi_size=(32, 32, 32),
        backbone=UNetBackbone(channels=(16, 32, 64, 128), strides=(2, 2, 2), out_channels=16, num_res_units=1))
    data = SyntheticDataModule(classes=CLASSES, crop_size=(32, 32, 32), train_volumes=32, val_volumes=6,
                               num_datasets=2, batch_size=2, seed=1)
    data.setup()
    labelled = torch.stack([item["labelled"] for item in data.train_set.items])
    assert labelled.sum(1).tolist() == [3] * 32  # every training volume labels half of the classes
    assert torch.all(labelled.any(0))
    trainer = L.Trainer(max_steps=400, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=1000,
                        default_root_dir=tmp_path)
    trainer.fit(model, data)
    scores = trainer.validate(model, data, verbose=False)[0]
    dice = {name: scores[f"val/dice/{name}"] for name in CLASSES}
    assert min(dice.values()) >= 0.8, dice
