"""``clipseg3d sweep``: run a wandb sweep YAML on this machine, without a wandb server.

The same file works with ``wandb sweep`` + ``wandb agent``. Here, wandb's own search engine
(the ``sweeps`` package) validates it and suggests each trial (grid, random or Bayesian); every
trial is a real ``clipseg3d fit`` run in this process, with the sweep's ``command`` and the
trial's parameters rendered exactly as the agent renders ``${args}`` (``--model.lr=0.001``,
``--data.init_args.crop_size=[24, 24, 24]``), logged as a wandb run (offline without an API
key) named after the trial and grouped under the sweep. The metric is read after every
validation; with ``early_terminate: {type: hyperband}`` the engine's ``stop_runs`` judges each
running trial against the earlier ones and stops it early. Outputs in ``--out``:
``leaderboard.csv`` and ``leaderboard.md`` (ranked by the best value of the metric),
``trials.jsonl`` (parameters and metric history of each trial) and ``best.yaml`` (the full
config of the best trial, re-runnable with ``clipseg3d fit --config best.yaml``).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import wandb
import yaml
from jsonargparse.typing import PositiveInt
from lightning.pytorch.loggers import WandbLogger
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from clipseg3d.cli.lightning_cli import UniversalCLI, lightning_main
from clipseg3d.cli.parsing import CommandParser, command_parser, fail

with warnings.catch_warnings():  # the engine's pydantic models use the v1 configuration style
    warnings.simplefilter("ignore")
    import sweeps
    from sweeps.config.schema import fill_validate_metric

ARGS_TOKEN = "${args}"
WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"
DEFAULT_PROJECT = "clipseg3d"


class SweepError(ValueError):
    """A sweep file or a trial's arguments that cannot work."""


@dataclass
class Trial:
    """One suggested set of parameters and what its fit did.

    ``state`` is ``running``, ``finished``, ``stopped`` (early-terminated by hyperband, at
    ``stopped_epoch``) or ``failed`` (``note`` says why); ``history`` holds the metric after
    each validation.
    """

    name: str
    parameters: dict[str, Any]
    state: str = "running"
    history: list[float] = field(default_factory=list)
    stopped_epoch: int | None = None
    seconds: float = 0.0
    run_dir: str | None = None
    note: str | None = None

    def best(self, goal: str) -> float | None:
        finite = [value for value in self.history if math.isfinite(value)]
        return (max if goal == "maximize" else min)(finite) if finite else None

    def sweep_run(self, metric: str) -> sweeps.SweepRun:
        """The trial as the search engine sees a wandb run (stopped trials count as finished)."""
        state = {"running": "running", "failed": "failed"}.get(self.state, "finished")
        return sweeps.SweepRun(name=self.name, state=state, stopped=self.state == "stopped",
                               config={key: {"value": value} for key, value in self.parameters.items()},
                               sampledHistory=[{metric: value} for value in self.history],
                               summaryMetrics={metric: self.history[-1]} if self.history else {})


def _plain(value: Any) -> Any:
    """Engine suggestions (numpy scalars, nested lists) as plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def load_sweep(path: Path | str) -> dict[str, Any]:
    """Read a sweep YAML and check it with the wandb sweeps schema; the metric gets its defaults."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SweepError(f"cannot read sweep {path}: {' '.join(str(error).split())}") from error
    if not isinstance(config, dict):
        raise SweepError(f"invalid sweep {path}: expected a mapping with method, metric and parameters")
    violations = sweeps.schema_violations_from_proposed_config(config)
    if violations:
        raise SweepError(f"invalid sweep {path}: {'; '.join(violations)}")
    if "metric" not in config:
        raise SweepError(f"invalid sweep {path}: a metric (name and goal) is needed to rank the trials")
    nested = [name for name, spec in config["parameters"].items() if "parameters" in spec]
    if nested:
        raise SweepError(f"invalid sweep {path}: nested parameter groups ({', '.join(nested)}) are not supported; "
                         "use flat dotted option names such as model.lr")
    return fill_validate_metric(config)


