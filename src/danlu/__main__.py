"""``python -m danlu``: the ``danlu`` command."""

import sys

from danlu.cli.main import main

sys.exit(main())
