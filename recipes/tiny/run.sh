#!/usr/bin/env bash
# The embedded-default recipe: synthesize a corpus with eSpeak NG, train a tokenizer and a small
# Canary-style model on CPU, evaluate it. Usage: bash recipes/tiny/run.sh [CONFIG] [key=value ...]
#   CONFIG defaults to recipes/tiny/demo.yaml; e.g. `bash recipes/tiny/run.sh recipes/tiny/wer30.yaml`.
# Environment: DATA (corpus dir, default data/tiny), HOURS (train hours, default from the config
# comment below), EXP (output dir, default exp/<config name>).
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIG=${1:-recipes/tiny/demo.yaml}
shift || true
NAME=$(basename "$CONFIG" .yaml)
DATA=${DATA:-data/tiny}
HOURS=${HOURS:-1.0}
EXP=${EXP:-exp/tiny-$NAME}
start=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/4 corpus: $HOURS h of eSpeak NG speech -> $DATA"
speedasr data synth --out "$DATA" --hours "$HOURS" --seed 0

step "2/4 tokenizer: sentencepiece BPE on the train transcripts"
if [ ! -f "$DATA/tokenizer/tokenizer.model" ]; then
  speedasr tokenizer train --cuts "$DATA/train_cuts.jsonl.gz" --out "$DATA/tokenizer" --vocab-size 256
else
  echo "tokenizer: $DATA/tokenizer exists, reusing it"
fi

step "3/4 train: $CONFIG -> $EXP"
speedasr train --config "$CONFIG" --out_dir "$EXP" \
  --data.train_cuts "$DATA/train_cuts.jsonl.gz" --data.dev_cuts "$DATA/dev_cuts.jsonl.gz" \
  --data.tokenizer "$DATA/tokenizer" "$@"

step "4/4 eval: test set WER"
speedasr eval --ckpt "$EXP/checkpoints/last.ckpt" --cuts "$DATA/test_cuts.jsonl.gz" \
  --out "$EXP/test_results.jsonl"

echo
echo "demo done in $(( $(date +%s) - start )) s. Padding/throughput report: speedasr profile --log-dir $EXP"
