import subprocess
import sys

import pytest
import yaml

from clipseg3d.cli.main import lightning_main, main

from conftest import REPO

TINY = str(REPO / "experiments" / "tiny.yaml")


def test_tiny_config_fast_dev_run(tmp_path):
    assert main(["fit", "--config", TINY, "--trainer.fast_dev_run=true",
                 f"--trainer.default_root_dir={tmp_path}"]) == 0


def test_print_config_shows_every_knob(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    assert model["backbone"]["class_path"] == "clipseg3d.models.backbones.UNetBackbone"
    assert model["backbone"]["init_args"]["channels"] == [8, 16, 32, 64]
    for knob in ("text_encoder", "head_hidden", "head_channels", "head_chunk_voxels", "bce_weight", "dice_weight",
                 "lr", "weight_decay", "warmup_steps", "sw_overlap"):
        assert knob in model, knob
    assert config["data"]["init_args"]["crop_size"] == [32, 32, 32]


def test_overrides_reach_every_derived_value():
    cli = lightning_main(["--config", TINY, "--data.init_args.crop_size=[16,16,16]",
                          "--model.classes=[Liver,spleen]"], run=False)
    assert tuple(cli.model.hparams.roi_size) == (16, 16, 16)
    assert tuple(cli.model.inferer.roi_size) == (16, 16, 16)
    assert cli.model.class_names == ["liver", "spleen"]
    assert cli.datamodule.class_names == ["liver", "spleen"]
    cli.datamodule.setup("fit")
    assert cli.datamodule.train_set[0]["target"].shape == (2, 16, 16, 16)


def test_rerun_in_the_same_folder_does_not_fail_on_the_saved_config(tmp_path):
    command = [sys.executable, "-m", "clipseg3d", "fit", "--config", TINY, "--trainer.max_steps=1",
               "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}"]
    for _ in range(2):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.rglob("config.yaml"))


def test_paper_swinunetr_config_runs_one_step_with_tiny_overrides(tmp_path, tiny_clip):
    assert main(["fit", "--config", str(REPO / "experiments" / "universal_swinunetr.yaml"),
                 "--trainer.fast_dev_run=true", "--trainer.precision=32", "--trainer.accelerator=cpu",
                 f"--trainer.default_root_dir={tmp_path}", f"--model.text_encoder={tiny_clip}",
                 "--model.backbone.init_args.use_checkpoint=false",
                 "--data=clipseg3d.data.synthetic.SyntheticDataModule", "--data.init_args.crop_size=[64,64,64]",
                 "--data.init_args.train_volumes=1", "--data.init_args.val_volumes=1",
                 "--data.init_args.batch_size=1", "--data.init_args.num_workers=0"]) == 0


def test_top_level_help_lists_training_and_tools(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "fit, validate, test, predict" in out and "phantom" in out and "segment" in out
