#!/usr/bin/env bash
# Train the per-layer transcoders shipped for mri-base (blocks.{l}.hook_mlp_in -> hook_mlp_out, l = 0..3) and
# write them, fp16, into mri/zoo/dictionaries/mri-base/transcoders/L{l}/ with a manifest.json for the set.
#
#   bash zoo/train_dicts.sh
#
# Measured on a shared 2-core machine (load 6-9, nice 10): record 3.5 min, train 45 min (20 CPU-minutes),
# eval 6 min. The result's held-out FVU is 0.22 / 0.54 / 0.59 / 0.39 for layers 0-3 (see the set's manifest):
# more tokens and latents (TOKENS, RECORD_TOKENS, LATENTS) are what would lower it.
#
# Steps, all deterministic (fixed seeds; CPU, fp32):
#   1. corpus: the shipped corpus sample + 4,000 synthetic-world paragraphs (seed 1) + each training fact's
#      statement, shuffled (python -m mri.zoo.dictionaries.build corpus)
#   2. mri record: 1,792 contexts of 256 tokens (458,752 tokens) at the four MLP inputs and outputs
#   3. mri dict train: four TopK transcoders with a skip connection, trained together from the store
#   4. mri dict eval: FVU, L0, dead fraction, CE loss recovered, on EVAL_CORPUS (default: the zoo corpus's
#      held-out split runs/corpus/val.parquet when present, else the shipped sample)
#   5. ship: fp16 copies + metrics + the set's manifest.json into the package
# Environment (optional): WORK (default runs/dicts/mri-base), LATENTS (1024), K (32), TOKENS (1,638,400
# training tokens), RECORD_TOKENS (458,752), EVAL_CORPUS, EVAL_TOKENS (32,768), MRI (default .venv/bin/mri),
# PY (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
MRI=${MRI:-.venv/bin/mri}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/dicts/mri-base}
LATENTS=${LATENTS:-1024}
K=${K:-32}
TOKENS=${TOKENS:-1638400}
RECORD_TOKENS=${RECORD_TOKENS:-458752}
EVAL_TOKENS=${EVAL_TOKENS:-32768}
DEST=mri/zoo/dictionaries/mri-base/transcoders
if [[ -z "${EVAL_CORPUS:-}" ]]; then
  if [[ -f runs/corpus/val.parquet ]]; then EVAL_CORPUS=runs/corpus/val.parquet; else EVAL_CORPUS=""; fi
fi
mkdir -p "$WORK"
sites=()
for l in 0 1 2 3; do sites+=("L$l.mlp_in" "L$l.mlp_out"); done

"$PY" -m mri.zoo.dictionaries.build corpus "$WORK/corpus.jsonl" --world-docs 4000 --seed 1
"$MRI" record mri-base --corpus "$WORK/corpus.jsonl" --sites "${sites[@]}" --tokens "$RECORD_TOKENS" \
  --ctx 256 --batch 16 --seed 0 --device cpu --out "$WORK/store"
rm -rf "$WORK/trained"
"$MRI" dict train --store "$WORK/store" --kind transcoder --arch topk --skip --latents "$LATENTS" --k "$K" \
  --site L0.mlp_in --site L1.mlp_in --site L2.mlp_in --site L3.mlp_in \
  --tokens "$TOKENS" --batch-size 2048 --seed 0 --device cpu --quiet --out "$WORK/trained"
for l in 0 1 2 3; do
  "$MRI" dict eval "$WORK/trained/blocks.$l.hook_mlp_in" --model mri-base ${EVAL_CORPUS:+--corpus "$EVAL_CORPUS"} \
    --tokens "$EVAL_TOKENS" --ctx 256 --batch 8 --device cpu
done
"$PY" -m mri.zoo.dictionaries.build ship "$WORK/trained" "$DEST" \
  --recipe "bash zoo/train_dicts.sh (LATENTS=$LATENTS K=$K TOKENS=$TOKENS RECORD_TOKENS=$RECORD_TOKENS EVAL_CORPUS=${EVAL_CORPUS:-sample})"
du -sh "$DEST"
