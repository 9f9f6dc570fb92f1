import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from clipseg3d.cli import demo
from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.cli.main import TOOLS, main

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


PARSED_ALIKE = list(TOOLS)
SEGMENT = ["segment", "scan.nii.gz", "--ckpt", "model.ckpt", "-o", "out"]
UNUSABLE = [  # (tool arguments, what the error line says)
    (["phantom", "--out", "x", "--cases", "2", "--seed", "0", "--bogus"], "unrecognized arguments: --bogus"),
    (["phantom", "--out", "x", "--cases", "two", "--seed", "0"], 'Parser key "cases"'),
    (["phantom", "--out", "x", "--cases", "2", "--seed", "0", "--site", "moon"], "invalid choice: 'moon'"),
    (["phantom", "--out", "x", "--cases", "2", "--seed", "0", "--lesion-contrast", "spleen_lesion=-60"],
     "expected CLASS=LOW,HIGH"),
    (["index", "btcv", "/data/BTCV"], "the following arguments are required: output"),
    (["index", "btcv", "/data/BTCV", "-o", "x.jsonl", "--bogus"], "unrecognized arguments: --bogus"),
    (["classes", "list", "--kind", "vessel"], "invalid choice: 'vessel'"),
    (["classes", "sort"], "invalid choice: 'sort'"),
    (["sweep", "experiments/sweep.yaml", "--count", "0"], "0 does not conform to restriction v>0"),
    (["sweep", "experiments/sweep.yaml"], "the following arguments are required: count"),
    (["demo", "--max-steps", "many"], 'Parser key "max_steps"'),
    (["demo", "--real-case", "."], "expected ct.nii.gz and labels.nii.gz"),
    (["segment", "scan.nii.gz", "-o", "out"], "the following arguments are required: ckpt"),
    (["segment", "--ckpt", "model.ckpt", "-o", "out"], "the following arguments are required: inputs"),
    (SEGMENT + ["--device", "tpu"], "invalid choice: 'tpu'"),
    (SEGMENT + ["--roi", "16", "16"], "argument --roi: expected 3 arguments"),
    (SEGMENT + ["--threshold", "2"], "--threshold 2.0: must be in (0, 1]"),
    (SEGMENT + ["--overlap", "1"], "--overlap 1.0: must be in [0, 1)"),
    (SEGMENT + ["--sw-batch", "0"], "--sw-batch 0: must be at least 1"),
]


@pytest.mark.parametrize("argv, message", UNUSABLE, ids=lambda value: " ".join(value) if isinstance(value, list)
                         else None)
def test_an_unusable_option_exits_2_with_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit.value.code == 2 and captured.out == ""
    prog = "clipseg3d " + " ".join(argv[:2] if argv[0] == "classes" and argv[1] == "list" else argv[:1])
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and message in lines[0], captured.err


