"""The DeepSpeed engine (``train.engine=deepspeed``): ZeRO 1/2/3 behind the engine protocol,
its JSON config (:mod:`.config`), the 0-dim parameter workaround (:mod:`.params`) and the
offline export of sharded checkpoints (:mod:`.export`). Importing this package registers
the engine; it imports deepspeed only when an engine is built."""

from train.engines.deepspeed.engine import DeepSpeedEngine

__all__ = ["DeepSpeedEngine"]
