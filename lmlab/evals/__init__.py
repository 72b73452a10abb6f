"""Evaluation: tasks in, metrics out. Generates through lmlab.infer; never imports lmlab.train."""
