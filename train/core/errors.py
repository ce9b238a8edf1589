"""The base of every error that is the user's to fix (a config, a path, a file, a checkpoint).

Command lines print such an error as one line and exit with status 2; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message alone tells the user what to change."""


class PeerError(RuntimeError):
    """A block that must succeed on every rank failed on some rank (this one or another);
    the message names the ranks and their errors (see :meth:`train.core.collectives.Comm.agreement`)."""