@pytest.mark.parametrize("tool", PARSED_ALIKE)
def test_every_tool_has_the_same_help_layout(tool, capsys):
    with pytest.raises(SystemExit) as exit:
        main([tool, "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert out.startswith(f"usage: clipseg3d {tool} ")
    assert re.search(r"^  -h, --help +Show this help message and exit\.$", out, re.MULTILINE)
    assert "<class" not in out  # types by name: "type: Path"


def test_tool_options_come_from_a_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["phantom", "--out", str(tmp_path / "p"), "--cases", "3", "--seed", "4", "--spacing", "5", "5", "6",
              "--no-tumours", "--lesion-contrast", "spleen_lesion=-60,-30", "--print_config"])
    saved = capsys.readouterr().out
    options = yaml.safe_load(saved)
    assert (options["cases"], options["spacing"], options["no_tumours"]) == (3, [5.0, 5.0, 6.0], True)
    assert options["lesion_contrast"] == ["spleen_lesion=-60,-30"]
    (tmp_path / "phantom.yaml").write_text(saved)
    with pytest.raises(SystemExit):
        main(["phantom", "--config", str(tmp_path / "phantom.yaml"), "--seed", "5", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == {**options, "seed": 5}  # the command line overrides the file

    root = tmp_path / "Task09_Spleen"
    for name in ("imagesTr/spleen_2.nii.gz", "labelsTr/spleen_2.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    (tmp_path / "index.yaml").write_text(f"dataset: msd_task09_spleen\nroot: {root}\noutput: {tmp_path / 'm.jsonl'}\n")
    assert main(["index", "--config", str(tmp_path / "index.yaml")]) == 0
    assert [json.loads(line)["case"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == ["spleen_2"]


def test_the_demo_finds_the_real_case_by_option_variable_or_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(demo.REAL_CASE_VARIABLE, raising=False)
    assert demo.find_real_case(None) is None
    case = tmp_path / "project" / "shared" / "data" / "totalseg-case"
    case.mkdir(parents=True)
    (case / "ct.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="expected ct.nii.gz and labels.nii.gz"):
        demo.find_real_case(case)
    (case / "labels.nii.gz").write_bytes(b"")
    assert demo.find_real_case(case) == case
    monkeypatch.setenv(demo.REAL_CASE_VARIABLE, str(case))
    assert demo.find_real_case(None) == case
    monkeypatch.delenv(demo.REAL_CASE_VARIABLE)
    monkeypatch.chdir(tmp_path / "project")
    assert demo.find_real_case(None) == Path("shared/data/totalseg-case")
    (tmp_path / "project" / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "project" / "repo")
    assert demo.find_real_case(None) == Path("../shared/data/totalseg-case")


def test_the_demo_config_is_a_fit_config_of_the_demo_classes(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(demo.CONFIG), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["classes"] == demo.model_classes()
    assert set(demo.GOAL_CLASSES) <= set(demo.model_classes())
    assert not (REPO / "experiments" / "demo.yaml").exists()  # one copy, the packaged one


def test_the_demo_runs_from_an_installed_package_outside_the_repository(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp_path), str(project)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    site = tmp_path / "site"
    zipfile.ZipFile(next(tmp_path.glob("clipseg3d-*.whl"))).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site)}
    probe = ("import clipseg3d.cli.demo as demo; from clipseg3d.cli.main import main; "
             "print(demo.__file__, demo.CONFIG, demo.CONFIG.is_file()); main(['demo', '--help'])")
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=environment, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    module, config, exists = result.stdout.splitlines()[0].split()
    assert module.startswith(str(site)) and config == str(site / "clipseg3d" / "configs" / "demo.yaml")
    assert exists == "True"
    assert "usage: clipseg3d demo" in result.stdout and "--max-steps" in result.stdout
    assert "runs/demo" in result.stdout  # outputs go to ./runs/demo of the current folder


@pytest.mark.slow
def test_a_small_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DATASETS", {name: (2, seed, classes, required)
                                           for name, (_, seed, classes, required) in demo.DATASETS.items()})
    monkeypatch.setattr(demo, "HELD_OUT", ("heldout", 1, *demo.HELD_OUT[2:]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(demo.REAL_CASE_VARIABLE, raising=False)
    assert main(["demo", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "fitted 2 steps" in out and "Real CT check" not in out
    dice_table, detection_table = out.split("Tumour detection")
    rows = [line.split(" | ")[0].removeprefix("| ") for line in dice_table.splitlines() if line.startswith("| ")][1:]
    assert rows == demo.model_classes()
    tumours = [line.split(" | ")[0].removeprefix("| ") for line in detection_table.splitlines()
               if line.startswith("| ")][1:]
    assert tumours == ["liver_tumor", "kidney_tumor"] and "liver_tumor sensitivity: " in out
    case = tmp_path / "runs" / "demo" / "segmentations" / "heldout_000"
    assert (tmp_path / "runs" / "demo" / "demo.ckpt").is_file() and (case / "labels.nii.gz").is_file()
