import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import sweeps
import torch
import yaml

from clipseg3d.cli.lightning_cli import lightning_main
from clipseg3d.cli.main import main as clipseg3d_main
from clipseg3d.cli.sweep import (
    ARGS_TOKEN,
    Trial,
    TrialMonitor,
    check_parameters,
    expand,
    fit_arguments,
    load_sweep,
    main,
    resolved_config,
    run_trial,
)

from conftest import REPO

SWEEP = REPO / "experiments" / "sweep.yaml"
TINY = str(REPO / "experiments" / "tiny.yaml")
# Two validations per trial on a 16^3 volume, one training step each.
FAST = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--data.init_args.train_volumes=2",
        "--data.init_args.val_volumes=1", "--data.init_args.crop_size=[16,16,16]"]
HYPERBAND = {"type": "hyperband", "min_iter": 1, "eta": 2}


def option(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def write_sweep(path, **overrides):
    sweep = {"name": "test-sweep", "method": "random", "metric": {"name": "val/loss", "goal": "minimize"},
             "early_terminate": HYPERBAND,
             "parameters": {"model.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
                            "model.head_hidden": {"values": [16, 32, 64]},
                            "model.dice_weight": {"distribution": "uniform", "min": 0.5, "max": 2.0}},
             "command": ["${env}", "clipseg3d", "fit", "--config", TINY, ARGS_TOKEN]}
    sweep.update(overrides)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_repository_sweep_is_valid_and_its_parameters_are_fit_options(monkeypatch):
    monkeypatch.chdir(REPO)  # the command names its base config relative to the repository, as `wandb agent` runs it
    sweep = load_sweep(SWEEP)  # the wandb sweeps schema accepts it
    assert sweeps.schema_violations_from_proposed_config(yaml.safe_load(SWEEP.read_text())) == []
    assert sweep["method"] in ("bayes", "random")
    assert (sweep["metric"]["name"], sweep["metric"]["goal"]) == ("val/dice_mean", "maximize")
    assert sweep["early_terminate"]["type"] == "hyperband"
    assert {"model.lr", "model.weight_decay", "model.bce_weight", "model.dice_weight", "model.head_hidden",
            "data.init_args.crop_size"} <= set(sweep["parameters"])

    args = fit_arguments(sweep, SWEEP)
    base = yaml.safe_load(resolved_config([token for token in args if token != ARGS_TOKEN]))
    check_parameters(list(sweep["parameters"]), base, SWEEP)

    np.random.seed(3)
    suggestion = sweeps.next_run(sweep, [])
    parameters = {name: np.asarray(spec["value"]).tolist() for name, spec in suggestion.config.items()}
    flags = expand(args, parameters)
    crop = parameters["data.init_args.crop_size"]
    assert f"--data.init_args.crop_size=[{crop[0]}, {crop[1]}, {crop[2]}]" in flags  # the agent's rendering
    resolved = yaml.safe_load(resolved_config(flags))
    for name, value in parameters.items():
        assert option(resolved, name) == pytest.approx(value), name


def test_crop_size_from_a_sweep_reaches_every_value_derived_from_it():
    args = expand(["--config", TINY, ARGS_TOKEN], {"data.init_args.crop_size": [16, 16, 24]})
    assert "--data.init_args.crop_size=[16, 16, 24]" in args
    cli = lightning_main(args, run=False)
    assert tuple(cli.model.hparams.roi_size) == (16, 16, 24)
    assert tuple(cli.model.inferer.roi_size) == (16, 16, 24)
    cli.datamodule.setup("fit")
    assert cli.datamodule.train_set[0]["image"].shape == (1, 16, 16, 24)
    assert cli.datamodule.val_set[0]["target"].shape == (7, 16, 16, 24)


def test_hyperband_stops_a_trial_behind_the_earlier_ones():
    sweep = {"metric": {"name": "val/loss", "goal": "minimize"}, "early_terminate": HYPERBAND}
    earlier = [Trial(f"trial-00{i}", {}, state="finished", history=[1.0, 0.5, 0.4]) for i in (1, 2)]
    good, bad = Trial("trial-003", {}), Trial("trial-004", {})
    for trial, values in ((good, [0.9, 0.3]), (bad, [1.2, 1.1])):
        monitor = TrialMonitor(trial, sweep, earlier)
        trainer = SimpleNamespace(sanity_checking=False, should_stop=False, current_epoch=0, callback_metrics={})
        for epoch, value in enumerate(values):
            trainer.current_epoch, trainer.callback_metrics = epoch, {"val/loss": torch.tensor(value)}
            monitor.on_validation_end(trainer, None)
        assert trial.history == pytest.approx(values)
        # the second value meets band 1: it must be among the best half of [0.5, 0.5, own value]
        assert trainer.should_stop == (trial is bad)
    assert (good.state, bad.state, bad.stopped_epoch) == ("running", "stopped", 1)


def test_a_stopped_trial_ends_its_fit_early(tmp_path):
    sweep = {"metric": {"name": "val/loss", "goal": "minimize"}, "early_terminate": HYPERBAND}
    earlier = [Trial(f"trial-00{i}", {}, state="finished", history=[0.0, 0.0, 0.0, 0.0]) for i in (1, 2)]
    trial = Trial("trial-003", {"model.lr": 1e-3})
    args = [*expand(["--config", TINY, ARGS_TOKEN], trial.parameters), *FAST, "--trainer.max_epochs=4",
            f"--trainer.default_root_dir={tmp_path}"]
    run_trial(trial, args, sweep, earlier)
    assert (trial.state, trial.stopped_epoch, len(trial.history)) == ("stopped", 1, 2), trial.note


def test_local_sweep_runs_ranks_and_writes_a_rerunnable_best_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(write_sweep(tmp_path / "sweep.yaml")), "--count", "3", "--out", str(out), "--", *FAST]) == 0

    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [trial["name"] for trial in trials] == ["trial-001", "trial-002", "trial-003"]
    assert len({json.dumps(trial["parameters"], sort_keys=True) for trial in trials}) == 3
    assert len({trial["parameters"]["model.lr"] for trial in trials}) == 3
    for trial in trials:
        assert trial["state"] in ("finished", "stopped") and len(trial["history"]) >= 1
        assert (out / trial["name"]).is_dir() and list((out / trial["name"]).glob("wandb/offline-run-*/run-*.wandb"))
        assert trial["run_dir"].startswith(str(out / trial["name"]))
    best_of = {trial["name"]: min(trial["history"]) for trial in trials}

    with (out / "leaderboard.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert [float(row["val/loss (best)"]) for row in rows] == sorted(best_of.values())  # minimised: smallest first
    for row in rows:
        assert float(row["val/loss (best)"]) == pytest.approx(best_of[row["trial"]])
    markdown = (out / "leaderboard.md").read_text()
    assert "| rank | trial | state | val/loss (best)" in markdown
    assert [markdown.index(row["trial"]) for row in rows] == sorted(markdown.index(row["trial"]) for row in rows)

    winner = next(trial for trial in trials if trial["name"] == rows[0]["trial"])
    best_yaml = out / "best.yaml"
    best = yaml.safe_load(best_yaml.read_text())
    assert best_yaml.read_text().startswith(f"# Best trial of sweep {tmp_path / 'sweep.yaml'}: {winner['name']}")
    assert best["model"]["lr"] == pytest.approx(winner["parameters"]["model.lr"])
    assert best["model"]["head_hidden"] == winner["parameters"]["model.head_hidden"]
    assert best["data"]["init_args"]["crop_size"] == [16, 16, 16]  # the extra fit arguments are part of the trial
    assert best["trainer"]["logger"] is False  # the sweep's own logging is not in it; the base's is
    capsys.readouterr()
    assert clipseg3d_main(["fit", "--config", str(best_yaml), f"--trainer.default_root_dir={tmp_path / 'rerun'}"]) == 0
    assert list((tmp_path / "rerun").rglob("*.ckpt"))


@pytest.mark.parametrize("change, message", [
    ({"method": "sideways"}, "'sideways' is not one of"),
    ({"metric": "val/loss"}, "invalid sweep"),
    ({"command": ["clipseg3d", "fit", "--config", TINY]}, "has no ${args}"),
    ({"parameters": {"model.lrr": {"values": [0.1, 0.2]}}}, "'model.lrr' is not a `clipseg3d fit` option (did you mean model.lr?)"),
    ({"parameters": {"model.roi_size": {"values": [[16, 16, 16]]}}}, "'model.roi_size' is not a `clipseg3d fit` option"),
])
def test_bad_sweeps_fail_with_one_line_naming_the_file(tmp_path, capsys, change, message):
    path = write_sweep(tmp_path / "bad.yaml", **change)
    assert main([str(path), "--count", "1", "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(path) in error and message in error, error
    assert not (tmp_path / "out").exists()


def test_unreadable_sweep_yaml_is_named(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("method: [random\n")
    assert main([str(path), "--count", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"cannot read sweep {path}" in error


def test_a_trial_whose_values_fit_rejects_is_recorded_as_failed(tmp_path, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", parameters={"data.init_args.crop_size": {"values": [[16, 16]]}})
    out = tmp_path / "out"
    assert main([str(path), "--count", "1", "--out", str(out), "--", *FAST[:-1]]) == 1
    assert "no trial produced the metric" in capsys.readouterr().err
    with (out / "leaderboard.csv").open() as handle:
        (row,) = csv.DictReader(handle)
    assert (row["rank"], row["state"], row["validations"]) == ("", "failed", "0")
    assert "Expected a tuple with 3 elements" in row["note"]
    assert not (out / "best.yaml").exists()
