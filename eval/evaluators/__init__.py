"""Built-in evaluators; importing this package registers them (see eval.registry)."""

from eval.evaluators import linear_probe, mlp_probe, retrieval, zeroshot  # noqa: F401
