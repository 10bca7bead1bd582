#!/usr/bin/env bash
# The GPU benchmark, under 8 minutes on one H200 (model generation included): a generated 1.1B
# Llama in bf16, full fine-tuning and the top quarter of blocks, every engine (ddp, fsdp1, fsdp2,
# ZeRO-2, ZeRO-3) through `lfdist train --nproc 1` (torchrun / the deepspeed launcher) next to a
# plain PyTorch loop in pure bf16 and in autocast; step time, tokens/s, MFU, peak memory next to
# the prediction, loss after 30 steps. Writes benchmarks/gpu/speed-gpu.{json,md,png}.
# Run: bash benchmarks/gpu/run.sh          (one CUDA device)
#      bash benchmarks/gpu/run.sh --tiny   (CPU smoke test: a 4-block model, 4 steps, a temp folder)
# A bare GPU image (torch, transformers, safetensors) needs no install; DeepSpeed comes from
# wheels built on a CPU machine (bash benchmarks/gpu/wheels.sh), carried in benchmarks/gpu/wheels/.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
missing=$(python -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'transformers', 'safetensors', 'yaml') if not u.find_spec(m)))")
if [ -n "$missing" ]; then
  echo "run.sh: this Python lacks $missing; run launchers/setup.sh or activate the environment" >&2
  exit 2
fi
if ! python -c "import deepspeed" 2>/dev/null && ls benchmarks/gpu/wheels/*.whl >/dev/null 2>&1; then
  pip install -q --no-deps --no-index benchmarks/gpu/wheels/*.whl
fi
mode=(--gpu)
for a in "$@"; do [ "$a" = "--tiny" ] && mode=(); done
exec timeout 480 python benchmarks/speed/run.py "${mode[@]}" "$@"
