"""External word vectors (GloVe or word2vec text format) for the LSTM's embedding layer."""

from __future__ import annotations

import functools
import gzip
import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vadsearch import interrupts
from vadsearch.data import cache_dir, user_path
from vadsearch.download import DownloadError, download_verified
from vadsearch.encoding import Vocabulary
from vadsearch.errors import ConfigError
from vadsearch.outdir import replacing

log = logging.getLogger(__name__)

GLOVE_6B_URL = "https://nlp.stanford.edu/data/glove.6B.zip"
GLOVE_6B_SHA256 = "617afb2fe6cbd085c235baf7a465b96f4112bd7f7ccb2b2cbd649fed9cbcf2fb"  # 862,182,613 bytes
# Named vector sets a study file may give as `vectors`: name → (archive URL, its sha256, member).
NAMED_VECTORS = {
    f"glove.6B.{dim}d": (GLOVE_6B_URL, GLOVE_6B_SHA256, f"glove.6B.{dim}d.txt") for dim in (50, 100, 200, 300)
}


def resolve_vectors(name_or_path: str, *, download: bool = True) -> Path:
    """A vector file on disk: the path itself, or a named set from the cache (downloaded once).

    The name, not the path, is what a study records, so workers on machines with different cache
    locations share checkpoints and results.
    """
    path = user_path(name_or_path, "word vectors", ConfigError)
    if path.is_file():
        return path
    if name_or_path not in NAMED_VECTORS:
        known = ", ".join(NAMED_VECTORS)
        raise ConfigError(f"word vectors {name_or_path!r} are neither a file nor a known name ({known})")
    url, sha256, member = NAMED_VECTORS[name_or_path]
    folder = cache_dir() / "vectors"
    extracted = folder / member
    if extracted.is_file():
        return extracted
    hint = ("download the vectors yourself and pass their path: --vectors PATH (train, reproduce), "
            "--set vectors=PATH (worker, launch)")
    archive = folder / Path(url).name
    if not archive.is_file():
        if not download:
            raise ConfigError(f"word vectors {name_or_path} are not in the cache ({folder}); {hint}")
        try:
            download_verified(url, archive, sha256, label=archive.name, hint=hint)
        except DownloadError as exc:
            raise ConfigError(f"word vectors {name_or_path} unavailable: {exc}") from None
    _extract(archive, member, extracted)
    return extracted


def _extract(archive: Path, member: str, dest: Path) -> None:
    try:
        with (replacing(dest) as tmp, zipfile.ZipFile(archive) as zf, zf.open(member) as src,
              open(tmp, "wb") as out):
            shutil.copyfileobj(src, out, 1024 * 1024)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ConfigError(f"cannot extract {member} from {archive}: {exc}") from None


@dataclass(frozen=True)
class Embeddings:
    matrix: np.ndarray  # float32 (len(vocab), dim); row 0 (<pad>) is zero
    found: int
    missing: int  # vocabulary words absent from the file: they start random


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def load_vectors(name_or_path: str | Path, vocab: Vocabulary, seed: int = 0) -> Embeddings:
    """Memoised per process: a grid runs many trials on the same file and vocabulary."""
    path = resolve_vectors(str(name_or_path))
    stat = path.stat()
    try:
        return _load_vectors(str(path.resolve()), stat.st_mtime_ns, stat.st_size, vocab, seed)
    except (OSError, EOFError) as exc:  # a torn download, a .gz that is not gzipped: one line, not a traceback
        raise ConfigError(f"cannot read word vectors {path}: {exc}; download them again or pass another file") from None


@functools.lru_cache(maxsize=2)
def _load_vectors(path: str, _mtime_ns: int, _size: int, vocab: Vocabulary, seed: int) -> Embeddings:
    """Rows of `vocab` found in the file (exactly, else lowercased); the rest drawn N(0, 0.1²).

    Streams the file once and keeps only the vocabulary's rows, so a multi-GB file needs no more memory
    than the vocabulary does.
    """
    path = Path(path)
    exact: dict[int, np.ndarray] = {}
    folded: dict[int, np.ndarray] = {}  # matched only after lowercasing: used where no exact row exists
    dim = None
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            if number % 50_000 == 0:
                interrupts.stop_point()  # a Ctrl-C held by training (train.py) waits for 50,000 lines, not 400,000
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
            index, table = vocab.stoi.get(word), exact
            if index is None:
                index, table = vocab.stoi.get(word.lower()), folded
            if index is None or index < 2 or index in table:  # <pad> stays zero, <unk> stays random
                continue
            try:
                table[index] = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError:
                raise ConfigError(f"{path}, line {number}: not a number in the vector of {word!r}") from None
    if not dim:
        raise ConfigError(f"word-vector file is empty: {path}")
    rows = {**folded, **exact}
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)
    matrix[0] = 0.0
    for index, vector in rows.items():
        matrix[index] = vector
    found = len(rows)
    missing = len(vocab) - 2 - found
    log.info("word vectors: %d of %d vocabulary words found in %s, %d missing", found, len(vocab) - 2, path, missing)
    if not found:  # random embeddings under the name of pretrained ones: another language, or a bad file
        log.warning("word vectors: none of the %d vocabulary words is in %s; the embeddings start random",
                    len(vocab) - 2, path)
    return Embeddings(matrix, found, missing)
