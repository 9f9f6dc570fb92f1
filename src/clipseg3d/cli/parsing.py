"""The parser every ``clipseg3d`` tool is built on, the one-line ``error:`` format they share, and
the library notices every command silences.

A tool's parser is a jsonargparse :class:`~jsonargparse.ArgumentParser` (positional inputs,
``nargs`` lists, ``store_true`` flags and typed options as in argparse, plus ``--config FILE``
and ``--print_config``). An unusable command line ends with one line,
``clipseg3d TOOL: error: MESSAGE``, and exit status 2; a failure of the work itself is reported
in the same format by :func:`fail`, with exit status 1.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import NoReturn

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter


def error_line(prog: str, message: object) -> str:
    """``PROG: error: MESSAGE`` on one line."""
    return f"{prog}: error: {' '.join(str(message).split())}"


def fail(prog: str, message: object) -> int:
    """Print the error line of a failed run to stderr; returns the exit status 1."""
    print(error_line(prog, message), file=sys.stderr)
    return 1


class CommandHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with plain type names: ``Path``, not ``<class 'Path'>``."""

    def _get_type_str(self, action) -> str | None:
        hint = action.type if action.type is not None else getattr(action, "_typehint", None)
        return hint.__name__ if isinstance(hint, type) else super()._get_type_str(action)


class CommandParser(ArgumentParser):
    """A tool's parser: an unusable command line exits with status 2 and one error line."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(error_line(parser.prog.replace(" [options]", ""), message), file=sys.stderr)
        self.exit(2)


def command_parser(tool: str, description: str, epilog: str | None = None,
                   config_file: bool = True) -> CommandParser:
    """The parser of ``clipseg3d TOOL``; with ``config_file`` it reads options from ``--config FILE`` (YAML)."""
    parser = CommandParser(prog=f"clipseg3d {tool}", description=description, epilog=epilog,
                           formatter_class=CommandHelpFormatter)
    if config_file:
        parser.add_argument("--config", action=ActionConfigFile,
                            help="a YAML file of these options (keys as --print_config writes them)")
    return parser


def quiet_gpu_decoder_notices() -> None:
    """Silence MONAI's notice, repeated for every image loader, that the GPU DICOM decoder is absent."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
