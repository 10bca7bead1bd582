"""Predicted per-rank memory of Llama-3.1-8B/70B plans at 8-512 GPUs (cost model, no weights).

Run: python benchmarks/scale/run.py [--out benchmarks/scale]   (seconds, CPU, nothing downloaded)
Writes scale.json, scale.md and scale.png; see README.md in this folder.
"""

from __future__ import annotations

import argparse
import os

from lfdist.bench.scale import run

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=here)
    print(f"wrote {run(parser.parse_args().out)}")
