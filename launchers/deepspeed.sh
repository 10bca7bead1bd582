#!/usr/bin/env bash
# Thin DeepSpeed launcher for an lfdist run (ZeRO-1/2/3).
# Usage: NPROC=8 ZERO=3 [HOSTFILE=hosts NNODES=2 MASTER=node0:29500] bash launchers/deepspeed.sh MODEL DATA PLAN OUT [flags...]
# Add train.deepspeed_config=my.json to use your own DeepSpeed JSON ("auto" values are filled).
set -euo pipefail
model=$1 data=$2 plan=$3 out=$4; shift 4
exec lfdist train --model "$model" --data "$data" --plan "$plan" --out "$out" \
  --engine deepspeed --zero-stage "${ZERO:-2}" --nproc "${NPROC:-1}" --nnodes "${NNODES:-1}" \
  ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER:+--rdzv-endpoint "$MASTER"} "$@"
