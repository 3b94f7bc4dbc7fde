#!/usr/bin/env bash
# The GPU measurements in one command, each part under its own time limit so that one slow part cannot
# eat the others' time. Every part writes what it measured to $OUT as it goes.
#
#   benchmarks/gpu_suite.sh                      # every part, in this order
#   benchmarks/gpu_suite.sh tests bert grid-bert  # some parts
#
# Parts: tests      the GPU tests (real CUDA graphs against the eager step, CUDA collate and predict)
#        bert       bench_train.py BERT rows: eager, CUDA graphs, each with and without MPS; MiniLM quality
#        lstm       bench_train.py LSTM rows, with and without MPS
#        grid-bert  the report's BERT grid end to end through launch (random bert-base, graphs, MPS)
#        grid-lstm  the report's LSTM grid end to end through launch (stand-in vectors, MPS)
#
# Settings (environment): DATA (EmoBank CSV), MINILM (the pretrained MiniLM folder), OUT (where results
# go, default ./gpu-results), WORKERS (BERT workers per GPU, default 8), LSTM_WORKERS (default 8),
# PART_LIMIT_S (seconds for every part; by default each part's own limit below), DRY_RUN=1 (print each
# part's command instead).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/emobank.csv}
MINILM=${MINILM:-../shared/models/minilm-l6-h384-uncased-fp16}
OUT=${OUT:-gpu-results}
WORKERS=${WORKERS:-8}
LSTM_WORKERS=${LSTM_WORKERS:-8}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bert grid-bert lstm grid-lstm)

run() {  # run NAME LIMIT_S COMMAND...: time-limited, output kept in $OUT/NAME.log
  local name=$1 limit=${PART_LIMIT_S:-$2}; shift 2
  if [ -n "${DRY_RUN:-}" ]; then echo "$name: $*"; return; fi
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}

[ -z "${DRY_RUN:-}" ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/summary.txt"
for part in "${parts[@]}"; do
  case "$part" in
    tests) run tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
    bert) run bert 600 python3 benchmarks/bench_train.py --models bert --workers "$WORKERS" --graphs --mps \
            --quality --data "$DATA" --minilm "$MINILM" --json "$OUT/bert.json" ;;
    lstm) run lstm 300 python3 benchmarks/bench_train.py --models lstm --workers "$LSTM_WORKERS" --mps \
            --data "$DATA" --minilm "$MINILM" --json "$OUT/lstm.json" ;;
    grid-bert) VADSEARCH_CUDA_GRAPHS=1 run grid-bert 300 python3 benchmarks/bench_grid.py studies/bert.toml \
                 --workers 6 --random-base --mps --device cuda --data "$DATA" --minilm "$MINILM" ;;
    grid-lstm) run grid-lstm 600 python3 benchmarks/bench_grid.py studies/lstm.toml --workers "$LSTM_WORKERS" \
                 --random-vectors --mps --device cuda --data "$DATA" ;;
    *) echo "unknown part: $part (tests|bert|lstm|grid-bert|grid-lstm)" >&2; exit 2 ;;
  esac
done
