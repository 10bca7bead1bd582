"""Model side of lfdist: load model specs, find the blocks, apply a plan."""
