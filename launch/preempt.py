"""Which signal tells a job "save and requeue", shared by the sbatch script and the job.

submitit reads its preemption signal from ``SUBMITIT_PREEMPT_SIGNAL`` when
``submitit.core.job_environment`` is first imported (default USR2). The trainer
stops at a step boundary on SIGTERM and SIGUSR1, so we use USR1 for submitit too:
the same signal then makes SLURM (``--signal=USR1@delay``), the local controller
and the job agree.
"""

from __future__ import annotations

import os

PREEMPT_SIGNAL = "USR1"
"""Signal name without the ``SIG`` prefix, as submitit and ``sbatch --signal`` spell it."""

ENV_VAR = "SUBMITIT_PREEMPT_SIGNAL"


def use_preempt_signal() -> None:
    """Make this process and its children use :data:`PREEMPT_SIGNAL` for submitit.

    Sets the environment variable (read by job processes, which import submitit
    afresh) and the class attribute (for a submitit already imported here, whose
    sbatch text and local controller read it).
    """
    os.environ[ENV_VAR] = PREEMPT_SIGNAL
    from submitit.core.job_environment import JobEnvironment

    JobEnvironment.USR_SIG = PREEMPT_SIGNAL


def setup_lines() -> list[str]:
    """Shell lines for the sbatch script so the job uses the signal even with ``--export=NONE``."""
    return [f"export {ENV_VAR}={PREEMPT_SIGNAL}"]
