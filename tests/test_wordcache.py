"""The on-disk word-token cache: written once, read by later workers, rebuilt when it cannot be trusted."""

from __future__ import annotations

import gzip
import logging
import json
from pathlib import Path

import numpy as np
import pytest

from vadsearch import encoding, wordcache
from vadsearch.data import Corpus
from vadsearch.encoding import encode_words, word_tokenize
from vadsearch.errors import ConfigError


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private cache folder, and no in-process memo: every encode goes through the disk cache."""
    monkeypatch.setenv("VADSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(encoding, "_ENCODED", {})
    return tmp_path / "cache"


def _forbid_spacy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse():
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(encoding, "_blank_english", refuse)


def _same(a, b) -> None:
    for name in ("train", "dev", "test"):
        np.testing.assert_array_equal(getattr(a, name).ids, getattr(b, name).ids)
    assert a.vocab == b.vocab


def test_a_second_worker_reads_the_tokens_instead_of_tokenizing(cache, tiny_corpus: Corpus, monkeypatch,
                                                                caplog) -> None:
    caplog.set_level(logging.INFO, logger="vadsearch.wordcache")
    first = encode_words(tiny_corpus, lowercase=True)
    sentences = sum(len(split.texts) for split in (tiny_corpus.train, tiny_corpus.dev, tiny_corpus.test))
    said = [m for m in caplog.messages if m.startswith("splitting")]
    assert said == [f"splitting {sentences} sentences into words with spaCy, once: kept in {cache / 'tokens'}"]
    path = wordcache.cache_path(tiny_corpus, True)
    assert path.is_file() and path.parent.parent == cache
    stored = json.loads(gzip.decompress(path.read_bytes()))
    assert stored["sha256"] == tiny_corpus.sha256 and stored["spacy"] == wordcache.spacy_version()
    assert stored["splits"]["dev"] == word_tokenize(tiny_corpus.dev.texts, True)

    monkeypatch.setattr(encoding, "_ENCODED", {})  # a new process
    _forbid_spacy(monkeypatch)
    _same(encode_words(tiny_corpus, lowercase=True), first)
    assert len([m for m in caplog.messages if m.startswith("splitting")]) == 1  # read, not split: nothing said


def test_casing_has_its_own_file(cache, tiny_corpus: Corpus) -> None:
    encode_words(tiny_corpus, lowercase=True)
    encode_words(tiny_corpus, lowercase=False)
    assert wordcache.cache_path(tiny_corpus, True) != wordcache.cache_path(tiny_corpus, False)
    assert wordcache.cache_path(tiny_corpus, False).is_file()


def test_tokens_of_another_spacy_version_are_rebuilt(cache, tiny_corpus: Corpus, monkeypatch) -> None:
    encode_words(tiny_corpus, lowercase=True)
    path = wordcache.cache_path(tiny_corpus, True)
    stored = json.loads(gzip.decompress(path.read_bytes()))
    stored["spacy"], stored["splits"]["train"] = "0.0.1", [["stale"]] * len(tiny_corpus.train)
    path.write_bytes(gzip.compress(json.dumps(stored).encode()))

    monkeypatch.setattr(encoding, "_ENCODED", {})
    encoded = encode_words(tiny_corpus, lowercase=True)
    assert "stale" not in encoded.vocab.stoi
    assert json.loads(gzip.decompress(path.read_bytes()))["spacy"] == wordcache.spacy_version()


def test_a_machine_without_spacy_uses_tokens_cached_elsewhere(cache, tiny_corpus: Corpus, monkeypatch) -> None:
    first = encode_words(tiny_corpus, lowercase=True)
    monkeypatch.setattr(encoding, "_ENCODED", {})
    monkeypatch.setattr(wordcache, "spacy_version", lambda: None)
    _forbid_spacy(monkeypatch)
    _same(encode_words(tiny_corpus, lowercase=True), first)


@pytest.mark.parametrize("damage", [b"", b"\x1f\x8b\x08garbage", gzip.compress(b"{not json", mtime=0),
                                    gzip.compress(b'{"format": 1, "splits": {"train": []}}', mtime=0)],
                         ids=["empty", "truncated gzip", "not json", "old format"])
def test_a_damaged_cache_file_is_rebuilt(cache, tiny_corpus: Corpus, monkeypatch, damage: bytes) -> None:
    first = encode_words(tiny_corpus, lowercase=True)
    path = wordcache.cache_path(tiny_corpus, True)
    path.write_bytes(damage)
    monkeypatch.setattr(encoding, "_ENCODED", {})
    _same(encode_words(tiny_corpus, lowercase=True), first)
    assert json.loads(gzip.decompress(path.read_bytes()))["sha256"] == tiny_corpus.sha256


def test_an_unwritable_cache_costs_only_the_caching(cache, tiny_corpus: Corpus) -> None:
    cache.parent.mkdir(exist_ok=True)
    cache.write_text("a file where the cache folder should be")
    encoded = encode_words(tiny_corpus, lowercase=True)
    assert len(encoded.train) == len(tiny_corpus.train)


def test_no_spacy_and_no_cache_is_one_clear_error(cache, tiny_corpus: Corpus, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_spacy(name, *args, **kwargs):
        if name == "spacy":
            raise ImportError("No module named 'spacy'")
        return real_import(name, *args, **kwargs)

    encoding._blank_english.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_spacy)
    with pytest.raises(ConfigError, match="pip install spacy"):
        encode_words(tiny_corpus, lowercase=True)
    monkeypatch.undo()
    encoding._blank_english.cache_clear()
