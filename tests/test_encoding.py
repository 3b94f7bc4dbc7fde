"""Text → ids: spaCy words and a training vocabulary for the LSTM, WordPiece for BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import write_csv
from vadsearch.config import TrainConfig
from vadsearch.data import Corpus, load_corpus
from vadsearch.encoding import (
    PAD,
    UNK,
    EncodedSplit,
    Vocabulary,
    encode_corpus,
    encode_subwords,
    encode_words,
    load_tokenizer,
    pad_rows,
    word_tokenize,
)
from vadsearch.errors import ConfigError

# ------------------------------------------------------------------------------------------ tokenizing


def test_word_tokenize_splits_punctuation_and_lowercases() -> None:
    assert word_tokenize(["Hello, World!  I can't go."], lowercase=True) == [
        ["hello", ",", "world", "!", "i", "ca", "n't", "go", "."]
    ]


def test_word_tokenize_keeps_case_when_asked() -> None:
    assert word_tokenize(["Hello, World!"], lowercase=False) == [["Hello", ",", "World", "!"]]


def test_word_tokenize_drops_whitespace_and_keeps_one_list_per_text() -> None:
    assert word_tokenize(["", "   ", "a \n b"], lowercase=True) == [[], [], ["a", "b"]]


# ------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_reserves_pad_and_unk() -> None:
    vocab = Vocabulary.build([["b", "a"], ["a"]])
    assert vocab.itos[:2] == (PAD, UNK)
    assert vocab.stoi[PAD] == 0 and vocab.stoi[UNK] == 1


def test_vocabulary_orders_by_frequency_then_alphabet() -> None:
    vocab = Vocabulary.build([["c", "b", "a"], ["b", "z"], ["b", "c"]])
    assert vocab.itos == (PAD, UNK, "b", "c", "a", "z")


def test_vocabulary_is_deterministic_whatever_the_sentence_order() -> None:
    sentences = [["x", "y"], ["y", "z"], ["w"], ["z", "x"]]
    assert Vocabulary.build(sentences) == Vocabulary.build(list(reversed(sentences)))


def test_vocabulary_min_freq_maps_rare_words_to_unk() -> None:
    vocab = Vocabulary.build([["a", "b"], ["a", "c"], ["a", "b"]], min_freq=2)
    assert vocab.itos == (PAD, UNK, "a", "b")
    assert vocab.encode(["a", "c", "b", "never"]) == [2, 1, 3, 1]


def test_vocabulary_never_duplicates_special_tokens() -> None:
    vocab = Vocabulary.build([[PAD, UNK, "a"]])
    assert vocab.itos == (PAD, UNK, "a")


def test_encode_unknown_word_and_empty_sentence() -> None:
    vocab = Vocabulary.build([["known"]])
    assert vocab.encode(["known", "unknown"]) == [2, 1]
    assert vocab.encode([]) == [1]  # an empty sentence still has one step for the LSTM


def test_vocabulary_must_start_with_pad_and_unk() -> None:
    with pytest.raises(ValueError, match="<pad>, <unk>"):
        Vocabulary(("a", "b"))


def test_pad_rows() -> None:
    ids, lengths = pad_rows([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert lengths.tolist() == [3, 1, 2]
    assert ids.dtype == np.int64 and lengths.dtype == np.int64


# ------------------------------------------------------------------------------------- encoded splits


def test_encode_words_shapes_and_padding(tiny_corpus: Corpus) -> None:
    encoded = encode_words(tiny_corpus, lowercase=True, min_freq=1)
    tokens = word_tokenize(tiny_corpus.train.texts, lowercase=True)
    for name in ("train", "dev", "test"):
        split: EncodedSplit = getattr(encoded, name)
        n = len(tiny_corpus.splits[name])
        assert len(split) == n
        assert split.ids.shape == (n, split.lengths.max())
        assert split.ids.dtype == np.int64
        assert split.targets.dtype == np.float32 and split.targets.shape == (n, 3)
        np.testing.assert_allclose(split.targets, tiny_corpus.splits[name].targets, rtol=1e-6)
        for row, length in zip(split.ids, split.lengths):
            assert (row[length:] == encoded.pad_id).all()
            assert (row[:length] != encoded.pad_id).all()
    assert encoded.pad_id == 0
    assert encoded.train.lengths.tolist() == [len(t) for t in tokens]
    assert [encoded.vocab.itos[i] for i in encoded.train.ids[0, : encoded.train.lengths[0]]] == tokens[0]


def test_encode_words_vocabulary_comes_from_train_only(tmp_path: Path) -> None:
    rows = [
        ["r1", "train", "3", "3", "3", "Happy dog."],
        ["r2", "dev", "3", "3", "3", "Zebra dog."],
        ["r3", "test", "3", "3", "3", "Quokka!"],
    ]
    encoded = encode_words(load_corpus(write_csv(tmp_path / "c.csv", rows)))
    assert set(encoded.vocab.itos) == {PAD, UNK, "happy", "dog", "."}
    dog, dot = encoded.vocab.stoi["dog"], encoded.vocab.stoi["."]
    assert encoded.dev.ids.tolist() == [[1, dog, dot]]
    assert encoded.test.ids.tolist() == [[1, 1]]  # "quokka" and "!" are both unseen in train


def test_encode_words_keep_case(tiny_corpus: Corpus) -> None:
    lower = encode_words(tiny_corpus, lowercase=True)
    cased = encode_words(tiny_corpus, lowercase=False)
    assert all(w == w.lower() for w in lower.vocab.itos)
    assert any(w != w.lower() for w in cased.vocab.itos)  # sentences start with a capital


def test_empty_sentence_and_empty_test_split(tmp_path: Path) -> None:
    rows = [["r1", "train", "3", "3", "3", "Word word."], ["r2", "dev", "3", "3", "3", ""]]
    encoded = encode_words(load_corpus(write_csv(tmp_path / "c.csv", rows)))
    assert encoded.dev.ids.tolist() == [[1]] and encoded.dev.lengths.tolist() == [1]
    assert len(encoded.test) == 0 and encoded.test.targets.shape == (0, 3)


def test_encoding_is_memoised_per_corpus_and_options(tiny_corpus: Corpus, tiny_csv: Path) -> None:
    first = encode_words(tiny_corpus, lowercase=True, min_freq=1)
    assert encode_words(tiny_corpus, lowercase=True, min_freq=1) is first
    # Another Corpus object of the same bytes shares the encoding: the key is the checksum.
    assert encode_words(load_corpus(tiny_csv), lowercase=True, min_freq=1) is first
    assert encode_corpus(TrainConfig(model="lstm", lowercase=True, min_freq=1), tiny_corpus) is first
    assert encode_words(tiny_corpus, lowercase=True, min_freq=2) is not first


def test_min_freq_shrinks_the_vocabulary(tiny_corpus: Corpus) -> None:
    all_words = encode_words(tiny_corpus, min_freq=1)
    frequent = encode_words(tiny_corpus, min_freq=5)
    assert len(frequent.vocab) < len(all_words.vocab)
    assert (frequent.train.ids == 1).sum() > (all_words.train.ids == 1).sum()


def test_subset_of_a_corpus_gets_its_own_encoding(tiny_corpus: Corpus) -> None:
    small = tiny_corpus.subset(10, 5, 5)
    assert len(encode_words(small).train) == 10
    assert len(encode_words(tiny_corpus).train) == len(tiny_corpus.train)


# ------------------------------------------------------------------------------------------ subwords


def test_subword_encoding_wraps_in_cls_and_sep(tiny_corpus: Corpus, tiny_bert_dir: str) -> None:
    tokenizer = load_tokenizer(tiny_bert_dir)
    encoded = encode_subwords(tiny_corpus, tiny_bert_dir, max_length=64)
    assert encoded.vocab is None
    assert encoded.pad_id == tokenizer.pad_token_id == 0
    for name in ("train", "dev", "test"):
        split = getattr(encoded, name)
        assert len(split) == len(tiny_corpus.splits[name])
        assert (split.ids[:, 0] == tokenizer.cls_token_id).all()
        assert (split.ids[np.arange(len(split)), split.lengths - 1] == tokenizer.sep_token_id).all()
        for row, length in zip(split.ids, split.lengths):
            assert (row[length:] == encoded.pad_id).all()
    # Every corpus word is in the tiny vocabulary, so nothing became [UNK].
    assert not (encoded.train.ids == tokenizer.unk_token_id).any()
    first = tokenizer.convert_ids_to_tokens(encoded.train.ids[0, 1 : encoded.train.lengths[0] - 1].tolist())
    assert first == word_tokenize([tiny_corpus.train.texts[0]], lowercase=True)[0]


def test_subword_encoding_truncates_at_max_length(tiny_corpus: Corpus, tiny_bert_dir: str) -> None:
    tokenizer = load_tokenizer(tiny_bert_dir)
    full = encode_subwords(tiny_corpus, tiny_bert_dir, max_length=64)
    cut = encode_subwords(tiny_corpus, tiny_bert_dir, max_length=4)
    assert full.train.lengths.max() > 4  # otherwise this test would test nothing
    assert cut.train.ids.shape[1] == 4
    np.testing.assert_array_equal(cut.train.lengths, np.minimum(full.train.lengths, 4))
    assert (cut.train.ids[:, 0] == tokenizer.cls_token_id).all()
    assert (cut.train.ids[np.arange(len(cut.train)), cut.train.lengths - 1] == tokenizer.sep_token_id).all()
    np.testing.assert_array_equal(cut.train.ids[:, 1:3], full.train.ids[:, 1:3])  # the head of the sentence


def test_subwords_split_unseen_words_into_pieces(tmp_path: Path, tiny_bert_dir: str) -> None:
    rows = [["r1", "train", "3", "3", "3", "Unhappy dogs!"], ["r2", "dev", "3", "3", "3", "Quokka"]]
    encoded = encode_subwords(load_corpus(write_csv(tmp_path / "c.csv", rows)), tiny_bert_dir, max_length=16)
    tokenizer = load_tokenizer(tiny_bert_dir)
    assert tokenizer.convert_ids_to_tokens(encoded.train.ids[0].tolist()) == [
        "[CLS]", "un", "##happy", "dog", "##s", "!", "[SEP]"
    ]
    assert tokenizer.convert_ids_to_tokens(encoded.dev.ids[0].tolist()) == ["[CLS]", "[UNK]", "[SEP]"]


def test_encode_corpus_picks_subwords_for_bert(tiny_corpus: Corpus, tiny_bert_dir: str) -> None:
    config = TrainConfig(model="bert", model_name=tiny_bert_dir, max_length=32)
    assert encode_corpus(config, tiny_corpus) is encode_subwords(tiny_corpus, tiny_bert_dir, 32)


def test_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-model"))
