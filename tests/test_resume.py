"""A fit killed mid-epoch and resumed with ``--ckpt_path last`` ends with the weights and optimizer state
of an uninterrupted fit; ``last`` that finds nothing is an error; the paper configs save what resuming needs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from monai.data import Dataset
from monai.transforms import RandGaussianNoised
from torch.utils.data import DistributedSampler

from clipseg3d.cli.main import main
from clipseg3d.data.datamodule import CTDataModule
from clipseg3d.data.sampling import (
    PositionSampler,
    ResumableDataLoader,
    SeededConcatDataset,
    global_random_state,
    set_global_random_state,
)
from clipseg3d.files import load_torch_data

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.yaml")
SAMPLES_PER_EPOCH, SAVE_EVERY, KILL_AT, MAX_STEPS = 5, 3, 7, 12  # killed in epoch 1, resumed from step 6


class PerturbAndKill(L.Callback):
    """Moves a weight by draws from torch's, numpy's and Python's global generators after each step (so
    the fit depends on them) and SIGKILLs its own process after step ``kill_at``."""

    def __init__(self, kill_at: int = 0):
        self.kill_at = kill_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        draw = torch.rand(()).item() + np.random.rand() + random.random()
        with torch.no_grad():
            next(pl_module.parameters()).view(-1)[0] += 1e-4 * draw
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def toy_loader(workers: int, seed: int = 3) -> ResumableDataLoader:
    """Two datasets of constant images whose items get Gaussian noise from MONAI's per-transform state."""
    noise = RandGaussianNoised(keys="image", prob=1.0)
    parts = [Dataset([{"image": np.full((1, 4), float(k))} for k in range(first, first + 3)], noise)
             for first in (0, 10)]
    return ResumableDataLoader(SeededConcatDataset(parts), PositionSampler([1.0] * 3 + [3.0] * 3, 7, seed=seed),
                               batch_size=2, num_workers=workers)


def epochs(loader: ResumableDataLoader, first: int, last: int) -> list[torch.Tensor]:
    """The batches of epochs ``first..last``."""
    batches = []
    for epoch in range(first, last + 1):
        loader.sampler.set_epoch(epoch)
        batches += [batch["image"] for batch in loader]
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumed_mid_epoch_hands_out_the_batches_of_an_uninterrupted_one(workers):
    uninterrupted = epochs(toy_loader(0), 0, 2)
    assert len(uninterrupted) == 12 and not torch.equal(uninterrupted[0], uninterrupted[4])
    interrupted = toy_loader(workers)
    interrupted.sampler.set_epoch(1)
    for _, _ in zip(range(2), interrupted):
        pass
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (1, 4)
    resumed = toy_loader(workers)
    resumed.load_state_dict(state)
    rest = [batch["image"] for batch in resumed] + epochs(resumed, 2, 2)
    assert len(rest) == 6  # two of epoch 1 (the last one a single sample) and four of epoch 2
    assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[6:], strict=True))
    other = epochs(toy_loader(0, seed=4), 0, 2)
    assert not any(torch.equal(a, b) for a, b in zip(other, uninterrupted) if a.shape == b.shape)


def test_processes_share_out_an_epochs_draws_each_with_the_seed_it_has_in_one_process():
    weights = [1.0, 2.0, 3.0, 4.0]
    single = list(PositionSampler(weights, 6, seed=1))
    assert len({seed for _, seed in single}) == 6 and len({index for index, _ in single}) > 1
    shares = [PositionSampler(weights, 6, seed=1, num_replicas=2, rank=rank) for rank in (0, 1)]
    assert [len(share) for share in shares] == [3, 3]
    assert [list(share) for share in shares] == [single[0::2], single[1::2]]
    shares[1].start = 2  # resumed after two of its draws
    assert list(shares[1]) == single[5::2] and list(shares[1]) == single[1::2]  # then whole epochs again
    shares[0].set_epoch(1)
    assert list(shares[0]) != single[0::2]


def test_global_random_states_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(global_random_state(), tmp_path / "state.pt")
    drawn = torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]
    set_global_random_state(load_torch_data(tmp_path / "state.pt"))
    again = torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]


