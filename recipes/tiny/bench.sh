#!/usr/bin/env bash
# `make bench`: the CPU benchmarks of docs/benchmarks.md on the embedded corpus and the shared
# real length profiles. Each prints its table; JSON results go to exp/bench/.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/tiny}
OUT=${OUT:-exp/bench}
mkdir -p "$OUT"
speedasr data synth --out "$DATA" --hours 1.0 --seed 0
[ -f "$DATA/tokenizer/tokenizer.model" ] || \
  speedasr tokenizer train --cuts "$DATA/train_cuts.jsonl.gz" --out "$DATA/tokenizer" --vocab-size 256

echo "== padding (metadata only)"
speedasr bench padding --synthetic-hours 100 --budget-seconds 600 --json "$OUT/padding_synth100h.json"
REAL=../shared/data/real_lengths/commonvoice_id_train.tsv.gz
[ -f "$REAL" ] && speedasr bench padding --cuts "$REAL" --language id --budget-seconds 120 \
  --json "$OUT/padding_cv_id_train.json"

echo "== training throughput: packed vs padded"
speedasr bench throughput --cuts "$DATA/train_cuts.jsonl.gz" --tokenizer "$DATA/tokenizer" \
  --budget-seconds 120 --steps 8 --repeats 5 --json "$OUT/throughput.json"

echo "== inference RTFx: encoder/decoder splits"
speedasr bench rtfx --cuts "$DATA/test_cuts.jsonl.gz" --tokenizer "$DATA/tokenizer" --json "$OUT/rtfx.json"
speedasr bench rtfx --cuts "$DATA/test_cuts.jsonl.gz" --tokenizer "$DATA/tokenizer" --dtype bfloat16 \
  --json "$OUT/rtfx_bf16.json"
