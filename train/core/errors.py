"""The base of every error that is the user's to fix (a config, a path, a file, a checkpoint).

Command lines print such an error as one line and exit with status 2; anything else is a
bug and keeps its traceback.
"""

import os
import sys


class UserError(Exception):
    """Bad input: the message alone tells the user what to change."""


class PeerError(RuntimeError):
    """A block that must succeed on every rank failed on some rank (this one or another);
    the message names the ranks and their errors (see :meth:`train.core.collectives.Comm.agreement`)."""


class PeerLostError(PeerError):
    """A collective failed because a peer rank went away mid-run (its process died, its node
    was lost): nothing on this rank is wrong, and the job can resume from its last complete
    checkpoint (a SLURM requeue, torchrun ``--max-restarts``)."""


def say(line: str) -> None:
    """Write one line to stderr in one system call.

    The ranks of a node share one stderr; ``print`` writes the text and its newline
    separately, so two ranks reporting at once ran their lines together.
    """
    data = (line + "\n").encode()
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a descriptor (a test's capture)
        sys.stderr.write(line + "\n")
        return
    while data:
        data = data[os.write(fd, data):]
