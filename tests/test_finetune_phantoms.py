"""Adding a class to a trained model on phantoms: the spleen-lesion plugin, fine-tuned head-only.

A model fitted on organs and liver tumours learns the phantom's spleen lesions (at least 15 mm,
30-60 HU darker than the spleen) from the spleen-lesion plugin's prompt. Head-only
(``new_classes``) fine-tuning must leave the backbone bit for bit and the old classes' logits as
they were while the new class learns; whole-head fine-tuning must report the old classes' drift.
Training crops are seeded, so a run repeats on one machine: with a 500-step start model at 4 mm
the lesion's held-out Dice goes from 0.09 to 0.78 either way; whole-head, the kidneys drift by up
to -0.31 unless ``keep_old_classes`` holds the old classes to the start (then within 0.02)
(BENCHMARKS.md).

These fits take minutes, so the module is ``slow`` (``make test-slow``); the default run keeps what
it guards through tests/test_task.py: the backbone and the old classes' logits bit for bit, the
adapter under 1% of a default model, a new class's Dice rising, the drift metrics.
"""

import logging

import lightning as L
import pytest
import torch

from clipseg3d.cli.main import main
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.index import index_dataset, write_manifest
from clipseg3d.inference.sliding_window import class_predictor
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.models.checkpoint import load_model
from clipseg3d.phantom import write_dataset
from clipseg3d.training.task import UniversalSegmentation

from conftest import REPO
from plugins import SPLEEN_LESION, install_packaged

pytestmark = pytest.mark.slow

BASE_CLASSES = ["spleen", "liver", "right_kidney", "left_kidney", "liver_tumor"]
NEW = "spleen_lesion"
SPACING = (4.0, 4.0, 4.0)
CROP = (64, 64, 48)  # at 4 mm most of the body: every step sees the spleen in context
LESION_MM = 15.0
LESION_CONTRAST = {NEW: (-60.0, -30.0)}  # near water, as cysts and abscesses; the default is fainter


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The spleen-lesion plugin installed for this module's tests."""
    site = install_packaged(tmp_path_factory.mktemp("site") / "site", SPLEEN_LESION)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(site))
        yield site


def manifest(folder, name: str, cases: int, seed: int, classes: list[str], required: tuple[str, ...]):
    dataset = write_dataset(folder / name, cases, seed, classes=classes, name=name, extra_classes=[NEW],
                            require_tumours=required, min_tumour_mm=LESION_MM, lesion_contrast=LESION_CONTRAST)
    path = folder / f"{name}.jsonl"
    write_manifest(index_dataset(str(dataset / f"{name}.yaml"), dataset), path)
    return str(path)


@pytest.fixture(scope="module")
def manifests(plugin, tmp_path_factory):
    """Training sets for the start model and for the lesion, and a fully labelled held-out set."""
    folder = tmp_path_factory.mktemp("phantoms")
    return {
        "base": manifest(folder, "base", 10, 1, BASE_CLASSES, ("liver_tumor",)),
        "lesion": manifest(folder, "lesion", 8, 2, ["spleen", NEW], (NEW,)),
        "heldout": manifest(folder, "heldout", 3, 3, [*BASE_CLASSES, NEW], (NEW,)),
    }


def data(manifests, train: str, classes: list[str]) -> CTDataModule:
    return CTDataModule(manifests=[manifests[train]], val_manifests=[manifests["heldout"]], classes=classes,
                        spacing=SPACING, crop_size=CROP, samples_per_volume=1, batch_size=2,
                        positive_fraction=0.9, tumour_crop_weight=10.0, cache="memory", samples_per_epoch=40)


def trainer(steps: int, root) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     check_val_every_n_epoch=10**6, gradient_clip_val=1.0, default_root_dir=root)


def dice(task: UniversalSegmentation, datamodule: CTDataModule, root) -> dict[str, float]:
    return trainer(1, root).validate(task, datamodule, verbose=False)[0]


