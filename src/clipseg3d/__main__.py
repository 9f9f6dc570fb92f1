"""``python -m clipseg3d`` is the ``clipseg3d`` command."""

import sys

from clipseg3d.cli.main import main

sys.exit(main())
