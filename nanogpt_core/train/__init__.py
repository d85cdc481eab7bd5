"""Training: running an experiment, the trainer, checkpoints and resume, optimization, metrics."""
