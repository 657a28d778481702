#!/usr/bin/env bash
# End to end on one GPU with vLLM: MiniCPM-V 2.6 at its real shapes (random weights) -> quantkit quantize ->
# quantkit verify against the 16-bit model (vLLM loads both, prompt suite, parity, speed/memory table).
#
#   bash scripts/gpu_e2e.sh build     # stand-in at real shapes + quantize (about 5 min on an H100;
#                                     # 104 x 512 calibration tokens: the pydoc calibration half holds ~55k)
#   bash scripts/gpu_e2e.sh verify    # vLLM: both variants (parity, speed, memory), then the int4 speed again
#                                     # with vLLM's kernel choice disabled (Machete -> Marlin); about 7 min
#
# Needs vLLM importable (on the lent H100: ../shared/device/README.md's three staging calls, then
# `export PYTHONPATH=/root/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_WORKER_MULTIPROC_METHOD=spawn`).
# Stage it with EXTRA_PKGS=pydantic-extra-types: the kit's mistral_common 1.13.1 imports it, and without it
# transformers 5.17's AutoProcessor fails on every model ("Could not import module 'MistralCommonBackend'"),
# which is how vLLM loads MiniCPM-V's processor (seen 2026-11-25).
# WORK (default /root/quantkit-e2e) holds the models; OUT (default $WORK/out) receives logs and reports.
# SIZE=tiny runs the same steps on the tiny stand-in (minutes less; proves loading, not speed).
# HUB_CODE=DIR replaces the stand-in's code files by DIR/*.py, the seven files openbmb/MiniCPM-V-2_6 publishes
# (../shared/fixtures/minicpmv26-hub-code; carry a copy): the folder then looks like a real download, and quantkit
# must quantize it without importing them while vLLM runs their configuration and processor code.
set -euo pipefail
WORK=${WORK:-/root/quantkit-e2e}
OUT=${OUT:-$WORK/out}
SIZE=${SIZE:-real}
mkdir -p "$WORK" "$OUT"
FP16="$WORK/minicpmv26-$SIZE-bf16"
INT4="$WORK/minicpmv26-$SIZE-awq"

case "${1:-}" in
  build)
    [ -f "$FP16/config.json" ] || time python3 -m quantkit.testing.standin --size "$SIZE" "$FP16"
    if [ -n "${HUB_CODE:-}" ]; then
        cp "$HUB_CODE"/*.py "$FP16"/ && echo "published code files: $(cd "$FP16" && sha256sum ./*.py | sha256sum)"
    fi
    python3 -m quantkit quantize "$FP16" "$INT4" --device cuda --n-samples 104 --seq-len 512 --force \
        2>&1 | tee "$OUT/quantize.log" | tail -n 5
    python3 -m quantkit verify "$INT4" --static --source "$FP16" --json > "$OUT/static.json" || true
    python3 - "$INT4" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/quantkit-manifest.json"))
q = m["quantization"]
print("quantize seconds:", {k: round(v, 1) for k, v in q["seconds"].items()})
print("peak GPU GiB per layer (max):", max(l["peak_gpu_bytes"] or 0 for l in q["layers"]) / 2**30)
PY
    du -sh "$FP16" "$INT4"
    ;;
  verify)
    python3 -m quantkit verify "$INT4" --reference "$FP16" --gpu-memory-gb 24 --kernel-alternatives 1 2>&1 \
        | tee "$OUT/verify.log" | tail -n 60 || echo "verify exited non-zero (verdict FAIL or error): see $OUT/verify.log"
    cp "$INT4"/verify-report.* "$OUT/"
    ;;
  *)
    echo "usage: $0 build|verify" >&2
    exit 2
    ;;
esac
