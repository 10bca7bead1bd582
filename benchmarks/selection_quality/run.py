"""Selection-quality benchmark (SPEC 6): the oracle sweep and the strategies' scores.

    python benchmarks/selection_quality/run.py                       # both tasks, ~45 min on 2 cores
    python benchmarks/selection_quality/run.py --only minilm-bbc     # one task (run tasks side by side)
    python benchmarks/selection_quality/run.py --reuse benchmarks/selection_quality  # re-score only
    python benchmarks/selection_quality/run.py --markdown-only --out DIR  # DIR/quality.md anew

Same as `lfdist bench quality --out benchmarks/selection_quality [--reuse DIR]`, plus --only.
Writes quality.json / .md / .png and oracle-<task>.json (the sweep, cached per run) here.
"""

from __future__ import annotations

import argparse
import json
import os

from lfdist.bench.quality import run
from lfdist.bench.quality_report import markdown
from lfdist.bench.record import write_markdown

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=HERE)
    p.add_argument("--reuse", help="folder of an earlier run: re-score without the sweep")
    p.add_argument("--only", nargs="*", help="task names (minilm-bbc, smollm2-docs)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument(
        "--markdown-only", action="store_true", help="write quality.md from quality.json as it is"
    )
    a = p.parse_args()
    if a.markdown_only:
        with open(os.path.join(a.out, "quality.json")) as f:
            result = json.load(f)
        print(write_markdown(a.out, "quality", result, markdown(result)))
    else:
        print(run(a.out, tiny=a.tiny, reuse=a.reuse, only=a.only))
