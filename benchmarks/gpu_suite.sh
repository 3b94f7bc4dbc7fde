#!/usr/bin/env bash
# The GPU measurements in one command, inside a time budget: each part runs under its own limit, cut to
# what is left of the budget, so that one slow part cannot eat the others' time and the command ends
# before the device call's own limit. Every part writes what it measured to $OUT as it goes.
#
#   benchmarks/stage_gpu.sh                       # here, once: data, MiniLM, tokens and wheels into .gpu/, .whl/
#   benchmarks/gpu_suite.sh                       # on the GPU machine: every part, in this order
#   benchmarks/gpu_suite.sh tests bert            # some parts
#   DRY_RUN=1 BUDGET_S=560 benchmarks/gpu_suite.sh tests bert grid-bert   # the plan, as if each part ran to its limit
#
# Parts: tests      the GPU tests (real CUDA graphs against the eager step, CUDA collate and predict, OOM)
#        bert       bench_train.py BERT rows: eager, CUDA graphs, each with and without MPS; MiniLM quality
#        lstm       bench_train.py LSTM rows, with and without MPS
#        grid-bert  the report's BERT grid end to end through launch (random bert-base, graphs, MPS)
#        grid-lstm  the report's LSTM grid end to end through launch (stand-in vectors, MPS)
#
# Device time is scarce (15 minutes a session, of which each machine start takes 1-2): plan calls whose
# BUDGET_S add up to about 12 minutes, the most wanted figures first, e.g. `BUDGET_S=420 ... bert`, then
# `BUDGET_S=300 ... grid-bert lstm`, and `tests` with what is left. The exit status is 0 only when every
# part asked for ran to the end with exit 0 (a part cut by its limit, failed or skipped: 1).
#
# Settings (environment): BUDGET_S (seconds for the whole command, default 560: one device call is at
# most 600), MIN_PART_S (a part that would get less is skipped, default 60), DATA (EmoBank CSV), MINILM
# (the pretrained MiniLM folder), OUT (where results go, default ./gpu-results), WORKERS (BERT workers
# per GPU, default 8), LSTM_WORKERS (default 8), PART_LIMIT_S (one limit for every part instead of each
# part's own below), DRY_RUN=1 (print each part's limit and command instead, counting each part as if
# it ran to its limit). Where stage_gpu.sh made .gpu/, DATA, MINILM and the token cache default to it;
# where it made .whl/ and optuna is missing, the wheels are installed into a temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
staged=.gpu
[ -d "$staged" ] && export VADSEARCH_CACHE=${VADSEARCH_CACHE:-$PWD/$staged/cache}  # spaCy-free LSTM tokens
[ -f "$staged/emobank.csv" ] && DATA=${DATA:-$staged/emobank.csv}
[ -d "$staged/minilm" ] && MINILM=${MINILM:-$staged/minilm}
DATA=${DATA:-../shared/data/emobank.csv}
MINILM=${MINILM:-../shared/models/minilm-l6-h384-uncased-fp16}
OUT=${OUT:-gpu-results}
WORKERS=${WORKERS:-8}
LSTM_WORKERS=${LSTM_WORKERS:-8}
BUDGET_S=${BUDGET_S:-560}
MIN_PART_S=${MIN_PART_S:-60}
mkdir -p "$OUT"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bert grid-bert lstm grid-lstm)
for part in "${parts[@]}"; do
  case "$part" in
    tests|bert|lstm|grid-bert|grid-lstm) ;;
    *) echo "unknown part: $part (tests|bert|lstm|grid-bert|grid-lstm)" >&2; exit 2 ;;
  esac
done

started=$SECONDS  # the budget counts from here: installing the wheels spends it too
# The workers `launch` starts import vadsearch from here; carried wheels supply what the machine lacks.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${DRY_RUN:-}" ] && [ -d .whl ] && ! python3 -c 'import optuna, sqlalchemy' 2>/dev/null; then
  site=$(mktemp -d /tmp/vadsearch-site.XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
    || { echo "could not install the wheels in .whl/" >&2; exit 1; }
  export PYTHONPATH=$site:$PYTHONPATH
fi

summary=$OUT/summary.txt
[ -n "${DRY_RUN:-}" ] && summary=/dev/null
spent=0  # seconds of the budget used so far; a dry run counts each part at its full limit
status=0  # 1 once a part is skipped, cut short or fails: the figures are incomplete
run() {  # run NAME LIMIT_S COMMAND...: time-limited, output kept in $OUT/NAME.log
  local name=$1 limit=${PART_LIMIT_S:-$2}; shift 2
  [ -z "${DRY_RUN:-}" ] && spent=$((SECONDS - started))
  local left=$((BUDGET_S - spent))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$MIN_PART_S" ]; then
    echo "$name: skipped, $left s of the $BUDGET_S s budget left" | tee -a "$summary"
    [ -z "${DRY_RUN:-}" ] && status=1
    return
  fi
  if [ -n "${DRY_RUN:-}" ]; then
    echo "$name [$limit s]: $*"
    spent=$((spent + limit))
    return
  fi
  local part_started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local code=$?
  [ "$code" -ne 0 ] && status=1
  echo "$name: exit $code after $((SECONDS - part_started)) s$([ "$code" -eq 124 ] && echo ", cut at its limit")" \
    | tee -a "$summary"
  tail -n 25 "$OUT/$name.log"
}

[ -z "${DRY_RUN:-}" ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$summary"
for part in "${parts[@]}"; do
  case "$part" in
    # Only the modules with GPU tests: the others import what the GPU machine may lack (psycopg, plotly).
    tests) run tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider $(grep -l 'mark\.gpu' tests/test_*.py) ;;
    bert) run bert 600 python3 benchmarks/bench_train.py --models bert --workers "$WORKERS" --graphs --mps \
            --quality --data "$DATA" --minilm "$MINILM" --json "$OUT/bert.json" ;;
    lstm) run lstm 300 python3 benchmarks/bench_train.py --models lstm --workers "$LSTM_WORKERS" --mps \
            --data "$DATA" --minilm "$MINILM" --json "$OUT/lstm.json" ;;
    grid-bert) VADSEARCH_CUDA_GRAPHS=1 run grid-bert 300 python3 benchmarks/bench_grid.py studies/bert.toml \
                 --workers 6 --random-base --mps --device cuda --data "$DATA" --minilm "$MINILM" ;;
    grid-lstm) run grid-lstm 600 python3 benchmarks/bench_grid.py studies/lstm.toml --workers "$LSTM_WORKERS" \
                 --random-vectors --mps --device cuda --data "$DATA" ;;
  esac
done
exit $status
