"""The base of every error that is the user's to fix (a config, a path, a file, a checkpoint).

Command lines print such an error as one line and exit with status 2; anything else is a
bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message alone tells the user what to change."""


class PeerError(RuntimeError):
    """A block that must succeed on every rank failed on some rank (this one or another);
    the message names the ranks and their errors (see :meth:`train.core.collectives.Comm.agreement`)."""


class PeerLostError(PeerError):
    """A collective failed because a peer rank went away mid-run (its process died, its node
    was lost): nothing on this rank is wrong, and the job can resume from its last complete
    checkpoint (a SLURM requeue, torchrun ``--max-restarts``)."""
