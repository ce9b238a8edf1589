"""What the trainer's loop uses around each step: atomic checkpoints, metrics and logging,
preemption signals."""
