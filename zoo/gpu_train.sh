#!/usr/bin/env bash
# Train mri-base on one GPU box with no network, from packed (lzma) pre-tokenized shards, into $OUT/mri-base.
#
#   OUT=/some/dir bash zoo/gpu_train.sh            # defaults: the mri-base architecture, ~6 minutes
#
# Inputs (environment, all optional):
#   TOKENS      packed tokens folder (default runs/packed-full). runs/ is not in git: build it here first with
#                 mri zoo pretokenize --corpus runs/corpus --tokenizer runs/zoo/tokenizer --out runs/zoo/tokens \
#                   --max-tokens-per-source 2000000 --pack runs/packed-full
#               (41.2M training tokens, 26 MB of lzma shards: what mri-base was trained on),
#               then carry it with the device call (the device tool's `carry: ["runs/packed-full"]`); the
#               repo and everything carried must stay under 64 MiB in all
#   WHEELS      folder of wheels to install offline first if transformers/safetensors/tokenizers are missing
#   TRAIN_TOKENS, BATCH, LAYERS, D_MODEL, HEADS, CTX, LR, WARMUP, MIX, TIME_LIMIT (seconds), DEVICE: training
#   EVALUATE=0  skip the card's evaluations;  RUN  folder for checkpoints (default: a fresh temp folder)
# Writes $OUT/mri-base.tar (the fp16 HF folder with card.json: one file, since the device tool returns at most
# 8 files), $OUT/loss.png, $OUT/train.log, $OUT/summary.json. The schedule is fitted to TIME_LIMIT seconds
# (warmup + cosine completes inside it), so a lease counted in seconds still ends with an annealed model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:?set OUT to the folder for the trained model}
TOKENS=${TOKENS:-runs/packed-full}
RUN=${RUN:-$(mktemp -d)/mri-base-run}
mkdir -p "$OUT"

if ! "$PY" -c "import torch, transformers, safetensors, tokenizers, numpy, typer, rich" 2>/dev/null; then
  if [[ -n "${WHEELS:-}" ]]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" transformers safetensors tokenizers typer rich
  else
    echo "missing Python packages (need torch transformers safetensors tokenizers numpy typer rich);" \
         "set WHEELS to a folder of wheels to install them offline" >&2
    exit 3
  fi
fi
[[ -f "$TOKENS/tokens.json" ]] || { echo "no packed tokens at $TOKENS (tokens.json missing)" >&2; exit 3; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "from mri.zoo.commands import zoo_app; zoo_app(prog_name='mri zoo')" train --corpus "$TOKENS" --out "$RUN" \
  --family llama --layers "${LAYERS:-4}" --d-model "${D_MODEL:-256}" --heads "${HEADS:-4}" --ctx "${CTX:-1024}" \
  --batch "${BATCH:-64}" --tokens "${TRAIN_TOKENS:-150000000}" --lr "${LR:-3e-3}" --warmup "${WARMUP:-300}" \
  --mix "${MIX:-world=0.2,facts=0.03}" --time-limit "${TIME_LIMIT:-330}" --fit-to-time --device "${DEVICE:-auto}" \
  --checkpoint-every 2000 --eval-every 1000 --log-every 100 "$([[ ${EVALUATE:-1} == 0 ]] && echo --no-evaluate || echo --evaluate)" \
  > "$OUT/summary.json" 2> >(tee "$OUT/train.log" >&2)
tar -C "$RUN" -cf "$OUT/mri-base.tar" --transform 's,^model,mri-base,' model
cp "$RUN/loss.png" "$OUT/loss.png"
echo "wrote $OUT/mri-base.tar"
