#!/usr/bin/env bash
# Thin torchrun launcher for one node of an lfdist run (DDP / FSDP1 / FSDP2).
# Usage: NPROC=8 [NNODES=2 NODE_RANK=0 RDZV=node0:29500] bash launchers/torchrun.sh MODEL DATA PLAN OUT [lfdist train flags...]
# `lfdist train ... --dry-run` prints the exact torchrun command this runs.
set -euo pipefail
model=$1 data=$2 plan=$3 out=$4; shift 4
exec lfdist train --model "$model" --data "$data" --plan "$plan" --out "$out" \
  --engine "${ENGINE:-fsdp2}" --nproc "${NPROC:-1}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  ${RDZV:+--rdzv-endpoint "$RDZV"} "$@"