def test_ckpt_path_last_that_finds_nothing_fails_with_one_line_before_training(tmp_path, capsys):
    code = main(["fit", "--config", TINY, "--ckpt_path", "last", f"--trainer.default_root_dir={tmp_path}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert error[-1].startswith("clipseg3d fit: error: --ckpt_path last: no last checkpoint in ")
    assert f"no last checkpoint in {tmp_path / 'checkpoints'};" in error[-1]
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("config", ["universal_unet.yaml", "universal_swinunetr.yaml"])
def test_paper_configs_save_last_every_n_steps_in_a_fixed_folder_and_the_best_by_dice(config, capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "experiments" / config), f"--trainer.default_root_dir={tmp_path}",
              "--print_config"])
    assert done.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    checkpoints = [callback["init_args"] for callback in trainer["callbacks"]
                   if callback["class_path"].endswith("ModelCheckpoint")]
    last = [c for c in checkpoints if c["save_last"]]
    best = [c for c in checkpoints if c["monitor"] == "val/dice_mean"]
    assert len(last) == 1 and last[0]["every_n_train_steps"] > 0
    assert len(best) == 1 and best[0]["mode"] == "max" and best[0]["save_top_k"] >= 1
    assert {c["dirpath"] for c in checkpoints} == {f"{tmp_path}/checkpoints"}  # follows default_root_dir


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("resume")
    assert main(["phantom", "--out", str(folder / "data"), "--cases", "2", "--seed", "5", "--spacing", "6", "6", "6",
                 "--name", "resume", "--no-tumours"]) == 0
    assert main(["index", str(folder / "data" / "resume.yaml"), str(folder / "data"), "-o",
                 str(folder / "resume.jsonl")]) == 0
    return str(folder / "resume.jsonl")


def test_under_ddp_each_process_loads_its_own_share_of_the_draws(manifest):
    data = CTDataModule(manifests=[manifest], val_manifests=[manifest], classes=["liver", "spleen"],
                        spacing=(6.0, 6.0, 6.0), samples_per_epoch=6, seed=2)
    data.setup("fit")
    data.trainer = SimpleNamespace(world_size=2, global_rank=1)  # what the data read of a Lightning trainer
    share = data.train_dataloader().sampler
    assert isinstance(share, DistributedSampler)  # so Lightning does not put its own sampler in
    assert (share.num_replicas, share.rank, len(share)) == (2, 1, 3)
    data.trainer = None
    assert list(share) == list(data.train_dataloader().sampler)[1::2]  # one process's draws 1, 3, 5


def fit_config(manifest: str, root: Path, kill_at: int) -> Path:
    """A tiny U-Net on the phantom manifest, one loader worker, last.ckpt every SAVE_EVERY steps."""
    config = {
        "seed_everything": 0,
        "model": {"classes": ["liver", "spleen"], "warmup_steps": 2,
                  "backbone": {"class_path": "clipseg3d.models.backbones.UNetBackbone",
                               "init_args": {"channels": [8, 16, 32], "strides": [2, 2], "out_channels": 8,
                                             "num_res_units": 1}}},
        "data": {"class_path": "clipseg3d.data.datamodule.CTDataModule",
                 "init_args": {"manifests": [manifest], "val_manifests": [manifest], "spacing": [6.0, 6.0, 6.0],
                               "crop_size": [32, 32, 32], "samples_per_volume": 1, "batch_size": 1,
                               "samples_per_epoch": SAMPLES_PER_EPOCH, "cache": "memory", "num_workers": 1}},
        "trainer": {"max_steps": MAX_STEPS, "accelerator": "cpu", "devices": 1, "logger": False,
                    "deterministic": True, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(root),
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                                       "every_n_train_steps": SAVE_EVERY, "save_top_k": 0}},
                        {"class_path": "test_resume.PerturbAndKill", "init_args": {"kill_at": kill_at}}]},
    }
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def start_fit(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "clipseg3d", "fit", "--config", str(config)], cwd=config.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def fit_here(config: Path, *extra: str) -> list[str]:
    """Fit in this process (one torch thread, as in the subprocess); the warnings it gave."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["fit", "--config", str(config), *extra]) == 0
    finally:
        torch.set_num_threads(threads)
    return [str(warning.message) for warning in caught]


def test_a_fit_killed_mid_epoch_resumes_to_the_weights_and_optimizer_of_an_uninterrupted_fit(manifest, tmp_path):
    killed = start_fit(fit_config(manifest, tmp_path / "killed", kill_at=KILL_AT))  # a real process, SIGKILLed
    fit_here(fit_config(manifest, tmp_path / "uninterrupted", kill_at=0))
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    saved = load_torch_data(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == KILL_AT // SAVE_EVERY * SAVE_EVERY  # step 6: epoch 1, one sample in
    assert {k: saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0][k] for k in ("epoch", "position")} == \
        {"epoch": 1, "position": KILL_AT // SAVE_EVERY * SAVE_EVERY - SAMPLES_PER_EPOCH}

    caught = fit_here(fit_config(manifest, tmp_path / "killed", kill_at=0), "--ckpt_path", "last")
    assert not [message for message in caught if "not resumable" in message]
    expected, got = (load_torch_data(tmp_path / run / "checkpoints" / "last.ckpt") for run in ("uninterrupted", "killed"))
    assert expected["global_step"] == got["global_step"] == MAX_STEPS
    assert expected["state_dict"].keys() == got["state_dict"].keys()
    assert all(torch.equal(expected["state_dict"][key], got["state_dict"][key]) for key in expected["state_dict"])
    first, second = (checkpoint["optimizer_states"][0] for checkpoint in (expected, got))
    assert first["state"].keys() == second["state"].keys() and first["param_groups"] == second["param_groups"]
    assert all(torch.equal(first["state"][p][name], second["state"][p][name])
               for p in first["state"] for name in first["state"][p])
