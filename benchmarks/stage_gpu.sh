#!/usr/bin/env bash
# Stage what gpu_suite.sh needs on a GPU machine that has no network, no spaCy and no optuna, into two
# git-ignored folders of this checkout that a device call carries with the working tree:
#   .gpu/emobank.csv, .gpu/minilm/   the corpus and the pretrained MiniLM (quality guard, tokenizer)
#   .gpu/cache/tokens/               the LSTM's spaCy word tokens of that corpus, made here
#   .whl/                            optuna, sqlalchemy and what they need, as wheels for that machine
# Then, on the GPU machine: benchmarks/gpu_suite.sh (it finds both folders by itself).
#
#   PYTHON=.venv/bin/python benchmarks/stage_gpu.sh   # from ../shared (data, model, wheel script)
#   SHARED=/path/to/shared ROOT=/other/checkout ...    # another shared folder; stage into another checkout
#
# PYTHON (default python3) must have vadsearch and spaCy installed: it makes the tokens.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "${ROOT:-$here}"
SHARED=$(cd "${SHARED:-$here/../shared}" && pwd)
PYTHON=${PYTHON:-python3}
staged=.gpu

rm -rf "$staged"
mkdir -p "$staged"
cp "$SHARED/data/emobank.csv" "$staged/emobank.csv"
cp -r "$SHARED/models/minilm-l6-h384-uncased-fp16" "$staged/minilm"
chmod -R u+w "$staged"
VADSEARCH_CACHE=$PWD/$staged/cache "$PYTHON" - "$staged/emobank.csv" <<'EOF'
import sys

from vadsearch.data import load_corpus
from vadsearch.encoding import encode_words
from vadsearch.wordcache import cache_path

corpus = load_corpus(sys.argv[1])
for lowercase in (True, False):  # the studies' `lowercase` either way
    encode_words(corpus, lowercase)
    print(f"tokens: {cache_path(corpus, lowercase)}")
EOF
rm -rf .whl  # wheels of an earlier staging beside new ones: two versions of a package stop the install
"$SHARED/tools/device-wheels.sh" core
du -sh "$staged"
echo "device call: carry [\"$staged\", \".whl\"], command benchmarks/gpu_suite.sh PARTS (see its header)"
