"""The ``clipseg3d`` command.

``fit | validate | test | predict`` go to the LightningCLI of :mod:`clipseg3d.cli.lightning_cli`. The package's own
tools (:data:`TOOLS`: ``phantom``, ``index``, ``segment``, ``demo``, ...) have their own parsers,
built on :mod:`clipseg3d.cli.parsing`, under the same entry point.
"""

from __future__ import annotations

import importlib
import os
import sys

from clipseg3d.cli.parsing import quiet_gpu_decoder_notices

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


def _usage() -> str:
    tools = "\n".join(f"  {name:<9} {help}" for name, (_, help) in TOOLS.items())
    return ("usage: clipseg3d {fit,validate,test,predict} --config CONFIG.yaml [...]\n"
            f"       clipseg3d TOOL [...]\n\ntraining (LightningCLI; --help for each):\n"
            f"  fit, validate, test, predict\n\ntools:\n{tools}\n")


def use_huge_pages() -> None:
    """Let PyTorch back large CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE``,
    unless already set): a fresh 96^3 window's activations otherwise cost a page fault per 4 KiB,
    which on a 2-core machine doubled the U-Net's forward time. PyTorch reads the setting at its
    first allocation, so this runs before any tensor exists."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    use_huge_pages()
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
    # imported here: the tools need neither Lightning nor the training code (seconds of imports)
    from clipseg3d.cli.lightning_cli import lightning_main
    from clipseg3d.data.datamodule import ManifestError
    from clipseg3d.models.class_matching import ClassMatchError
    from clipseg3d.training.resume import ResumeError

    try:
        lightning_main(None if from_command_line else argv)
    except (ManifestError, ClassMatchError, ResumeError) as err:  # bad training data or class name: one line, no traceback
        print(f"clipseg3d {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
