"""``python -m rung arch ...``: the same command line as the ``rung`` script."""

import sys

from rung.cli import main

sys.exit(main())
