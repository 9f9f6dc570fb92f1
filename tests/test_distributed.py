"""Distributed training: ``clipseg3d fit`` under DDP (2 CPU processes, gloo) on phantoms whose two
datasets label different classes, placed so that the two processes score different classes.

The fit runs as a subprocess (inside pytest, Lightning would launch pytest again for the second
process); :class:`MetricsProbe` and :class:`PredictProbe` (callbacks the subprocesses import from
this module) write what each process logged or predicted. The samplers, the cache filled once and
the synchronised Dice are also checked directly, in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn, TrainerState
from torchmetrics.segmentation import DiceScore

from clipseg3d.cli.main import main
from clipseg3d.data.datamodule import CTDataModule, ManifestError
from clipseg3d.data.distributed import persistent_part
from clipseg3d.data.index import index_dataset
from clipseg3d.phantom import write_dataset
from clipseg3d.training.metrics import ClassDice

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CLI = [sys.executable, "-m", "clipseg3d.cli.main"]
SPACING = [8.0, 8.0, 8.0]
ORGANS = ["spleen", "liver"]       # labelled by dataset "organs"
KIDNEYS = ["right_kidney", "left_kidney"]  # labelled by dataset "kidneys"
CLASSES = [*ORGANS, *KIDNEYS, "stomach"]   # stomach: labelled by neither


class MetricsProbe(Callback):
    """Writes ``folder/rank<R>.json``: the validation metrics process ``R`` logged and how many
    validation batches it ran."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        record = {"metrics": metrics, "batches": sum(trainer.num_val_batches)}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def manifest(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict:
    """Training and validation manifests; validation runs organs, kidneys, organs, so that under
    2 processes rank 0 scores the organs (cases 0 and 2) and rank 1 the kidneys (case 1)."""
    folder = tmp_path_factory.mktemp("phantoms")
    records = {}
    for name, classes, cases, seed in (("organs", ORGANS, 4, 1), ("kidneys", KIDNEYS, 3, 2)):
        dataset = write_dataset(folder / name, cases, seed, spacing=SPACING, classes=classes, name=name,
                                tumours=False)
        records[name] = index_dataset(str(dataset / f"{name}.yaml"), dataset)
    organs, kidneys = records["organs"], records["kidneys"]
    return {"train": [manifest(folder / "train_organs.jsonl", organs[:2]),
                      manifest(folder / "train_kidneys.jsonl", kidneys[:2])],
            "val": [manifest(folder / "val_organs_a.jsonl", organs[2:3]),
                    manifest(folder / "val_kidneys.jsonl", kidneys[2:3]),
                    manifest(folder / "val_organs_b.jsonl", organs[3:4])],
            "images": [organs[2]["image"], kidneys[2]["image"], organs[3]["image"]]}


def config(manifests: dict, root: Path) -> Path:
    settings = {
        "seed_everything": 0,
        # a learning rate so small that the Dice stay those of the random start (neither 0 nor 1)
        "model": {"classes": CLASSES, "embedding_cache": str(root / "embeddings"), "warmup_steps": 1,
                  "lr": 1e-6, "sw_overlap": 0.25,
                  "backbone": {"class_path": "clipseg3d.models.backbones.UNetBackbone",
                               "init_args": {"channels": [8, 16, 32], "strides": [2, 2], "out_channels": 8,
                                             "num_res_units": 0}}},
        "data": {"class_path": "clipseg3d.data.datamodule.CTDataModule",
                 "init_args": {"manifests": manifests["train"], "val_manifests": manifests["val"],
                               "spacing": SPACING, "crop_size": [24, 24, 24], "samples_per_volume": 1,
                               "batch_size": 1, "samples_per_epoch": 4, "cache": "disk",
                               "cache_dir": str(root / "data-cache")}},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root / "run"),
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(root / "checkpoints"), "filename": "best",
                                       "monitor": "val/dice_mean", "mode": "max"}}]},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


class PredictProbe(Callback):
    """Writes ``folder/rank<R>.json``: the scans process ``R`` predicted (and so wrote)."""

    def __init__(self, folder: str):
        self.folder, self.paths = Path(folder), []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.paths += batch["image_path"]

    def on_predict_end(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.paths))


def probe(folder: Path, name: str = "MetricsProbe") -> list[str]:
    return [f"--trainer.callbacks+=test_distributed.{name}", f"--trainer.callbacks.folder={folder}"]


