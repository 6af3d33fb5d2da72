"""``python -m smsd.cli``: the ``smsd`` command."""

import sys

from . import main

sys.exit(main())
