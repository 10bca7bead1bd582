"""Predicted next to measured: gradient/optimizer bytes per rank on DDP, FSDP2, ZeRO-1/2/3,
FLOPs and activations of one step, plan (frozen prefix) against full fine-tuning.

    python benchmarks/memory/run.py            # same as: lfdist bench memory --tiny --out benchmarks/memory
"""

import os
import sys

from lfdist.bench import run_bench

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    print(run_bench("memory", out, tiny=True))
