"""The LightningCLI of ``clipseg3d fit | validate | test | predict``: :class:`UniversalSegmentation`
and any LightningDataModule, YAML configs with ``--config``, ``--print_config``."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

from clipseg3d.catalog import load_catalog
from clipseg3d.cli.parsing import quiet_gpu_decoder_notices
from clipseg3d.models.class_matching import resolve_class_names
from clipseg3d.training.resume import require_last_checkpoint
from clipseg3d.training.task import UniversalSegmentation


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
