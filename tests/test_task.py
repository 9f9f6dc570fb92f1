"""The training task: whole-scan evaluation through one sliding window, what checkpoints record,
and fine-tuning a new class in a few dozen steps (the fast counterpart of test_finetune_phantoms)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.data.synthetic import SyntheticDataModule, SyntheticDataset
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.models.checkpoint import CHECKPOINT_KEY, load_model
from clipseg3d.training.finetune import StartingHead
from clipseg3d.training.losses import PartialLabelLoss
from clipseg3d.training.task import UniversalSegmentation, warmup_cosine

from conftest import REPO

OLD = ["liver", "spleen", "right_kidney"]
NEW = "stomach"
ROI = (16, 16, 16)


def small_backbone() -> UNetBackbone:
    return UNetBackbone(channels=(8, 16, 32), strides=(2, 2), out_channels=16, num_res_units=1)


def trainer(steps: int, root, **options) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     check_val_every_n_epoch=10**6, default_root_dir=root, **options)


def synthetic(classes, spacing=(1.5, 1.5, 1.5), seed=0) -> SyntheticDataModule:
    return SyntheticDataModule(classes=classes, crop_size=ROI, spacing=spacing, train_volumes=8, val_volumes=2,
                               num_datasets=1, batch_size=2, seed=seed)


@pytest.fixture(scope="module")
def random_task() -> UniversalSegmentation:
    torch.manual_seed(0)
    return UniversalSegmentation(classes=OLD, backbone=small_backbone(), head_hidden=32, roi_size=ROI).eval()


@pytest.fixture(scope="module")
def random_ckpt(random_task, tmp_path_factory):
    """The untrained task's checkpoint (its old classes predict widely: Dice well above 0)."""
    path = tmp_path_factory.mktemp("random") / "random.ckpt"
    checkpoint = {"state_dict": random_task.state_dict()}
    random_task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory):
    """A start fitted for 15 steps on the old classes (1.5 mm synthetic volumes): enough for
    informative features and a head that predicts background where it knows nothing."""
    root = tmp_path_factory.mktemp("start")
    L.seed_everything(0)
    task = UniversalSegmentation(classes=OLD, backbone=small_backbone(), head_hidden=32, roi_size=ROI, lr=3e-3,
                                 warmup_steps=5)
    fit = trainer(15, root)
    fit.fit(task, synthetic(OLD))
    fit.save_checkpoint(root / "start.ckpt")
    return root / "start.ckpt"


def test_validation_and_test_score_each_labelled_scan_and_class_from_the_inferer(random_task, tmp_path):
    items = SyntheticDataset(OLD, 3, ROI, seed=5).items
    labelled = [[True, True, False], [False, True, True], [True, False, True]]
    for item, marks in zip(items, labelled):
        item["labelled"] = torch.tensor(marks)
    loader = DataLoader(items, batch_size=1)
    val = trainer(1, tmp_path).validate(random_task, loader, verbose=False)[0]
    test = trainer(1, tmp_path).test(random_task, loader, verbose=False)[0]

    dice, losses = {name: [] for name in OLD}, []
    with torch.no_grad():
        for item in items:
            logits = random_task.infer_logits(item["image"][None])
            assert len(logits) == len(OLD) and all(volume.dtype == torch.float16 for volume in logits)
            for k, name in enumerate(OLD):
                if item["labelled"][k]:
                    predicted, truth = (logits[k] > 0).numpy(), item["target"][k].numpy() > 0
                    dice[name].append(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))
                    losses.append(PartialLabelLoss()(logits[k][None, None].float(), item["target"][None, k:k + 1],
                                                     torch.ones(1, 1, dtype=torch.bool)))
    for name in OLD:
        assert len(dice[name]) == 2
        expected = float(np.mean(dice[name]))
        assert expected > 0.01
        assert val[f"val/dice/{name}"] == pytest.approx(expected, rel=1e-6)
        assert test[f"test/dice/{name}"] == pytest.approx(expected, rel=1e-6)
    mean_dice = float(np.mean([np.mean(scores) for scores in dice.values()]))
    assert val["val/dice_mean"] == pytest.approx(mean_dice, rel=1e-6) == test["test/dice_mean"]
    # one pair per scan and batch: the epoch's loss is the mean over the scans of their pairs' mean
    per_scan = [torch.stack(losses[2 * i:2 * i + 2]).mean() for i in range(3)]
    assert val["val/loss"] == pytest.approx(float(torch.stack(per_scan).mean()), rel=1e-5)


