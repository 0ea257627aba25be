#!/usr/bin/env bash
# The embedded-default recipe: synthesize a corpus with eSpeak NG, train a tokenizer and a small
# Canary-style model on CPU, evaluate it. Usage: bash recipes/tiny/run.sh [CONFIG] [key=value ...]
#   CONFIG defaults to recipes/tiny/demo.yaml; e.g. `bash recipes/tiny/run.sh recipes/tiny/wer30.yaml`.
# Environment: HOURS (hours of speech to synthesize), DATA (corpus dir), VOCAB (BPE size), EXP
# (output dir). Defaults per config: demo 3 h in data/tiny-3h with BPE 128; wer30 5 h in
# data/tiny-5h with BPE 512; any other config 1 h in data/tiny with BPE 512.
set -euo pipefail
cd "$(dirname "$0")/../.."

CONFIG=${1:-recipes/tiny/demo.yaml}
shift || true
[ -f "$CONFIG" ] || { echo "run.sh: config $CONFIG: no such file" >&2; exit 2; }
command -v speedasr >/dev/null || { echo "run.sh: speedasr is not on PATH (make demo sets it up)" >&2; exit 2; }
NAME=$(basename "$CONFIG" .yaml)
# BPE 512 at 8x subsampling (12.5 encoder frames/s): this fast eSpeak speech needs ~0.5 tokens per
# frame; BPE 256 needs ~0.7 and some utterances cannot be CTC-aligned. The demo's 4x (25 frames/s)
# leaves room for BPE 128, whose smaller units CTC learns sooner (docs/training.md).
case "$NAME" in
  demo)  HOURS=${HOURS:-3.0}; DATA=${DATA:-data/tiny-3h}; VOCAB=${VOCAB:-128} ;;
  wer30) HOURS=${HOURS:-5.0}; DATA=${DATA:-data/tiny-5h} ;;
  *)     HOURS=${HOURS:-1.0}; DATA=${DATA:-data/tiny} ;;
esac
VOCAB=${VOCAB:-512}
TOKENIZER="$DATA/tokenizer-bpe$VOCAB"
EXP=${EXP:-exp/tiny-$NAME}
start=$(date +%s)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/4 corpus: $HOURS h of eSpeak NG speech -> $DATA"
speedasr data synth --out "$DATA" --hours "$HOURS" --seed 0

step "2/4 tokenizer: sentencepiece BPE ($VOCAB) on the train transcripts"
if [ ! -f "$TOKENIZER/tokenizer.model" ]; then
  speedasr tokenizer train --cuts "$DATA/train_cuts.jsonl.gz" --out "$TOKENIZER" --vocab-size "$VOCAB"
else
  echo "tokenizer: $TOKENIZER exists, reusing it"
fi

step "3/4 train: $CONFIG -> $EXP"
# A re-run of the demo trains anew, replacing $EXP's checkpoints (with --resume last it continues).
speedasr train --config "$CONFIG" --out_dir "$EXP" --checkpoint.overwrite=true \
  --data.train_cuts "$DATA/train_cuts.jsonl.gz" --data.dev_cuts "$DATA/dev_cuts.jsonl.gz" \
  --data.tokenizer "$TOKENIZER" "$@"

step "4/4 eval: test set WER: attention decoder; CTC head alone; both jointly (CTC weight 0.3)"
speedasr eval --ckpt "$EXP/checkpoints/last.ckpt" --cuts "$DATA/test_cuts.jsonl.gz" \
  --out "$EXP/test_results.jsonl" --json "$EXP/test_wer.json"
speedasr eval --ckpt "$EXP/checkpoints/last.ckpt" --cuts "$DATA/test_cuts.jsonl.gz" \
  --decoder ctc --out "$EXP/test_results_ctc.jsonl" --json "$EXP/test_wer_ctc.json"
speedasr eval --ckpt "$EXP/checkpoints/last.ckpt" --cuts "$DATA/test_cuts.jsonl.gz" \
  --ctc-weight 0.3 --out "$EXP/test_results_joint.jsonl" --json "$EXP/test_wer_joint.json"

echo
echo "demo done in $(( $(date +%s) - start )) s. Padding/throughput report: speedasr profile --log-dir $EXP"
