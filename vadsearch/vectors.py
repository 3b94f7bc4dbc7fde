"""External word vectors (GloVe or word2vec text format) for the LSTM's embedding layer."""

from __future__ import annotations

import functools
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vadsearch.encoding import Vocabulary
from vadsearch.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embeddings:
    matrix: np.ndarray  # float32 (len(vocab), dim); row 0 (<pad>) is zero
    found: int
    missing: int  # vocabulary words absent from the file: they start random


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def load_vectors(path: str | Path, vocab: Vocabulary, seed: int = 0) -> Embeddings:
    """Memoised per process: a grid runs many trials on the same file and vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"word-vector file not found: {path}")
    stat = path.stat()
    return _load_vectors(str(path.resolve()), stat.st_mtime_ns, stat.st_size, vocab, seed)


@functools.lru_cache(maxsize=2)
def _load_vectors(path: str, _mtime_ns: int, _size: int, vocab: Vocabulary, seed: int) -> Embeddings:
    """Rows of `vocab` found in the file (exactly, else lowercased); the rest drawn N(0, 0.1²).

    Streams the file once and keeps only the vocabulary's rows, so a multi-GB file needs no more memory
    than the vocabulary does.
    """
    path = Path(path)
    rows: dict[int, np.ndarray] = {}
    dim = None
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                dim = int(parts[1])  # word2vec text header: "<count> <dim>"
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) < dim + 1:
                if not line.strip():
                    continue
                raise ConfigError(f"{path}, line {number}: expected a word and {dim} numbers")
            word = " ".join(parts[:-dim])  # some GloVe files hold words with spaces
            index = vocab.stoi.get(word)
            if index is None and word.lower() != word:
                index = vocab.stoi.get(word.lower())
            if index is None or index in rows:
                continue
            try:
                rows[index] = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError:
                raise ConfigError(f"{path}, line {number}: not a number in the vector of {word!r}") from None
    if not dim:
        raise ConfigError(f"word-vector file is empty: {path}")
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)
    matrix[0] = 0.0
    for index, vector in rows.items():
        matrix[index] = vector
    found = len(rows.keys() - {0})
    missing = len(vocab) - 2 - len(rows.keys() - {0, 1})
    log.info("word vectors: %d of %d vocabulary words found in %s, %d missing", found, len(vocab) - 2, path, missing)
    return Embeddings(matrix, found, missing)
