#!/usr/bin/env bash
# Import a NeMo Canary .nemo, fine-tune it padding-free on a lhotse corpus, export it back.
# Usage: bash recipes/canary_finetune/run.sh MODEL.nemo [extra `speedasr train` flags ...]
# Environment:
#   DATA    corpus dir with train_cuts.jsonl.gz, dev_cuts.jsonl.gz (test_cuts.jsonl.gz: evaluated
#           before and after). Default data/canary-finetune, synthesized with eSpeak NG (HOURS).
#   HOURS   hours of embedded speech to synthesize when DATA has no train_cuts (default 1.0).
#   CONFIG  training config (default recipes/canary_finetune/finetune.yaml).
#   EXP     output dir (default exp/canary-finetune): imported/, train/, finetuned.nemo.
#   EVAL_MAX  evaluate only the first N test cuts (default: all).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ $# -lt 1 ]; then
  echo "usage: bash recipes/canary_finetune/run.sh MODEL.nemo [speedasr train flags ...]" >&2
  exit 2
fi
NEMO=$1
shift
DATA=${DATA:-data/canary-finetune}
HOURS=${HOURS:-1.0}
CONFIG=${CONFIG:-recipes/canary_finetune/finetune.yaml}
EXP=${EXP:-exp/canary-finetune}
EVAL=()
[ -n "${EVAL_MAX:-}" ] && EVAL=(--max-utterances "$EVAL_MAX")
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 import $NEMO -> $EXP/imported"
speedasr import-nemo "$NEMO" --out "$EXP/imported" --overwrite  # a rerun imports again

step "2/5 corpus: $DATA"
if [ ! -f "$DATA/train_cuts.jsonl.gz" ]; then
  speedasr data synth --out "$DATA" --hours "$HOURS" --seed 0
else
  echo "corpus: $DATA/train_cuts.jsonl.gz exists, using it"
fi

if [ -f "$DATA/test_cuts.jsonl.gz" ]; then
  step "3/5 test WER before fine-tuning"
  speedasr eval --ckpt "$EXP/imported/model.ckpt" --cuts "$DATA/test_cuts.jsonl.gz" --quiet \
    "${EVAL[@]}" --json "$EXP/test_wer_before.json"
fi

step "4/5 fine-tune: $CONFIG -> $EXP/train"
speedasr train --config "$CONFIG" --init_from "$EXP/imported" --out_dir "$EXP/train" \
  --checkpoint.overwrite=true --data.train_cuts "$DATA/train_cuts.jsonl.gz" \
  --data.dev_cuts "$DATA/dev_cuts.jsonl.gz" "$@"
if [ -f "$DATA/test_cuts.jsonl.gz" ]; then
  speedasr eval --ckpt "$EXP/train/checkpoints/last.ckpt" --cuts "$DATA/test_cuts.jsonl.gz" \
    --quiet "${EVAL[@]}" --json "$EXP/test_wer_after.json"
fi

step "5/5 export -> $EXP/finetuned.nemo"
speedasr export-nemo --ckpt "$EXP/train/checkpoints/last.ckpt" --out "$EXP/finetuned.nemo" \
  --overwrite  # a rerun exports again
