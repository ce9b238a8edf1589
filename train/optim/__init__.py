"""Optimizers with the no-decay group, and learning-rate schedules as pure functions of the step."""

from train.optim.optimizer import build_optimizer, param_groups
from train.optim.schedule import build_scheduler, lr_at

__all__ = ["build_optimizer", "build_scheduler", "lr_at", "param_groups"]
