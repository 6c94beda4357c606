"""``python -m rankloss``: the command line (see :mod:`rankloss.cli`)."""

import sys

from .cli import main

sys.exit(main())
