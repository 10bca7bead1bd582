"""Probe throughput with 1 and 2 Ray workers, and the probe's cost against a fine-tuning run.

python benchmarks/probe/run.py [--full]     # same as: lfdist bench probe --tiny --out benchmarks/probe
"""

import os
import sys

from lfdist.bench.probe import run

if __name__ == "__main__":
    full = "--full" in sys.argv[1:]
    print(f"wrote {run(os.path.dirname(os.path.abspath(__file__)), tiny=not full)}")
