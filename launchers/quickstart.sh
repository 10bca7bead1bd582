#!/usr/bin/env bash
# The quick start: set up, then probe, select (salf) and fine-tune the real MiniLM-L6 (from its
# PyPI package) as a topic classifier on real BBC News articles with 2 processes on CPU under
# FSDP2, then train every block the same way and print the savings and the accuracy side by side.
# Usage: bash launchers/quickstart.sh [config.yaml] [key=value overrides, e.g. train.steps=20]
#   bash launchers/quickstart.sh configs/smollm2.yaml    # the language-model demo (SmolLM2-135M)
set -euo pipefail
cd "$(dirname "$0")/.."
config=configs/quickstart.yaml
if [[ $# -gt 0 && "$1" == *.yaml ]]; then
  config="$1"
  shift
fi
bash launchers/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
out="runs/$(basename "$config" .yaml)-$(date +%Y%m%d-%H%M%S)"
lfdist run "$config" out="$out" "$@" --compare-full
lfdist plan show "$out/plan.yaml" --probe "$out/probe.json" --png "$out/plan.png"
echo "everything is under $out (plan.yaml, plan-all.yaml, probe.json, plan.png, train/metrics.json, train/metrics.jsonl, summary.json)"
