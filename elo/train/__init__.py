"""The training loop every stage shares: options, the model build (meta device -> shards -> each rank's rows),
the loop itself, run directories and train-state checkpoints, metrics and FLOPs, and the distributed setup."""
