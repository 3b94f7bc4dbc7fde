"""spaCy word tokens of a corpus, kept on disk so that the workers of a study tokenize it once between them.

A file is keyed by the corpus checksum and the casing. The spaCy version that produced the tokens is
stored inside: a machine with another spaCy version installed tokenizes again (its rules may split
words differently), and a machine without spaCy can train on tokens cached elsewhere.
"""

from __future__ import annotations

import gzip
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from vadsearch.data import SPLITS, Corpus, cache_dir
from vadsearch.outdir import replacing

log = logging.getLogger(__name__)

FORMAT = 1
Tokenize = Callable[[Iterable[str], bool], list[list[str]]]


def cache_path(corpus: Corpus, lowercase: bool) -> Path:
    return cache_dir() / "tokens" / f"words-{corpus.sha256[:16]}-{'lower' if lowercase else 'cased'}.json.gz"


def spacy_version() -> str | None:
    try:
        return metadata.version("spacy")
    except metadata.PackageNotFoundError:
        return None


def corpus_tokens(corpus: Corpus, lowercase: bool, tokenize: Tokenize) -> dict[str, list[list[str]]]:
    """Tokens of every split of `corpus`, from the cache when it holds them, else from `tokenize`."""
    path = cache_path(corpus, lowercase)
    installed = spacy_version()
    stored = _read(path)
    if stored and stored.get("sha256") == corpus.sha256 and installed in (None, stored.get("spacy")):
        return stored["splits"]
    # Tens of seconds on the whole corpus, before the first epoch: said, or the worker looks hung.
    log.info("splitting %d sentences into words with spaCy, once: kept in %s",
             sum(len(corpus.splits[name].texts) for name in SPLITS), path.parent)
    splits = {name: tokenize(corpus.splits[name].texts, lowercase) for name in SPLITS}
    _write(path, {"format": FORMAT, "sha256": corpus.sha256, "spacy": installed, "splits": splits})
    return splits


def _read(path: Path) -> dict | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            stored = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, EOFError, ValueError) as exc:  # torn, truncated, not gzip, not JSON: tokenize again
        log.warning("token cache %s unreadable (%s); tokenizing again", path, type(exc).__name__)
        return None
    ok = isinstance(stored, dict) and stored.get("format") == FORMAT and isinstance(stored.get("splits"), dict)
    return stored if ok and all(name in stored["splits"] for name in SPLITS) else None


def _write(path: Path, payload: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Concurrent workers each write whole files; the last rename wins.
        with replacing(path) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(payload, f, ensure_ascii=False)
    except OSError as exc:
        # A read-only cache costs each worker its own tokenization, nothing more.
        log.debug("token cache %s not written: %s", path, exc)