def test_predict_gives_float16_probabilities_per_item_and_class(random_task):
    images = torch.rand(2, 1, *ROI, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = random_task.predict_step({"image": images}, 0)
        assert len(predicted) == 2 and all(len(item) == len(OLD) for item in predicted)
        for image, item in zip(images, predicted):
            for volume, logits in zip(item, random_task.infer_logits(image[None])):
                assert volume.dtype == torch.float16 and volume.shape == ROI
                assert torch.equal(volume, logits.sigmoid())


def test_head_finetuning_reports_the_old_classes_start_and_drift(random_ckpt, tmp_path):
    task = UniversalSegmentation(classes=[*OLD, NEW], init_from=str(random_ckpt), finetune="head", lr=1e-2,
                                 warmup_steps=1, roi_size=ROI)
    assert isinstance(task.starting_head, StartingHead) and task.starting_head.class_names == OLD
    data = synthetic([*OLD, NEW])
    at_start = trainer(1, tmp_path).validate(task, data, verbose=False)[0]
    for name in OLD:
        assert at_start[f"val/dice/{name}"] > 0.01
        assert at_start[f"val/dice_start/{name}"] == at_start[f"val/dice/{name}"]
        assert at_start[f"val/dice_drift/{name}"] == 0.0
    trainer(5, tmp_path).fit(task, data)
    after = trainer(1, tmp_path).validate(task, data, verbose=False)[0]
    drifts = []
    for name in OLD:
        assert after[f"val/dice_start/{name}"] == pytest.approx(at_start[f"val/dice/{name}"], rel=1e-6)
        drift = after[f"val/dice/{name}"] - after[f"val/dice_start/{name}"]
        assert after[f"val/dice_drift/{name}"] == pytest.approx(drift, abs=1e-6)
        drifts.append(drift)
    assert max(abs(drift) for drift in drifts) > 1e-3  # five steps at a high rate move the old classes
    assert after["val/dice_drift_mean"] == pytest.approx(float(np.mean(drifts)), abs=1e-6)


def test_adapter_finetuning_learns_a_new_class_and_leaves_the_rest_bit_for_bit(start_ckpt, tmp_path):
    """What test_finetune_phantoms checks over minutes, in seconds: the backbone bit for bit, the old
    classes' logits unchanged, and the new class's Dice rising from where it starts."""
    start, _ = load_model(start_ckpt)
    image = torch.rand(1, 1, *ROI, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        old_logits = start(image)
    L.seed_everything(0)
    task = UniversalSegmentation(classes=[*OLD, NEW], init_from=str(start_ckpt), finetune="new_classes", lr=1e-2,
                                 weight_decay=0.0, warmup_steps=5, roi_size=ROI)
    assert task.starting_head is None and task.new_classes == [NEW]
    data = synthetic([*OLD, NEW], seed=1)
    before = trainer(1, tmp_path).validate(task, data, verbose=False)[0]
    trainer(30, tmp_path).fit(task, data)
    after = trainer(1, tmp_path).validate(task, data, verbose=False)[0]

    tuned = task.model.eval()
    for (name, weight), (start_name, start_weight) in zip(tuned.backbone.state_dict().items(),
                                                          start.backbone.state_dict().items()):
        assert name == start_name and torch.equal(weight, start_weight), name
    with torch.no_grad():
        assert torch.equal(tuned(image)[:, :len(OLD)], old_logits)
    for name in OLD:
        assert after[f"val/dice/{name}"] == before[f"val/dice/{name}"], name
    assert after[f"val/dice/{NEW}"] >= 0.4 and after[f"val/dice/{NEW}"] - before[f"val/dice/{NEW}"] >= 0.3, \
        (before, after)


def test_the_adapter_of_a_new_class_is_under_one_percent_of_a_default_model(tmp_path):
    torch.manual_seed(0)
    base = UniversalSegmentation(classes=OLD, roi_size=ROI)  # the default U-Net and head
    path = tmp_path / "base.ckpt"
    checkpoint = {"state_dict": base.state_dict()}
    base.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    task = UniversalSegmentation(classes=[*OLD, NEW], init_from=str(path), finetune="new_classes", roi_size=ROI)
    trainable, total = task.parameter_counts()
    model = task.model
    own = [model.class_residuals[0], *model.head.adapters[0].parameters()]
    assert trainable == sum(param.numel() for param in own)
    assert total == sum(param.numel() for param in model.parameters())
    assert trainable / total < 0.01, (trainable, total)


def test_python_fit_records_the_datamodule_preprocessing_and_warns_when_it_differs(start_ckpt, tmp_path):
    meta = torch.load(start_ckpt, weights_only=False)[CHECKPOINT_KEY]
    assert meta["preprocessing"] == {"roi_size": list(ROI), "sw_overlap": 0.5, "spacing": [1.5, 1.5, 1.5],
                                     "hu_window": [0.0, 1.0], "orientation": "RAS", "foreground_margin": None}

    def finetune(spacing) -> list[str]:
        task = UniversalSegmentation(classes=[*OLD, NEW], init_from=str(start_ckpt), finetune="new_classes",
                                     roi_size=ROI)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(1, tmp_path, limit_val_batches=0).fit(task, synthetic([*OLD, NEW], spacing))
        assert task.preprocessing.spacing == spacing
        return [str(w.message) for w in caught if "init_from" in str(w.message)]

    assert finetune((1.5, 1.5, 1.5)) == []
    assert finetune((2.0, 2.0, 3.0)) == [f"init_from {start_ckpt}: the checkpoint was trained with spacing "
                                         "(1.5, 1.5, 1.5); the data give spacing (2.0, 2.0, 3.0)"]


def test_cli_fit_records_the_datamodule_preprocessing(tmp_path):
    cli = lightning_main(["fit", "--config", str(REPO / "experiments" / "tiny.yaml"), "--trainer.max_steps=1",
                          "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
                          f"--trainer.default_root_dir={tmp_path}", "--data.init_args.crop_size=[16,16,16]",
                          "--data.init_args.spacing=[2.0,2.0,3.0]", "--data.init_args.train_volumes=2",
                          "--data.init_args.val_volumes=1"])
    cli.trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    meta = torch.load(tmp_path / "tiny.ckpt", weights_only=False)[CHECKPOINT_KEY]
    assert meta["preprocessing"] == {"roi_size": [16, 16, 16], "sw_overlap": 0.5, "spacing": [2.0, 2.0, 3.0],
                                     "hu_window": [0.0, 1.0], "orientation": "RAS", "foreground_margin": None}


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_its_floor():
    factor = warmup_cosine(warmup_steps=3, total_steps=11, min_factor=0.1)
    assert [factor(step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(7) == 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * 0.5))
    assert factor(11) == factor(50) == pytest.approx(0.1, rel=1e-15)
    assert all(factor(step) > factor(step + 1) for step in range(3, 11))


# Samples of datasets that label different classes: the head runs per sample (sample 1 labels
# nothing: no pass for it); of overlapping ones: once over the classes some sample labels.
@pytest.mark.parametrize("labelled, head_passes", [
    ([[True, False, True, False], [False, False, False, False], [False, True, True, True]], [(1, 2), (1, 3)]),
    ([[True, True, False, False], [True, True, True, False], [False, False, False, False]], [(3, 3)]),
])
def test_a_training_step_runs_the_head_on_labelled_classes_only_with_the_full_heads_loss_and_gradients(
        labelled, head_passes):
    torch.manual_seed(0)
    task = UniversalSegmentation(classes=OLD + [NEW], backbone=small_backbone(), head_hidden=32, roi_size=ROI)
    task.log = lambda *args, **kwargs: None
    image = torch.randn(3, 1, *ROI)
    target = (torch.rand(3, 4, *ROI) > 0.7).to(torch.uint8)
    labelled = torch.tensor(labelled)
    batch = {"image": image, "target": target, "labelled": labelled}
    head_classes = []
    hook = task.model.head.register_forward_hook(lambda module, args, out: head_classes.append(out.shape[:2]))

    def loss_and_gradients(step):
        task.zero_grad()
        loss = step()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in task.model.head.named_parameters()}

    fast = loss_and_gradients(lambda: task.training_step(batch, 0))
    assert head_classes == head_passes
    full = loss_and_gradients(lambda: task.loss(task.model(image), target, labelled))
    hook.remove()
    torch.testing.assert_close(fast[0], full[0], rtol=1e-5, atol=0)
    for name, gradient in full[1].items():
        scale = gradient.abs().max().item()
        assert scale > 0, name
        # float32 sums over ~10^4 voxels in either order: a few hundred ulps of the largest entry
        torch.testing.assert_close(fast[1][name], gradient, rtol=0, atol=1e-4 * scale, msg=name)
