"""Probe throughput with 1 and 2 Ray workers, and the probe's cost against a fine-tuning run.

python benchmarks/probe/run.py --out DIR [--full]    # same as: lfdist bench probe --tiny --out DIR

--out is required, and a folder that already holds results is refused unless --overwrite, so a
trial run cannot replace the committed results in benchmarks/probe/ by accident (to refresh them:
--out benchmarks/probe --overwrite).
"""

import argparse
import os

from lfdist.bench.probe import run

RESULTS = ("probe.json", "probe.md", "probe.png")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for probe.json, probe.md, probe.png")
    p.add_argument("--full", action="store_true", help="the packaged models, not tiny ones")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    args = p.parse_args()
    held = [f for f in RESULTS if os.path.exists(os.path.join(args.out, f))]
    if held and not args.overwrite:
        p.error(f"{args.out} already holds {', '.join(held)}; choose another --out or --overwrite")
    print(f"wrote {run(args.out, tiny=not args.full)}")
