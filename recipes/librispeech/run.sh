#!/usr/bin/env bash
# LibriSpeech 960 h -> canary-180m-flash-like model. Runs on a user's GPU machine (it downloads
# ~60 GB); see README.md for resources. Usage:
#   bash recipes/librispeech/run.sh [STAGE] [extra `speedasr train` overrides...]
# STAGE: 1 download, 2 prepare, 3 cuts, 4 tokenizer, 5 bins, 6 calibrate, 7 train, 8 eval
#        (default 1: run everything; each stage skips work already done).
# Environment: CORPUS (download dir, default corpora), DATA (default data/librispeech),
#              CONFIG (default recipes/librispeech/canary-180m-flash.yaml), JOBS (default 8).
set -euo pipefail
cd "$(dirname "$0")/../.."

STAGE=${1:-1}
shift || true
CORPUS=${CORPUS:-corpora}
DATA=${DATA:-data/librispeech}
CONFIG=${CONFIG:-recipes/librispeech/canary-180m-flash.yaml}
JOBS=${JOBS:-8}
EXP=${EXP:-exp/librispeech-canary-180m-flash}
TRAIN_PARTS="train-clean-100 train-clean-360 train-other-500"
mkdir -p "$DATA"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "$STAGE" -le 1 ]; then
  step "1 download LibriSpeech (960 h train + dev/test) -> $CORPUS"
  lhotse download librispeech --full "$CORPUS"
fi
if [ "$STAGE" -le 2 ]; then
  step "2 lhotse manifests (lower-case transcripts) -> $DATA/manifests"
  lhotse prepare librispeech -j "$JOBS" --normalize-text lower \
    "$CORPUS/LibriSpeech" "$DATA/manifests"
fi
if [ "$STAGE" -le 3 ]; then
  step "3 cuts: train (960 h), dev-clean+dev-other, test-clean, test-other"
  for part in $TRAIN_PARTS dev-clean dev-other test-clean test-other; do
    [ -f "$DATA/cuts_$part.jsonl.gz" ] || lhotse cut simple \
      -r "$DATA/manifests/librispeech_recordings_$part.jsonl.gz" \
      -s "$DATA/manifests/librispeech_supervisions_$part.jsonl.gz" "$DATA/cuts_$part.jsonl.gz"
  done
  lhotse combine $(for p in $TRAIN_PARTS; do echo "$DATA/cuts_$p.jsonl.gz"; done) \
    "$DATA/train_cuts.jsonl.gz"
  lhotse combine "$DATA/cuts_dev-clean.jsonl.gz" "$DATA/cuts_dev-other.jsonl.gz" \
    "$DATA/dev_cuts.jsonl.gz"
  speedasr data validate --cuts "$DATA/train_cuts.jsonl.gz" --max-duration 35 \
    --out "$DATA/rejects_train.jsonl"
fi
if [ "$STAGE" -le 4 ]; then
  step "4 tokenizer: sentencepiece BPE, 1024 tokens incl. specials"
  [ -f "$DATA/tokenizer/tokenizer.model" ] || speedasr tokenizer train \
    --cuts "$DATA/train_cuts.jsonl.gz" --out "$DATA/tokenizer" --vocab-size 1024
fi
if [ "$STAGE" -le 5 ]; then
  step "5 2D bins (30 duration x 5 token buckets)"
  [ -f "$DATA/bins.json" ] || speedasr bins --cuts "$DATA/train_cuts.jsonl.gz" \
    --tokenizer "$DATA/tokenizer" --out "$DATA/bins.json" --num-buckets 30 --num-token-buckets 5
fi
COMMON=(--data.train_cuts "$DATA/train_cuts.jsonl.gz" --data.dev_cuts "$DATA/dev_cuts.jsonl.gz"
        --data.tokenizer "$DATA/tokenizer" --sampler.bins "$DATA/bins.json")
if [ "$STAGE" -le 6 ]; then
  step "6 calibrate per-bucket batch sizes on one GPU (bf16, 90% of its memory)"
  speedasr calibrate --config "$CONFIG" --out "$DATA/calibrated.yaml" --json "$DATA/calibrated.json" \
    --memory-fraction 0.9 "${COMMON[@]}"
fi
if [ "$STAGE" -le 7 ]; then
  step "7 train (resumes from the newest checkpoint in $EXP/checkpoints if there is one)"
  RESUME=()
  compgen -G "$EXP/checkpoints/*.ckpt" > /dev/null && RESUME=(--resume last)
  speedasr train --config "$CONFIG" --config "$DATA/calibrated.yaml" --out_dir "$EXP" \
    "${COMMON[@]}" "${RESUME[@]}" "$@"
fi
if [ "$STAGE" -le 8 ]; then
  step "8 WER on test-clean and test-other"
  for part in test-clean test-other; do
    speedasr eval --ckpt "$EXP/checkpoints/last.ckpt" --cuts "$DATA/cuts_$part.jsonl.gz" \
      --out "$EXP/results_$part.jsonl"
  done
fi
