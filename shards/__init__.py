"""WebDataset shard builder for image-text remote-sensing data.

``python -m shards build|inspect``; Python API in :mod:`shards.api`; the procedural
scene generator used by the demo and the trainer's in-memory source in
:mod:`shards.synthetic`.
"""

BUILDER_VERSION = "1.0.0"
