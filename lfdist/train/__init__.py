"""Training: one explicit loop (loop.py), data feeding, checkpoints, export, evaluation."""
