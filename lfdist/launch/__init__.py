"""Launching: pure (argv, env) builders for torchrun and deepspeed, and the per-rank worker."""
