"""Engines: one whole optimizer step behind one protocol, chosen once per run by name.

``ddp`` (:mod:`.ddp`) is always available; ``deepspeed`` (:mod:`.deepspeed`) registers itself
when imported. Both are built from the same :class:`~train.engines.base.EngineParts`.
"""

from train.engines.base import Engine, EngineParts, build_engine, register_engine
from train.engines.ddp import DDPEngine

__all__ = ["DDPEngine", "Engine", "EngineParts", "build_engine", "register_engine"]
