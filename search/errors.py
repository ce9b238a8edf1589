"""The one exception type for a user's mistake: the CLI prints it as one line, no traceback."""

from __future__ import annotations


class SearchError(Exception):
    """Bad input (a missing file, a mismatched model, an unknown key...): the message says
    what is wrong and, where it can, what to do instead."""
