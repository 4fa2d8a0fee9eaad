#!/usr/bin/env bash
# One short GPU lease, each measurement written to $OUT as soon as it is done:
#   1. mri vs sparsify side by side at ANCHORS' configuration (bench/gpu_train_bench.sh; the peers' wheels come
#      from .whl/, so carry it) -> $OUT/bench-train-gpu.md; first, so that the headline lands whatever follows
#   2. where mri's TopK training step spends its time: the selection, the step with each of its parts turned
#      back to plain PyTorch, steps with AuxK and BatchTopK (graphs vs eager), the host's cost of a step, the
#      kernel table (bench/gpu_step.py: 768 x 32k and 768 x 131k latents, k 32, 4,096 tokens a step, bf16)
#      -> $OUT/gpu-step.md
#   3. only with TRACE=1: attribution graphs on mri-base with its shipped transcoders (bench/trace.py --mri-base,
#      1,000 and 256 prompt tokens; ids written ahead on the CPU, see bench/device/) -> $OUT/trace-gpu.md
# Every step has a timeout; the whole script stays under about 5 minutes on an H100.
#
#   bash bench/device/wheels.sh                                          # here first: the peers' wheels into .whl/
#   OUT=dir bash bench/device_check.sh                                   # on the GPU machine, with .whl carried
#   OUT=/tmp/o DEVICE=cpu SIZES="64x2048" BATCH=256 WARMUP=1 STEPS=2 LIBS=mri bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the reports}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-768x32768 768x131072}
BATCH=${BATCH:-4096}
WARMUP=${WARMUP:-20}
STEPS=${STEPS:-100}
LIBS=${LIBS:-mri sparsify}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
{
    date -u '+%F %T UTC'
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    OUT="$OUT" DEVICE="$DEVICE" SIZES="$SIZES" BATCH="$BATCH" WARMUP="$WARMUP" STEPS="$STEPS" LIBS="$LIBS" \
        TIMEOUT="${TRAIN_TIMEOUT:-110}" PYTHON="$PY" bash bench/gpu_train_bench.sh
    echo "== train exit $?"
    # shellcheck disable=SC2086  # SIZES is a word list
    timeout -k 5 "${STEP_TIMEOUT:-150}" "$PY" bench/gpu_step.py --device "$DEVICE" --sizes $SIZES --batch "$BATCH" \
        --warmup "$WARMUP" --steps "$STEPS" --profile-rows "${PROFILE_ROWS:-25}" --out-md "$OUT/gpu-step.md"
    echo "== gpu_step exit $?"
    if [ "${TRACE:-0}" = 1 ]; then
        # shellcheck disable=SC2086
        timeout -k 5 "${TRACE_TIMEOUT:-100}" "$PY" bench/trace.py --mri-base --device "$DEVICE" --tokens ${TOKENS:-1000 256} \
            --threads 8 --ids-file bench/device/trace-prompt-ids.json --worker-timeout 80 --out-md "$OUT/trace-gpu.md"
        echo "== trace exit $?"
    fi
    date -u '+%F %T UTC'
} 2>&1 | tee "$OUT/device_check.log"
