#!/usr/bin/env bash
# Build, on a CPU machine with package-registry access, the wheels benchmarks/gpu/run.sh installs
# on a GPU image that lacks DeepSpeed (Python 3.12, x86-64): DeepSpeed as a pure-Python wheel
# (its ops JIT-compile on first use) and its small needs. Carry benchmarks/gpu/wheels/ (ignored
# by git) with the run. Usage: bash benchmarks/gpu/wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")"
py=${1:-3.12}
mkdir -p wheels
pip wheel -q --no-deps -w wheels "deepspeed==0.19.8"
pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --platform manylinux2014_x86_64 -d wheels hjson pydantic pydantic-core annotated-types \
  typing-inspection ninja py-cpuinfo msgpack
ls -la wheels