def run_ddp(args: list[str], cwd: Path) -> None:
    """``clipseg3d ARGS`` in 2 processes (DDP, gloo, CPU), as a subprocess."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    command = [*CLI, *args, "--trainer.strategy=ddp", "--trainer.devices=2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def read_probe(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def test_ddp_fit_scores_as_one_process_and_its_checkpoint_segments(manifests, tmp_path):
    cfg = config(manifests, tmp_path)
    run_ddp(["fit", "--config", str(cfg), *probe(tmp_path / "ddp")], tmp_path)
    ranks = [read_probe(tmp_path / "ddp", rank) for rank in (0, 1)]
    assert [rank["batches"] for rank in ranks] == [2, 1]  # organs, organs | kidneys: none padded in
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # the same keys and values on both processes
    dice = [key for key in ranks[0]["metrics"] if key.startswith("val/dice/")]
    assert sorted(dice) == sorted(f"val/dice/{name}" for name in ORGANS + KIDNEYS)  # stomach: no Dice
    assert len(list((tmp_path / "data-cache").glob("*.pt"))) == 7  # every case cached

    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    validate = ["validate", "--config", str(cfg), "--trainer.devices=1", f"--ckpt_path={ckpt}"]
    assert main([*validate, *probe(tmp_path / "single")]) == 0
    single = read_probe(tmp_path / "single", 0)["metrics"]
    assert sorted(single) == sorted(ranks[0]["metrics"])
    for key, value in single.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key

    assert main(["segment", manifests["images"][0], "--ckpt", str(ckpt), "-o", str(tmp_path / "segmented")]) == 0
    assert (tmp_path / "segmented" / "organs_002" / "labels.nii.gz").is_file()


@pytest.mark.slow
def test_ddp_predict_writes_each_scan_once(manifests, tmp_path):
    cfg = config(manifests, tmp_path)
    assert main(["fit", "--config", str(cfg)]) == 0  # one process
    images = ",".join(manifests["images"])
    run_ddp(["predict", "--config", str(cfg), "--config", str(REPO / "experiments" / "predict.yaml"),
             f"--trainer.callbacks.output_dir={tmp_path / 'predicted'}", *probe(tmp_path / "probe", "PredictProbe"),
             f"--ckpt_path={tmp_path / 'checkpoints' / 'best.ckpt'}",
             f"--data.init_args.predict_inputs=[{images}]"], tmp_path)
    shares = [json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert shares == [manifests["images"][0::2], manifests["images"][1:2]]  # each scan on one process
    assert sorted(path.name for path in (tmp_path / "predicted").iterdir()) == ["kidneys_002", "organs_002", "organs_003"]


class Processes:
    """What the data need of a Lightning trainer: the number of processes, this one's rank, the stage."""

    def __init__(self, world_size: int, global_rank: int):
        self.world_size, self.global_rank = world_size, global_rank
        self.state = TrainerState(fn=TrainerFn.FITTING)


def datamodule(manifests: dict, **options) -> CTDataModule:
    return CTDataModule(manifests=manifests["train"], val_manifests=manifests["val"], classes=CLASSES,
                        spacing=SPACING, crop_size=[24, 24, 24], predict_inputs=manifests["images"], **options)


def test_evaluation_and_prediction_give_each_case_to_one_process(manifests):
    data = datamodule(manifests)
    data.setup("fit")
    val, predicted = {}, {}
    for rank in (0, 1):
        data.trainer = Processes(2, rank)
        val[rank] = list(data.val_dataloader().sampler)
        loader = data.predict_dataloader()
        predicted[rank] = [loader.dataset.paths[index] for index in loader.sampler]
    assert val == {0: [0, 2], 1: [1]}  # organs, organs | kidneys: nothing padded in, nothing twice
    assert sorted(predicted[0] + predicted[1]) == sorted(Path(image) for image in manifests["images"])
    data.trainer = Processes(4, 0)
    with pytest.raises(ManifestError, match=r"validation \(.*val_organs_a.jsonl.*\): 3 case\(s\) for 4 processes"):
        data.val_dataloader()
    with pytest.raises(ManifestError, match=r"predict_inputs: 3 case\(s\) for 4 processes"):
        data.predict_dataloader()


def test_prepare_data_caches_every_case_and_under_ddp_a_memory_cache_goes_to_disk(manifests, tmp_path):
    data = datamodule(manifests, cache="memory", cache_dir=str(tmp_path))
    data.trainer = Processes(2, 0)
    with pytest.warns(UserWarning, match=f"cache='memory' would build and hold a copy in each of 2 processes.*{tmp_path}"):
        data.prepare_data()
    assert len(list(tmp_path.glob("*.pt"))) == 7  # 4 training and 3 validation cases
    assert all(persistent_part(dataset) is not None for dataset in data.val_sets)


def test_class_dice_is_dice_score_and_merges_across_processes():
    generator = torch.Generator().manual_seed(0)
    scans = [(torch.rand(3, 6, 5, 4, generator=generator) > 0.6, torch.rand(3, 6, 5, 4, generator=generator) > 0.5)
             for _ in range(5)]
    for prediction, target in scans[:2]:
        prediction[1], target[1] = False, False  # class 1 absent from two scans: no Dice there, not 0
    reference = [DiceScore(num_classes=1, average="none", input_format="one-hot") for _ in range(3)]
    whole, first, second = ClassDice(4), ClassDice(4), ClassDice(4)
    for index, (prediction, target) in enumerate(scans):
        for k in range(3):  # class 3 never scored
            reference[k].update(prediction[k][None, None], target[k][None, None])
            whole.update(k, prediction[k], target[k])
            (first if index % 2 else second).update(k, prediction[k], target[k])
    first.sums.merge_state(second.sums)  # what synchronising two processes' states does
    expected = [metric.compute().squeeze() for metric in reference]
    for scores in (whole.compute(), first.compute()):
        assert scores[3] is None
        torch.testing.assert_close(torch.stack(scores[:3]), torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert whole.compute() == [None] * 4  # computing starts afresh
