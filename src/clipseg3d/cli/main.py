"""The ``clipseg3d`` command.

``fit | validate | test | predict`` go to a LightningCLI over :class:`UniversalSegmentation` and
any LightningDataModule (YAML configs with ``--config``, ``--print_config``). The package's own
tools (:data:`TOOLS`: ``phantom``, ``index``, ``segment``, ``demo``, ...) have their own parsers,
built on :mod:`clipseg3d.cli.parsing`, under the same entry point.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI

from clipseg3d.catalog import load_catalog
from clipseg3d.data.datamodule import ManifestError
from clipseg3d.models.class_matching import ClassMatchError, resolve_class_names
from clipseg3d.training.resume import ResumeError, require_last_checkpoint
from clipseg3d.training.task import UniversalSegmentation

TOOLS = {
    "phantom": ("clipseg3d.cli.phantom", "write synthetic CT phantom datasets"),
    "index": ("clipseg3d.cli.index", "index a public dataset folder into a manifest"),
    "segment": ("clipseg3d.cli.segment", "segment CT scans with a trained checkpoint"),
    "classes": ("clipseg3d.cli.classes", "list and check the class catalog and plugins"),
    "sweep": ("clipseg3d.cli.sweep", "run a wandb sweep locally, without a server"),
    "evaluate": ("clipseg3d.cli.evaluate", "score segment outputs against ground-truth labels"),
    "import-weights": ("clipseg3d.cli.import_weights", "import released Universal Model / SuPreM weights"),
    "info": ("clipseg3d.cli.info", "describe a checkpoint: classes, preprocessing, provenance"),
    "demo": ("clipseg3d.cli.demo", "phantoms, fit, segmentation and a Dice table, end to end"),
}


class UniversalCLI(LightningCLI):
    """LightningCLI with the links that keep derived values in step with their source."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.classes", "data.init_args.classes")
        parser.link_arguments("data.init_args.crop_size", "model.roi_size")

    def before_fit(self) -> None:
        """``--ckpt_path last`` that finds no checkpoint is an error, before anything trains."""
        if self.config_init[self.subcommand].get("ckpt_path") == "last":
            require_last_checkpoint(self.trainer)

    def before_instantiate_classes(self) -> None:
        """``model.classes`` given in plain words become catalog names (and so the data's linked
        classes), one ``note:`` line on stderr per name matched by similarity."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        names = config.get("model.classes")
        if not names:
            return
        resolved, notes = resolve_class_names(names, load_catalog(), config.get("model.text_encoder"))
        for note in notes:
            print(f"note: model.classes: {note}", file=sys.stderr)
        config["model.classes"] = resolved
        if config.get("data.init_args.classes") == names:
            config["data.init_args.classes"] = resolved


def quiet_gpu_decoder_notices() -> None:
    """Silence MONAI's notice, repeated for every image loader, that the GPU DICOM decoder is absent."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


def lightning_main(args: list[str] | None = None, run: bool = True) -> UniversalCLI:
    """The LightningCLI; with ``run=False`` it only parses and instantiates (no subcommand)."""
    quiet_gpu_decoder_notices()
    return UniversalCLI(
        UniversalSegmentation,
        run=run,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
    )


def _usage() -> str:
    tools = "\n".join(f"  {name:<9} {help}" for name, (_, help) in TOOLS.items())
    return ("usage: clipseg3d {fit,validate,test,predict} --config CONFIG.yaml [...]\n"
            f"       clipseg3d TOOL [...]\n\ntraining (LightningCLI; --help for each):\n"
            f"  fit, validate, test, predict\n\ntools:\n{tools}\n")


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    quiet_gpu_decoder_notices()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    if argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        return module.main(argv[1:])
    try:
        lightning_main(None if from_command_line else argv)
    except (ManifestError, ClassMatchError, ResumeError) as err:  # bad training data or class name: one line, no traceback
        print(f"clipseg3d {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
