"""What every other part of ``train`` stands on: typed config, where a process sits in the
job (:mod:`.distenv`), the one owner of collectives (:mod:`.collectives`), RNG capture
(:mod:`.rng`), stable seeds, the run-directory layout (:mod:`.rundir`), durable files and the
torchvision import fix. Nothing here imports another part of ``train``."""