def fit_arguments(sweep: dict[str, Any], path: Path | str, base_config: str | None = None) -> list[str]:
    """The ``clipseg3d fit`` arguments of the sweep's ``command`` (with the ``${args}`` token in
    place); ``base_config`` replaces the command's ``--config`` files."""
    command = [str(token) for token in sweep.get("command", [])]
    if command and "fit" not in command:
        raise SweepError(f"invalid sweep {path}: the command must run `clipseg3d fit ... {ARGS_TOKEN}`, "
                         f"not `{' '.join(command)}`")
    args = command[command.index("fit") + 1:] if command else [ARGS_TOKEN]
    if ARGS_TOKEN not in args:
        raise SweepError(f"invalid sweep {path}: the command has no {ARGS_TOKEN}, so the parameters would not reach "
                         "the fit")
    unknown = [token for token in args if token.startswith("${") and token != ARGS_TOKEN]
    if unknown:
        raise SweepError(f"invalid sweep {path}: {', '.join(unknown)} cannot be run locally (only {ARGS_TOKEN})")
    if base_config is not None:
        kept, skip = [], False
        for token in args:
            if not skip and token != "--config" and not token.startswith("--config="):
                kept.append(token)
            skip = token == "--config"
        args = ["--config", base_config, *kept]
    if not any(token == "--config" or token.startswith("--config=") for token in args):
        raise SweepError(f"no base config for sweep {path}: pass --config or put `--config FILE` in its command")
    return args


def render_parameters(parameters: dict[str, Any]) -> list[str]:
    """``--key=value`` flags, rendered by the wandb agent's own code for ``${args}``."""
    return create_sweep_command_args({"args": {key: {"value": value} for key, value in parameters.items()}})["args"]


def expand(args: Sequence[str], parameters: dict[str, Any]) -> list[str]:
    """``args`` with the ``${args}`` token replaced by the rendered parameters."""
    flags = render_parameters(parameters)
    return [item for token in args for item in (flags if token == ARGS_TOKEN else [token])]


@contextlib.contextmanager
def _parsing(stdout: io.StringIO | None = None) -> Iterator[None]:
    """Run the LightningCLI parser quietly; a parser error becomes a one-line :class:`SweepError`."""
    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(stdout or sys.stdout):
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            yield
    except SystemExit as exit:
        if exit.code:
            text = stderr.getvalue()
            message = " ".join(text[text.rfind("error:") + len("error:"):].split()) if "error:" in text else ""
            raise SweepError(message or f"the parser stopped with exit status {exit.code}") from None


def resolved_config(args: Sequence[str]) -> str:
    """The full YAML config that ``clipseg3d fit ARGS`` would run (its ``--print_config``)."""
    stdout = io.StringIO()
    with _parsing(stdout):
        lightning_main(["fit", *args, "--print_config"])
    return stdout.getvalue()


