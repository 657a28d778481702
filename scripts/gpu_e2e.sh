#!/usr/bin/env bash
# End to end on one GPU with vLLM: MiniCPM-V 2.6 at its real shapes (random weights) -> quantkit quantize ->
# quantkit verify against the 16-bit model (vLLM loads both, prompt suite, parity, speed/memory table).
#
#   bash scripts/gpu_e2e.sh build     # stand-in at real shapes + quantize (about 5 min on an H100;
#                                     # 104 x 512 calibration tokens: the pydoc calibration half holds ~55k)
#   bash scripts/gpu_e2e.sh verify    # vLLM: both variants (parity, speed, memory), the setup trial
#                                     # (SPEED_TRIALS engine starts, default 3: int4 Marlin, tiny stand-in as
#                                     # per-step floor, int4 FULL_DECODE_ONLY), then scripts/speed_crosscheck.py
#                                     # times the recommended 16-bit and int4 setups with plain LLM.generate
#                                     # (CROSSCHECK=recommended: 2 engine starts; all: every setup) and prints
#                                     # verify's figures beside its own; about 7 engine starts, ~14 min in all
#   bash scripts/gpu_e2e.sh wait      # a later call: waits (up to WAIT_S, default 570 s) for a detached verify
#
# verify runs longer than one device call (10 min): start it detached, then keep calling `wait` back to back
# (a machine stays warm ~30 s between calls; a process started with setsid survives the call that started it).
# Keep OUT off the device tool's $OUT, which is emptied before each call (start every call with the export):
#   export TOOL_OUT=$OUT OUT=/root/quantkit-e2e/out; mkdir -p $OUT
#   setsid nohup bash scripts/gpu_e2e.sh verify > $OUT/e2e-verify.log 2>&1 < /dev/null & sleep 5
#   bash scripts/gpu_e2e.sh wait      # in this call and the next ones, until it prints the final table
#   cp $OUT/* $TOOL_OUT/              # in the last call, to bring the reports and logs back
#
# Needs vLLM importable (on the lent H100: ../shared/device/README.md's three staging calls, then
# `export PYTHONPATH=/root/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_WORKER_MULTIPROC_METHOD=spawn`).
# Stage it with EXTRA_PKGS=pydantic-extra-types: the kit's mistral_common 1.13.1 imports it, and without it
# transformers 5.17's AutoProcessor fails on every model ("Could not import module 'MistralCommonBackend'"),
# which is how vLLM loads MiniCPM-V's processor (seen 2026-11-25).
# WORK (default /root/quantkit-e2e) holds the models; OUT (default $WORK/out) receives logs and reports.
# SIZE=tiny runs the same steps on the tiny stand-in (minutes less; proves loading, not speed).
# ARCH=qwen2_5_vl runs them on the Qwen2.5-VL-7B stand-in instead of MiniCPM-V 2.6's (any arch spec name that
# `python -m quantkit.standin --arch` takes); CROSSCHECK=none skips the independent timing.
# HUB_CODE=DIR replaces the stand-in's code files by DIR/*.py, the seven files openbmb/MiniCPM-V-2_6 publishes
# (../shared/fixtures/minicpmv26-hub-code; carry a copy): the folder then looks like a real download, and quantkit
# must quantize it without importing them while vLLM runs their configuration and processor code.
set -euo pipefail
WORK=${WORK:-/root/quantkit-e2e}
OUT=${OUT:-$WORK/out}
SIZE=${SIZE:-real}
ARCH=${ARCH:-minicpmv26}
mkdir -p "$WORK" "$OUT"
FP16="$WORK/$ARCH-$SIZE-bf16"
INT4="$WORK/$ARCH-$SIZE-awq"

case "${1:-}" in
  build)
    [ -f "$FP16/config.json" ] || time python3 -m quantkit.standin --arch "$ARCH" --size "$SIZE" "$FP16"
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
    rm -f "$OUT/verify.done"
    python3 -m quantkit verify "$INT4" --reference "$FP16" --gpu-memory-gb 24 --speed-trials "${SPEED_TRIALS:-3}" \
        2>&1 | tee "$OUT/verify.log" | tail -n 60 || echo "verify exited non-zero (verdict FAIL or error): see $OUT/verify.log"
    cp "$INT4"/verify-report.* "$OUT/" || { echo "no verify report: see $OUT/verify.log"; touch "$OUT/verify.done"; exit 1; }
    if [ "${CROSSCHECK:-recommended}" != none ]; then
        python3 scripts/speed_crosscheck.py "$INT4/verify-report.json" --reference "$FP16" --setups "${CROSSCHECK:-recommended}" \
            --json "$OUT/crosscheck.json" --log-dir "$OUT" > "$OUT/crosscheck.txt" 2>&1 || true
    fi
    { echo "== verify: fastest setup per batch size, and the serve command (verify-report.md) =="
      sed -n '/^Fastest measured setup per batch size:/,/^## /p' "$OUT/verify-report.md" | grep -v '^## ' || true
      echo; echo "== verify's decode figures vs the independent timing (scripts/speed_crosscheck.py) =="
      [ -f "$OUT/crosscheck.txt" ] && sed -n '/^decode tok\/s: verify vs independent/,$p' "$OUT/crosscheck.txt" || true
    } | tee "$OUT/summary.txt"
    touch "$OUT/verify.done"
    ;;
  wait)
    for _ in $(seq "$(( ${WAIT_S:-570} / 10 ))"); do [ -f "$OUT/verify.done" ] && break; sleep 10; done
    if [ -f "$OUT/verify.done" ]; then cat "$OUT/summary.txt" 2>/dev/null || tail -n 30 "$OUT/verify.log"; else echo "still running:"; tail -n 5 "$OUT/verify.log" "$OUT/crosscheck.txt" 2>/dev/null; fi
    ;;
  *)
    echo "usage: $0 build|verify|wait" >&2
    exit 2
    ;;
esac
