"""Launch training runs: SLURM through submitit, single-node multi-process locally.

``python -m launch slurm|local|status ...``. Every path runs the same
:class:`launch.task.TrainTask`, whose ``checkpoint()`` requeues the job and relies
on the trainer's ``train.resume=auto`` to continue from the exact step.
"""
