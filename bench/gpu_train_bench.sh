#!/usr/bin/env bash
# TopK SAE training throughput on one GPU, side by side: mri vs sparsify (eai-sparsify 1.3.3) vs SAELens.
#
#   OUT=dir bash bench/gpu_train_bench.sh            # writes dir/bench-train-gpu.md; ~1.5 min on an H100
#
# The configuration of /work/shared/ANCHORS.md ("TopK SAE training throughput on one NVIDIA H100"):
# d_in 768, 32,768 and 131,072 latents, k 32, 4,096 tokens per step, bf16 autocast, 20 warm-up then 100 timed
# steps with a device synchronise after each. No network is needed: the peers and the dependencies the image
# lacks come from the wheels in .whl/ (pure Python except xxhash, cp312), installed into /tmp/site; a wheel
# whose distribution the interpreter already has is skipped (one version of each package).
#
# Knobs (environment), e.g. a CPU smoke test:
#   OUT=/tmp/o DEVICE=cpu SIZES="64x512" BATCH=256 WARMUP=2 STEPS=3 bash bench/gpu_train_bench.sh
#   PYTHON (python3), DEVICE (cuda), SIZES ("768x32768 768x131072"), BATCH (4096), WARMUP (20), STEPS (100),
#   AUTOCAST (1), LIBS ("mri sparsify saelens"), TIMEOUT (150 s for everything), WORKER_TIMEOUT (70 s each),
#   SITE (/tmp/site), WHL (.whl: the folder of wheels)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the report}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-768x32768 768x131072}
BATCH=${BATCH:-4096}
WARMUP=${WARMUP:-20}
STEPS=${STEPS:-100}
AUTOCAST=${AUTOCAST:-1}
LIBS=${LIBS:-mri sparsify saelens}
TIMEOUT=${TIMEOUT:-150}
WORKER_TIMEOUT=${WORKER_TIMEOUT:-70}
SITE=${SITE:-/tmp/site}
WHL=${WHL:-.whl}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=$(command -v "$PYTHON") || { echo "no $PYTHON" >&2; exit 1; }
echo "== $(date -u '+%F %T UTC') $PY: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1)"

# the wheels whose distribution is not installed yet
mapfile -t WHEELS < <("$PY" - "$WHL"/*.whl <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for path in sys.argv[1:]:
    name = path.rsplit("/", 1)[-1].split("-")[0]
    try:
        print(f"skip {path}: {name} {version(name)} is installed", file=sys.stderr)
    except PackageNotFoundError:
        print(path)
EOF
)
if [ "${#WHEELS[@]}" -gt 0 ]; then
    echo "== installing ${#WHEELS[@]} wheels into $SITE"
    timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${WHEELS[@]}" || echo "== pip install failed (exit $?); going on" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

FLAGS=()
[ "$AUTOCAST" = 1 ] && FLAGS+=(--autocast)
LEFT=$((TIMEOUT - SECONDS))
echo "== bench/train.py (${LEFT} s left)"
# shellcheck disable=SC2086  # SIZES and LIBS are word lists
timeout -k 5 "$LEFT" "$PY" bench/train.py --device "$DEVICE" --style gpu "${FLAGS[@]}" \
    --sizes $SIZES --libs $LIBS --batch "$BATCH" --k 32 --warmup "$WARMUP" --steps "$STEPS" \
    --quality-tokens 0 --peer-python "$PY" --worker-timeout "$WORKER_TIMEOUT" \
    --out-md "$OUT/bench-train-gpu.md"
rc=$?
echo "== exit $rc after ${SECONDS} s; report: $OUT/bench-train-gpu.md"
[ -f "$OUT/bench-train-gpu.md" ] && cat "$OUT/bench-train-gpu.md"
exit $rc
