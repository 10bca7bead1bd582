#!/usr/bin/env bash
# Submit an lfdist run (probe on Ray actors -> select -> train through Ray Train) to a Ray cluster.
# Usage: RAY_ADDRESS=http://HEAD:8265 bash launchers/ray_submit.sh CONFIG [key=value overrides...]
#   e.g. RAY_ADDRESS=http://head:8265 bash launchers/ray_submit.sh configs/quickstart.yaml \
#          out=/shared/runs/r1 probe.workers=8 train.nproc=8
# Runs `lfdist run CONFIG --orchestrator ray ...` as a Ray job; inside the job RAY_ADDRESS points
# at the cluster, so the probe actors and the Ray Train workers join it. Every node needs lfdist
# installed, and `out=` must be a folder all nodes share (the ranks write metrics and checkpoints
# there). WORKDIR (default: this checkout, .gitignore'd files left out) is uploaded as the job's
# working_dir so CONFIG and relative data paths resolve; extra `ray job submit` flags go in
# RAY_SUBMIT_ARGS (e.g. RAY_SUBMIT_ARGS="--no-wait").
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
config=$1; shift
workdir=${WORKDIR:-$(cd "$(dirname "$0")/.." && pwd)}
# shellcheck disable=SC2086
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --working-dir "$workdir" \
  ${RAY_SUBMIT_ARGS:-} -- lfdist run "$config" --orchestrator ray "$@"
