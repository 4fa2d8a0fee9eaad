#!/usr/bin/env bash
# One short GPU lease, two measurements, each written to $OUT as soon as it is done:
#   1. attribution graphs on mri-base with its shipped transcoders (bench/trace.py --mri-base), 1,000 and
#      256 prompt tokens -> $OUT/trace-gpu.md
#   2. mri's TopK SAE training step at ANCHORS' configuration (bench/train.py --libs mri: d_in 768, 32k and
#      131k latents, k 32, 4,096 tokens a step, bf16 autocast) -> $OUT/bench-train-gpu.md
# The prompt's token ids are written ahead on the CPU (`python bench/trace.py --write-ids bench/device/trace-prompt-ids.json
# --tokens 1000`), since a GPU image may lack pyarrow to read the corpus sample. Every step has a timeout.
#
#   OUT=dir bash bench/device_check.sh                                   # on the GPU machine
#   OUT=/tmp/o DEVICE=cpu TOKENS="32 16" SIZES="64x512" BATCH=256 WARMUP=1 STEPS=2 bash bench/device_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the reports}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-1000 256}
SIZES=${SIZES:-768x32768 768x131072}
BATCH=${BATCH:-4096}
WARMUP=${WARMUP:-20}
STEPS=${STEPS:-100}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
{
    date -u '+%F %T UTC'
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
    # shellcheck disable=SC2086  # TOKENS and SIZES are word lists
    timeout -k 5 "${TRACE_TIMEOUT:-100}" "$PY" bench/trace.py --mri-base --device "$DEVICE" --tokens $TOKENS \
        --threads 8 --ids-file bench/device/trace-prompt-ids.json --worker-timeout 80 --out-md "$OUT/trace-gpu.md"
    echo "== trace exit $?"
    # shellcheck disable=SC2086
    timeout -k 5 "${TRAIN_TIMEOUT:-100}" "$PY" bench/train.py --device "$DEVICE" --autocast --style gpu --libs mri \
        --sizes $SIZES --batch "$BATCH" --k 32 --warmup "$WARMUP" --steps "$STEPS" --quality-tokens 0 \
        --worker-timeout 60 --out-md "$OUT/bench-train-gpu.md"
    echo "== train exit $?"
    date -u '+%F %T UTC'
} 2>&1 | tee "$OUT/device_check.log"
