"""The ``danlu`` command line (``danlu arena``, ``danlu list``)."""

from danlu.cli.main import main

__all__ = ["main"]