@pytest.fixture(scope="module")
def start_ckpt(manifests, tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    L.seed_everything(0)
    task = UniversalSegmentation(classes=BASE_CLASSES, lr=3e-3, warmup_steps=20, roi_size=CROP, sw_overlap=0.25,
                                 backbone=UNetBackbone(channels=(16, 32, 64, 128), strides=(2, 2, 2),
                                                       out_channels=16, num_res_units=1))
    fit = trainer(500, root)
    fit.fit(task, data(manifests, "base", BASE_CLASSES))
    fit.save_checkpoint(root / "start.ckpt")
    return root / "start.ckpt"


def finetune(start_ckpt, manifests, mode: str, lr: float, steps: int, root, caplog, **options):
    L.seed_everything(0)
    classes = [*BASE_CLASSES, NEW]
    task = UniversalSegmentation(classes=classes, init_from=str(start_ckpt), finetune=mode, lr=lr,
                                 weight_decay=0.0, warmup_steps=20, roi_size=CROP, sw_overlap=0.25, **options)
    datamodule = data(manifests, "lesion", classes)
    before = dice(task, datamodule, root)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer(steps, root).fit(task, datamodule)
    after = dice(task, datamodule, root)
    report = next(record.getMessage() for record in caplog.records
                  if record.getMessage().startswith("trainable parameters"))
    return task, before, after, report


@pytest.fixture(scope="module")
def fixed_input() -> torch.Tensor:
    return torch.rand(1, 1, *CROP, generator=torch.Generator().manual_seed(5))


def test_head_only_finetuning_learns_the_lesion_and_leaves_the_rest_alone(start_ckpt, manifests, fixed_input,
                                                                           tmp_path, caplog):
    start, _ = load_model(start_ckpt)
    with torch.no_grad():
        old_logits = start.eval()(fixed_input)
    task, before, after, report = finetune(start_ckpt, manifests, "new_classes", 3e-3, 300, tmp_path, caplog)

    tuned = task.model.eval()
    for (name, weight), (start_name, start_weight) in zip(tuned.backbone.state_dict().items(),
                                                          start.backbone.state_dict().items()):
        assert name == start_name and torch.equal(weight, start_weight), name
    with torch.no_grad():
        # the old classes run as the same group of the same head as before: bit for bit
        assert torch.equal(tuned(fixed_input)[:, :len(BASE_CLASSES)], old_logits)
        assert torch.equal(class_predictor(tuned, range(len(BASE_CLASSES)))(fixed_input), old_logits)
    share = float(report.split("(")[1].split("%")[0])
    assert share < 5.0, report
    for name in BASE_CLASSES:
        assert after[f"val/dice/{name}"] == pytest.approx(before[f"val/dice/{name}"], abs=1e-6), name
    gained = after[f"val/dice/{NEW}"] - before.get(f"val/dice/{NEW}", 0.0)
    assert after[f"val/dice/{NEW}"] >= 0.5 and gained >= 0.4, (before, after)


def test_whole_head_finetuning_learns_the_lesion_and_reports_drift(start_ckpt, manifests, tmp_path, caplog):
    task, before, after, report = finetune(start_ckpt, manifests, "head", 1e-3, 300, tmp_path, caplog)
    assert "finetune=head" in report
    assert after[f"val/dice/{NEW}"] >= 0.7, after
    for name in BASE_CLASSES:
        drift = after[f"val/dice_drift/{name}"]
        assert drift == pytest.approx(after[f"val/dice/{name}"] - after[f"val/dice_start/{name}"], abs=1e-6)


def test_whole_head_finetuning_keeping_the_old_classes_learns_the_lesion_without_drift(start_ckpt, manifests,
                                                                                       tmp_path, caplog):
    _, _, after, _ = finetune(start_ckpt, manifests, "head", 1e-3, 300, tmp_path, caplog, keep_old_classes=1.0)
    assert after[f"val/dice/{NEW}"] >= 0.7, after
    for name in BASE_CLASSES:
        assert abs(after[f"val/dice_drift/{name}"]) < 0.05, (name, after)


def test_finetune_plugin_config_adds_the_lesion_to_a_checkpoint(start_ckpt, manifests, tmp_path, caplog):
    """experiments/finetune_plugin.yaml as the README runs it, on this module's start model and data."""
    classes = ",".join([*BASE_CLASSES, NEW])
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        assert main(["fit", "--config", str(REPO / "experiments" / "finetune_plugin.yaml"),
                     f"--model.init_from={start_ckpt}", f"--model.classes=[{classes}]",
                     f"--data.init_args.manifests=[{manifests['lesion']}]",
                     f"--data.init_args.spacing=[{','.join(map(str, SPACING))}]", "--trainer.fast_dev_run=true",
                     f"--trainer.default_root_dir={tmp_path}"]) == 0
    report = next(record.getMessage() for record in caplog.records
                  if record.getMessage().startswith("trainable parameters"))
    assert report.endswith(f"finetune=new_classes, new classes: {NEW}")
