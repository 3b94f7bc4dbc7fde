"""External word vectors: GloVe and word2vec text formats, plain or gzipped."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest

from vadsearch.encoding import Vocabulary
from vadsearch.errors import ConfigError
from vadsearch.vectors import load_vectors

VOCAB = Vocabulary(("<pad>", "<unk>", "happy", "sad", "dog", "zebra"))


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GLOVE = ["happy 0.1 0.2 0.3", "the 9 9 9", "sad -0.1 -0.2 -0.3", "dog 1 2 3"]


@pytest.mark.parametrize(
    ("name", "lines"),
    [
        ("glove.txt", GLOVE),
        ("word2vec.txt", ["4 3", *GLOVE]),
        ("glove.txt.gz", GLOVE),
        ("word2vec.txt.gz", ["4 3", *GLOVE]),
        ("trailing-space.txt", [line + " " for line in GLOVE]),  # as in some GloVe releases
    ],
)
def test_formats(tmp_path: Path, name: str, lines: list[str]) -> None:
    embeddings = load_vectors(_write(tmp_path / name, lines), VOCAB)
    matrix = embeddings.matrix
    assert matrix.shape == (len(VOCAB), 3) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[2], np.float32([0.1, 0.2, 0.3]))
    np.testing.assert_array_equal(matrix[3], np.float32([-0.1, -0.2, -0.3]))
    np.testing.assert_array_equal(matrix[4], [1, 2, 3])
    assert (embeddings.found, embeddings.missing) == (3, 1)  # zebra is not in the file


def test_pad_row_is_zero_and_missing_rows_are_small_random(tmp_path: Path) -> None:
    matrix = load_vectors(_write(tmp_path / "v.txt", GLOVE), VOCAB, seed=0).matrix
    assert not matrix[0].any()
    assert matrix[5].any() and np.abs(matrix[5]).max() < 1.0  # zebra: drawn N(0, 0.1²)
    assert matrix[1].any()  # <unk> is not in the file either: random, not zero


def test_missing_rows_depend_on_the_seed_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.txt", GLOVE)
    a = load_vectors(path, VOCAB, seed=1).matrix
    b = load_vectors(path, VOCAB, seed=1).matrix
    c = load_vectors(path, VOCAB, seed=2).matrix
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[5], c[5])
    np.testing.assert_array_equal(a[2], c[2])  # found rows come from the file whatever the seed


def test_lowercase_fallback(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.txt", ["Happy 1 1", "DOG 2 2", "sad 3 3"])
    embeddings = load_vectors(path, VOCAB)
    np.testing.assert_array_equal(embeddings.matrix[2], [1, 1])
    np.testing.assert_array_equal(embeddings.matrix[4], [2, 2])
    assert (embeddings.found, embeddings.missing) == (3, 1)


def test_cased_vocabulary_matches_exactly_first(tmp_path: Path) -> None:
    cased = Vocabulary(("<pad>", "<unk>", "Apple", "apple"))
    embeddings = load_vectors(_write(tmp_path / "v.txt", ["apple 1", "Apple 2"]), cased)
    assert embeddings.matrix[2:].ravel().tolist() == [2, 1]


def test_exact_match_wins_over_an_earlier_lowercase_fallback(tmp_path: Path) -> None:
    embeddings = load_vectors(_write(tmp_path / "v.txt", ["Happy 1 1", "happy 2 2"]), VOCAB)
    np.testing.assert_array_equal(embeddings.matrix[2], [2, 2])


def test_missing_count_is_exact(tmp_path: Path) -> None:
    vocab = Vocabulary(("<pad>", "<unk>", *(f"w{i}" for i in range(10))))
    lines = [f"w{i} {i} {i}" for i in range(0, 10, 3)] + ["w3 9 9", "other 1 1"]  # w3 twice: counted once
    embeddings = load_vectors(_write(tmp_path / "v.txt", lines), vocab)
    assert (embeddings.found, embeddings.missing) == (4, 6)
    np.testing.assert_array_equal(embeddings.matrix[vocab.stoi["w3"]], [3, 3])  # the first line wins


def test_found_and_missing_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vadsearch.vectors")
    load_vectors(_write(tmp_path / "logged.txt", GLOVE), VOCAB)
    assert "3 of 4 vocabulary words found" in caplog.text and "1 missing" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_file_that_holds_none_of_the_words_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # It trained on random embeddings, with an INFO line only, as if they were pretrained.
    caplog.set_level(logging.INFO, logger="vadsearch.vectors")
    embeddings = load_vectors(_write(tmp_path / "other.txt", ["chien 1 1", "chat 2 2"]), VOCAB)
    assert embeddings.found == 0
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.getMessage() == (f"word vectors: none of the 4 vocabulary words is in {tmp_path / 'other.txt'}; "
                                    "the embeddings start random")


def test_special_tokens_in_the_file_keep_pad_zero_and_counts_consistent(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.txt", ["<pad> 5 5 5", "<unk> 0.5 0.5 0.5", *GLOVE])
    embeddings = load_vectors(path, VOCAB)
    assert not embeddings.matrix[0].any()
    assert (embeddings.found, embeddings.missing) == (3, 1)  # happy, sad, dog found; zebra missing


def test_words_with_spaces_are_matched_whole(tmp_path: Path) -> None:
    vocab = Vocabulary(("<pad>", "<unk>", "new york", "york"))
    embeddings = load_vectors(_write(tmp_path / "v.txt", ["york 1 1", "new york 2 2"]), vocab)
    assert embeddings.matrix[2:].tolist() == [[2, 2], [1, 1]]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    embeddings = load_vectors(_write(tmp_path / "v.txt", ["happy 1 1", "", "sad 2 2"]), VOCAB)
    assert embeddings.found == 2


@pytest.mark.parametrize(
    ("lines", "line", "what"),
    [
        (["happy 1 2 3", "sad 1 2"], 2, "expected a word and 3 numbers"),
        (["4 3", "happy 1 2 3", "dog 1"], 3, "expected a word and 3 numbers"),
        (["happy 1 2 3", "the 1 2 3", "sad 1 x 3"], 3, "not a number in the vector of 'sad'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, lines: list[str], line: int, what: str) -> None:
    path = _write(tmp_path / "bad.txt", lines)
    with pytest.raises(ConfigError) as info:
        load_vectors(path, VOCAB)
    message = str(info.value)
    assert "bad.txt" in message and f"line {line}:" in message and what in message


@pytest.mark.parametrize("where", ["nowhere.txt", "."])  # a missing file, and a directory
def test_missing_file_names_the_path(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    with pytest.raises(ConfigError) as info:
        load_vectors(path, VOCAB)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty"):
        load_vectors(path, VOCAB)


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    path = _write(tmp_path / "v.txt", ["happy 1 1"])
    assert load_vectors(path, VOCAB).matrix[2].tolist() == [1, 1]
    _write(path, ["happy 2 2 2"])  # other size: the memo is keyed on size and mtime
    assert load_vectors(path, VOCAB).matrix[2].tolist() == [2, 2, 2]


def test_a_torn_or_mislabelled_gzip_file_is_a_config_error(tmp_path: Path) -> None:
    data = gzip.compress(("happy 1 2 3\n" * 5000).encode())
    torn = tmp_path / "torn.txt.gz"
    torn.write_bytes(data[: len(data) // 2])  # an interrupted download
    plain = tmp_path / "plain.txt.gz"
    plain.write_text("happy 1 2 3\n", encoding="utf-8")  # not gzipped at all
    for path in (torn, plain):
        with pytest.raises(ConfigError, match=f"cannot read word vectors {path}"):
            load_vectors(path, VOCAB)


def test_an_unusable_vectors_path_is_a_config_error() -> None:
    from vadsearch.vectors import resolve_vectors

    with pytest.raises(ConfigError, match=r"word vectors '~no-such-user-vs/glove.txt' is not a usable path"):
        resolve_vectors("~no-such-user-vs/glove.txt")
