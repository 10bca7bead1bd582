#!/usr/bin/env bash
# The quick start: set up, then probe, select (salf) and fine-tune the real SmolLM2-135M (from its PyPI
# package) on real text (the Python documentation) with 2 processes on CPU under FSDP2, and
# print the plan and the savings measured against full fine-tuning on the same engine.
# Usage: bash launchers/quickstart.sh [key=value overrides, e.g. train.steps=20]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launchers/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
lfdist run configs/quickstart.yaml out="$out" "$@" --compare-full
lfdist plan show "$out/plan.yaml" --probe "$out/probe.json" --png "$out/plan.png"
echo "everything is under $out (plan.yaml, plan-all.yaml, probe.json, plan.png, train/metrics.json, train/metrics.jsonl, summary.json)"
