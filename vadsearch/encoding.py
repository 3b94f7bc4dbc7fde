"""Text → token ids: spaCy words + a training vocabulary for the LSTM, WordPiece for BERT.

Encoding happens once per process and corpus (memoised), never per trial or epoch: every trial of a
study in one worker shares the same encoded splits. Each split is stored pre-padded as one 2-D array, so
a batch is a slice (`ids[rows, :longest]`) rather than a Python loop over sentences.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import numpy as np

from vadsearch.config import TrainConfig
from vadsearch.data import Corpus, Split
from vadsearch.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAD, UNK = "<pad>", "<unk>"


@dataclass(frozen=True)
class Vocabulary:
    """Index ↔ word; index 0 is `<pad>`, 1 is `<unk>`."""

    itos: tuple[str, ...]
    stoi: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.itos[:2] != (PAD, UNK):
            raise ValueError("a vocabulary starts with <pad>, <unk>")
        object.__setattr__(self, "stoi", {w: i for i, w in enumerate(self.itos)})

    @classmethod
    def build(cls, sentences: Iterable[list[str]], min_freq: int = 1) -> Vocabulary:
        counts = Counter(token for sentence in sentences for token in sentence)
        # Sorted by frequency, then alphabetically, so the same data always gives the same ids.
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls((PAD, UNK, *(w for w in words if w not in (PAD, UNK))))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, 1) for t in tokens] or [1]  # an empty sentence still has one step


@dataclass(frozen=True)
class EncodedSplit:
    """One split, padded to its longest sentence; `lengths` count real tokens."""

    ids: np.ndarray  # int64 (n, longest)
    lengths: np.ndarray  # int64 (n,)
    targets: np.ndarray  # float32 (n, 3)

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class EncodedCorpus:
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit
    pad_id: int
    vocab: Vocabulary | None = None  # the LSTM's; BERT's lives in its tokenizer


def word_tokenize(texts: Iterable[str], lowercase: bool) -> list[list[str]]:
    """spaCy's blank English tokenizer: rule-based, no model download."""
    nlp = _blank_english()
    return [[t.lower_ if lowercase else t.text for t in doc if not t.is_space] for doc in nlp.tokenizer.pipe(texts)]


@functools.cache
def _blank_english():
    try:
        import spacy
    except ImportError:
        raise ConfigError("the LSTM splits words with spaCy, which is not installed: pip install spacy") from None
    return spacy.blank("en")


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), max(lengths, default=1)), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids, lengths


def _encoded_split(rows: list[list[int]], split: Split, pad_id: int) -> EncodedSplit:
    ids, lengths = pad_rows(rows, pad_id)
    return EncodedSplit(ids, lengths, np.asarray(split.targets, dtype=np.float32).reshape(-1, 3))


_ENCODED: dict[tuple, EncodedCorpus] = {}


def _memoised(key: tuple, make) -> EncodedCorpus:
    """Keyed by the corpus checksum (a Corpus holds arrays, so it cannot be a cache key itself)."""
    if key not in _ENCODED:
        if len(_ENCODED) >= 4:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = make()
    return _ENCODED[key]


def encode_words(corpus: Corpus, lowercase: bool = True, min_freq: int = 1) -> EncodedCorpus:
    key = ("words", corpus.sha256, lowercase, min_freq)
    return _memoised(key, lambda: _encode_words(corpus, lowercase, min_freq))


def _encode_words(corpus: Corpus, lowercase: bool, min_freq: int) -> EncodedCorpus:
    from vadsearch.wordcache import corpus_tokens

    tokens = corpus_tokens(corpus, lowercase, word_tokenize)
    vocab = Vocabulary.build(tokens["train"], min_freq)
    splits = {
        name: _encoded_split([vocab.encode(t) for t in tokens[name]], corpus.splits[name], pad_id=0)
        for name in ("train", "dev", "test")
    }
    return EncodedCorpus(**splits, pad_id=0, vocab=vocab)


# Training (through the token cache) and prediction split words with word_tokenize alone, and encode
# subwords with subword_rows alone, so they can never disagree.
def word_rows(texts: Iterable[str], vocab: Vocabulary, lowercase: bool) -> list[list[int]]:
    return [vocab.encode(tokens) for tokens in word_tokenize(texts, lowercase)]


def subword_rows(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[int]]:
    texts = list(texts)
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if texts else []


def subword_pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    return _load_tokenizer(model_name)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model_name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the tokenizer of {model_name!r}: pass a hub id this machine can download, "
            f"or a local model directory ({str(exc).splitlines()[0]})"
        ) from None


def encode_subwords(corpus: Corpus, model_name: str, max_length: int) -> EncodedCorpus:
    key = ("subwords", corpus.sha256, model_name, max_length)
    return _memoised(key, lambda: _encode_subwords(corpus, model_name, max_length))


def _encode_subwords(corpus: Corpus, model_name: str, max_length: int) -> EncodedCorpus:
    tokenizer = load_tokenizer(model_name)
    pad_id = subword_pad_id(tokenizer)

    def encode(split: Split) -> EncodedSplit:
        return _encoded_split(subword_rows(split.texts, tokenizer, max_length), split, pad_id)

    return EncodedCorpus(encode(corpus.train), encode(corpus.dev), encode(corpus.test), pad_id=pad_id)


def encode_corpus(config: TrainConfig, corpus: Corpus) -> EncodedCorpus:
    """The encoded splits a model of `config` trains on (memoised per process)."""
    if config.model == "bert":
        return encode_subwords(corpus, config.model_name, config.max_length)
    return encode_words(corpus, config.lowercase, config.min_freq)
