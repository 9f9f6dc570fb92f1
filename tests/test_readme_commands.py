"""Every ``clipseg3d`` command line in README.md's code blocks still parses; the cheap fit runs.

A fit of ``experiments/tiny.yaml`` runs one batch (``--trainer.fast_dev_run=true``); the other
training commands are parsed and validated with ``--print_config``, and the tools (phantom,
index, segment, sweep, ...) with their own parser, so nothing long runs and nothing is written
into the repository.
"""

from __future__ import annotations

import importlib
import shlex

import pytest

from clipseg3d.cli.main import TOOLS, main

from conftest import REPO

README = REPO / "README.md"
TRAINING = ("fit", "validate", "test", "predict")
CHEAP_CONFIG = "experiments/tiny.yaml"


def readme_commands(text: str) -> list[str]:
    """The ``clipseg3d ...`` lines of the text's fenced code blocks, ``\\`` continuations joined."""
    commands, fenced, pending = [], False, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if not fenced or not (pending or stripped.startswith("clipseg3d ")):
            continue
        pending += stripped.removesuffix("\\").rstrip() + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            commands.append(pending)
            pending = ""
    return commands


COMMANDS = readme_commands(README.read_text())


def test_continuation_lines_are_joined_and_text_outside_code_blocks_is_left_out():
    text = ("Run `clipseg3d classes list` to see them.\n\n```bash\nmake demo\nclipseg3d fit --config a.yaml  # x\n"
            "  clipseg3d predict --config a.yaml \\\n    --ckpt_path m.ckpt   # y\n```\nclipseg3d index not code\n")
    assert readme_commands(text) == ["clipseg3d fit --config a.yaml  # x",
                                     "clipseg3d predict --config a.yaml --ckpt_path m.ckpt   # y"]
    assert len(COMMANDS) >= 10 and any(command.startswith("clipseg3d predict") for command in COMMANDS)


def parse_or_run(argv: list[str], tmp_path) -> int:
    """Run ``argv`` the cheap way (see the module docstring); returns its exit status (a parser's
    own exit, for --help, --print_config or an error, passes through as SystemExit)."""
    if argv[0] in TOOLS:
        if "--help" not in argv:  # parse with the tool's own parser, without doing the work
            importlib.import_module(TOOLS[argv[0]][0]).build_parser().parse_args(argv[1:])
            return 0
    elif argv[0] == "fit" and CHEAP_CONFIG in argv and "--print_config" not in argv:
        argv = [*argv, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"]
    elif argv[0] in TRAINING and "--print_config" not in argv:
        argv = [*argv, "--print_config"]
    return main(argv)


@pytest.mark.parametrize("command", COMMANDS, ids=[command.partition("#")[0].strip() for command in COMMANDS])
def test_readme_command_parses(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # README commands name configs relative to the repository
    argv = shlex.split(command, comments=True)[1:]
    try:
        status = parse_or_run(argv, tmp_path)
    except SystemExit as exit:  # --help and --print_config end by exiting
        status = exit.code or 0
    assert status == 0, f"{command}: {capsys.readouterr().err[-2000:]}"
