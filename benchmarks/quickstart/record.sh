#!/usr/bin/env bash
# Record the quick start's committed output: run it as a newcomer would (launchers/quickstart.sh),
# then keep its output, plan, plot and summary with the environment it ran in.
# Usage: bash benchmarks/quickstart/record.sh [configs/X.yaml]
#   configs/quickstart.yaml (default) -> benchmarks/quickstart/
#   configs/smollm2.yaml              -> benchmarks/quickstart/smollm2/
# Run it alone on the machine: the side-by-side step times are measured in the same job, but
# other load still blurs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
config="${1:-configs/quickstart.yaml}"
name="$(basename "$config" .yaml)"
dest=benchmarks/quickstart
[[ "$name" == quickstart ]] || dest="benchmarks/quickstart/$name"
mkdir -p "$dest"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
bash launchers/quickstart.sh "$config" 2>&1 | tee "$dest/output.txt"
seconds=$(($(date +%s) - start))
run="$(ls -dt "runs/$name"-* | head -n 1)"
cp "$run/plan.yaml" "$run/plan.png" "$run/summary.json" "$dest/"
# shellcheck disable=SC1091
. .venv/bin/activate
python - "$dest" "$seconds" "$config" "$load_before" <<'PY'
import json, sys
from lfdist.bench.record import environment

dest, seconds, config, load = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
env = environment()
env.update(
    wall_seconds=seconds,
    command=f"bash launchers/quickstart.sh {config} (via benchmarks/quickstart/record.sh)",
    load_average_before=load,
)
with open(f"{dest}/environment.json", "w") as f:
    json.dump(env, f, indent=1)
PY
echo "recorded $run in $dest (${seconds} s)"