def _options(config: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += _options(value, f"{prefix}{key}.")
    return keys


def _has_option(config: dict[str, Any], name: str) -> bool:
    """Whether ``name`` (dotted) is a key of ``config``; like the parser, ``init_args.`` may be left out."""
    node: Any = config
    for part in name.split("."):
        if isinstance(node, dict) and part not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_parameters(names: Sequence[str], fit_config: dict[str, Any], path: Path | str) -> None:
    """Fail with one line naming the first sweep parameter that is not a ``clipseg3d fit`` option."""
    for name in names:
        if not _has_option(fit_config, name):
            close = difflib.get_close_matches(name, _options(fit_config), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SweepError(f"invalid sweep {path}: parameter {name!r} is not a `clipseg3d fit` option{hint}; "
                             "values derived by a link, like model.roi_size, follow their source option")


class TrialMonitor(L.Callback):
    """Records the sweep metric after every validation and stops the trial when hyperband says so."""

    def __init__(self, trial: Trial, sweep: dict[str, Any], earlier: Sequence[Trial]):
        self.trial = trial
        self.sweep = sweep
        self.earlier = list(earlier)
        self.metric = sweep["metric"]["name"]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.trial.history.append(float(value))
        if "early_terminate" not in self.sweep or self.trial.state != "running":
            return
        runs = [trial.sweep_run(self.metric) for trial in [*self.earlier, self.trial]]
        if any(run.name == self.trial.name for run in sweeps.stop_runs(self.sweep, runs)):
            self.trial.state = "stopped"
            self.trial.stopped_epoch = trainer.current_epoch
            trainer.should_stop = True


def _instantiate(args: Sequence[str]) -> UniversalCLI:
    with _parsing():
        return lightning_main(list(args), run=False)


def run_trial(trial: Trial, args: Sequence[str], sweep: dict[str, Any], earlier: Sequence[Trial]) -> Trial:
    """Fit with ``args`` in this process, recording the metric, and finish the trial's wandb run."""
    started = time.monotonic()
    try:
        cli = _instantiate(args)
        cli.trainer.callbacks.append(TrialMonitor(trial, sweep, earlier))
        for logger in cli.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(trial.parameters, allow_val_change=True)
                trial.run_dir = str(Path(logger.experiment.dir).parent)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if trial.state == "running":
            trial.state = "finished"
        if not trial.history:
            logged = ", ".join(sorted(cli.trainer.callback_metrics)) or "none"
            trial.note = f"metric {sweep['metric']['name']} was never logged (logged: {logged})"
    except Exception as error:  # a crashed trial is recorded, as the agent records a crashed run, and the sweep goes on
        trial.state = "failed"
        trial.note = " ".join(f"{type(error).__name__}: {error}".split())
    finally:
        trial.seconds = time.monotonic() - started
        if wandb.run is not None:
            wandb.run.summary["sweep/state"] = trial.state
            wandb.run.finish(exit_code=int(trial.state == "failed"))
    return trial


def _logger_arguments(trial: Trial, folder: Path, group: str, project: str | None) -> list[str]:
    """Arguments that log the trial to its own wandb run inside ``folder``."""
    project_args = [f"--trainer.logger.init_args.project={project}"] if project else []
    return [f"--trainer.logger={WANDB_LOGGER}", f"--trainer.logger.init_args.name={trial.name}",
            f"--trainer.logger.init_args.group={group}", f"--trainer.logger.init_args.save_dir={folder}",
            *project_args, f"--trainer.default_root_dir={folder}"]


def rank(trials: Sequence[Trial], goal: str) -> list[Trial]:
    """Trials ordered best first by the best value of the metric; those without one last."""
    sign = -1.0 if goal == "maximize" else 1.0
    return sorted(trials, key=lambda trial: (trial.best(goal) is None, sign * (trial.best(goal) or 0.0)))


def _cell(value: Any, digits: int | None = None) -> str:
    if isinstance(value, float) and digits is not None:
        return f"{value:.{digits}g}"
    return "" if value is None else str(value)


def write_leaderboard(trials: Sequence[Trial], sweep: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """``leaderboard.csv`` (full precision) and ``leaderboard.md`` in ``out``, best first; returns the rows."""
    metric, goal = sweep["metric"]["name"], sweep["metric"]["goal"]
    rows = []
    for position, trial in enumerate(rank(trials, goal), start=1):
        best = trial.best(goal)
        row = {"rank": position if best is not None else None, "trial": trial.name, "state": trial.state,
               f"{metric} (best)": best, f"{metric} (last)": trial.history[-1] if trial.history else None,
               "validations": len(trial.history), "stopped_epoch": trial.stopped_epoch,
               "seconds": round(trial.seconds, 1)}
        row.update({name: trial.parameters.get(name) for name in sweep["parameters"]})
        row.update({"wandb_run": trial.run_dir, "note": trial.note})
        rows.append(row)
    with (out / "leaderboard.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: _cell(value) for key, value in row.items()} for row in rows)
    columns = [key for key in rows[0] if key not in ("wandb_run", "note")]
    lines = [f"# Sweep {sweep.get('name', '')}: {metric} ({goal})", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[key], 4).replace("|", "\\|") for key in columns) + " |" for row in rows]
    notes = [f"- {row['trial']}: {row['note']}" for row in rows if row["note"]]
    (out / "leaderboard.md").write_text("\n".join(lines + ([""] + notes if notes else [])) + "\n")
    return rows


def run_sweep(path: Path | str, count: int, base_config: str | None = None, out: Path | str | None = None,
              extra: Sequence[str] = (), seed: int = 0) -> list[Trial]:
    """Run ``count`` trials of the sweep in ``path`` (fewer when a grid runs out) and write the outputs to ``out``."""
    sweep = load_sweep(path)
    name = sweep.get("name") or Path(path).stem
    out = Path(out) if out is not None else Path("runs") / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"sweep output folder {out} is not empty")
    args = fit_arguments(sweep, path, base_config)
    try:
        base = yaml.safe_load(resolved_config([token for token in args if token != ARGS_TOKEN]))
    except SweepError as error:
        raise SweepError(f"the fit arguments of sweep {path} do not parse: {error}") from None
    check_parameters(list(sweep["parameters"]), base, path)
    logger = (base.get("trainer") or {}).get("logger")
    base_is_wandb = isinstance(logger, dict) and logger.get("class_path") == WANDB_LOGGER
    project = sweep.get("project") or (None if base_is_wandb else DEFAULT_PROJECT)
    out.mkdir(parents=True, exist_ok=True)

    trials: list[Trial] = []
    for index in range(count):
        random.seed(seed + index)  # the engine samples with the global generators, which every fit reseeds
        np.random.seed(seed + index)
        suggestion = sweeps.next_run(sweep, [trial.sweep_run(sweep["metric"]["name"]) for trial in trials])
        if suggestion is None:
            print(f"[sweep] {name}: the grid is exhausted after {index} trials")
            break
        trial = Trial(f"trial-{index + 1:03d}", {key: _plain(spec["value"]) for key, spec in suggestion.config.items()})
        print(f"[sweep] {name} {trial.name}: {' '.join(render_parameters(trial.parameters))}", flush=True)
        trial_args = [*expand(args, trial.parameters), *_logger_arguments(trial, out / trial.name, name, project),
                      *extra]
        run_trial(trial, trial_args, sweep, trials)
        best = trial.best(sweep["metric"]["goal"])
        print(f"[sweep] {name} {trial.name}: {trial.state}, {sweep['metric']['name']} = {_cell(best, 4) or '-'}"
              + (f" ({trial.note})" if trial.note else ""), flush=True)
        trials.append(trial)
        with (out / "trials.jsonl").open("a") as handle:
            handle.write(json.dumps(asdict(trial)) + "\n")
    if trials:
        write_leaderboard(trials, sweep, out)
        best = write_best_config(trials, sweep, path, [*args, *extra], out)
        print(f"[sweep] {name}: leaderboard in {out / 'leaderboard.md'}"
              + (f", best config in {best}" if best else ", no trial logged the metric"))
    return trials


def write_best_config(trials: Sequence[Trial], sweep: dict[str, Any], path: Path | str, args: Sequence[str],
                      out: Path) -> Path | None:
    """``best.yaml``: the full fit config of the best trial (base config, its parameters and the extra
    arguments, without the sweep's logging set-up); ``None`` when no trial has a metric value."""
    metric, goal = sweep["metric"]["name"], sweep["metric"]["goal"]
    best = rank(trials, goal)[0]
    if best.best(goal) is None:
        return None
    target = out / "best.yaml"
    header = (f"# Best trial of sweep {path}: {best.name}, {metric} = {best.best(goal):.6g} ({goal})\n"
              f"# Re-run: clipseg3d fit --config {target}\n")
    target.write_text(header + resolved_config(expand(args, best.parameters)))
    return target


def build_parser() -> CommandParser:
    parser = command_parser(
        "sweep", "Run a wandb sweep YAML locally with wandb's search engine, without a server. "
        "Arguments after `--` go to every `clipseg3d fit` (after the sweep's own); paths in the "
        "sweep's command are relative to the current folder, as for `wandb agent`.", config_file=False)
    parser.add_argument("sweep", type=Path, help="the sweep YAML (as for `wandb sweep`)")
    parser.add_argument("--count", type=PositiveInt, required=True, help="how many trials to run")
    parser.add_argument("--config", help="base fit config, instead of the --config of the sweep's command")
    parser.add_argument("--out", type=Path, help="output folder; when not given, runs/sweeps/NAME-TIME")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameter suggestions")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``clipseg3d sweep SWEEP.yaml --count N [--config BASE.yaml] [--out DIR] [-- fit args]``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        trials = run_sweep(args.sweep, args.count, args.config, args.out, extra, args.seed)
    except SweepError as error:
        return fail(parser.prog, error)
    if not any(trial.history for trial in trials):
        return fail(parser.prog, "no trial produced the metric; see leaderboard.md")
    return 0
