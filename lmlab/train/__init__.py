"""Pretraining: the training loop, its optimizers and learning-rate schedules, checkpoints and resume."""
