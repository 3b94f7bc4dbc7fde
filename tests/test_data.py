"""Loading, validating, finding and downloading the corpus (no network: urlopen is faked)."""

from __future__ import annotations

import hashlib
import io
import logging
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from helpers import write_csv
from vadsearch import data
from vadsearch.data import (
    COLUMNS,
    EMOBANK_SHA256,
    cache_dir,
    download_emobank,
    file_sha256,
    load_corpus,
    load_emobank,
    resolve_data_path,
)
from vadsearch.errors import DataError

# A small valid body; line numbers in the file are index + 2 (the header is line 1).
GOOD_ROWS = [
    ["a1", "train", "3.0", "3.1", "2.9", "First sentence."],
    ["a2", "dev", "2.5", "3.5", "3.0", "Second sentence."],
    ["a3", "train", "4.0", "2.0", "3.2", "Third sentence."],
    ["a4", "test", "1.0", "5.0", "3.0", "Fourth sentence."],
]


def _with(line: int, column: str, value: str) -> list[list[str]]:
    """GOOD_ROWS with one field replaced; `line` is the physical line in the written file."""
    rows = [list(row) for row in GOOD_ROWS]
    rows[line - 2][COLUMNS.index(column)] = value
    return rows


# ------------------------------------------------------------------------------------------ real file


def test_real_file_loads(real_corpus: data.Corpus) -> None:
    assert (len(real_corpus.train), len(real_corpus.dev), len(real_corpus.test)) == (8062, 1000, 1000)
    assert real_corpus.sha256 == EMOBANK_SHA256
    assert real_corpus.train.targets.dtype == np.float64
    assert real_corpus.train.targets.shape == (8062, 3)


def test_real_file_keeps_the_text_none(real_corpus: data.Corpus) -> None:
    index = real_corpus.dev.ids.index("easy_money_13624_13628")
    assert real_corpus.dev.texts[index] == "None"


def test_real_file_sha256(real_data_path: Path) -> None:
    assert file_sha256(real_data_path) == EMOBANK_SHA256


# ---------------------------------------------------------------------------------------- good files


def test_tiny_corpus(tiny_corpus: data.Corpus) -> None:
    assert (len(tiny_corpus.train), len(tiny_corpus.dev), len(tiny_corpus.test)) == (60, 20, 20)
    assert ((tiny_corpus.train.targets >= 1) & (tiny_corpus.train.targets <= 5)).all()


def test_texts_stay_verbatim(tmp_path: Path) -> None:
    texts = ["None", "NA", "null", "", '"', ' padded ', 'say "hi"', "two\nlines"]
    rows = [[f"t{i}", "train" if i else "dev", "3", "3", "3", text] for i, text in enumerate(texts)]
    corpus = load_corpus(write_csv(tmp_path / "texts.csv", rows))
    assert list(corpus.dev.texts + corpus.train.texts) == texts


def test_file_order_is_kept_within_each_split(tmp_path: Path) -> None:
    corpus = load_corpus(write_csv(tmp_path / "c.csv", GOOD_ROWS))
    assert corpus.train.ids == ("a1", "a3")
    np.testing.assert_array_equal(corpus.train.targets, [[3.0, 3.1, 2.9], [4.0, 2.0, 3.2]])
    assert corpus.dev.ids == ("a2",) and corpus.test.ids == ("a4",)


def test_extra_columns_and_any_order(tmp_path: Path) -> None:
    header = ["text", "note", "D", "A", "V", "split", "id"]
    rows = [[r[5], "x", r[4], r[3], r[2], r[1], r[0]] for r in GOOD_ROWS]
    corpus = load_corpus(write_csv(tmp_path / "c.csv", rows, header=header))
    assert corpus.train.texts == ("First sentence.", "Third sentence.")
    np.testing.assert_array_equal(corpus.dev.targets, [[2.5, 3.5, 3.0]])


def test_test_split_may_be_empty(tmp_path: Path) -> None:
    corpus = load_corpus(write_csv(tmp_path / "c.csv", GOOD_ROWS[:3]))
    assert len(corpus.test) == 0 and corpus.test.targets.shape == (0, 3)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    lines = [",".join(COLUMNS)] + [",".join(row) for row in GOOD_ROWS]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert load_corpus(path).train.ids == ("a1", "a3")


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "c.csv", GOOD_ROWS)
    assert load_corpus(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)


def test_targets_are_read_only(tiny_corpus: data.Corpus) -> None:
    with pytest.raises(ValueError):
        tiny_corpus.train.targets[0, 0] = 9.0


# ------------------------------------------------------------------------------------------ bad files


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (_with(3, "V", "abc"), ["line 3, column 'V'", "'abc' is not a number"]),
        (_with(2, "A", ""), ["line 2, column 'A'", "not a number"]),
        (_with(4, "D", "nan"), ["line 4, column 'D'", "not a finite number"]),
        (_with(5, "V", "inf"), ["line 5, column 'V'", "not a finite number"]),
        (_with(2, "A", "-inf"), ["line 2, column 'A'", "not a finite number"]),
        (_with(3, "D", "0.99"), ["line 3, column 'D'", "outside", "[1, 5]"]),
        (_with(4, "V", "5.01"), ["line 4, column 'V'", "outside"]),
        (
            _with(3, "split", "validation"),
            ["line 3, column 'split'", "'validation'", "'train', 'dev', 'test'"],
        ),
        (_with(4, "id", ""), ["line 4, column 'id'", "empty"]),
        (_with(4, "id", "a1"), ["line 4, column 'id'", "'a1'", "first on line 2"]),
        (_with(4, "id", " a1 "), ["line 4, column 'id'", "'a1'", "first on line 2"]),
        (GOOD_ROWS + [["a5", "train", "3", "3", "3"]], ["line 6", "expected 6 fields, found 5"]),
        (GOOD_ROWS + [["a5", "train", "3", "3", "3", "x", "extra"]], ["line 6", "found 7"]),
        ([r for r in GOOD_ROWS if r[1] != "train"], ["no rows with split 'train'"]),
        ([r for r in GOOD_ROWS if r[1] != "dev"], ["no rows with split 'dev'"]),
        ([], ["header but no data rows"]),
    ],
    ids=[
        "text-number", "empty-number", "nan", "inf", "minus-inf", "below-1", "above-5", "unknown-split",
        "empty-id", "duplicate-id", "duplicate-id-spaced", "too-few-fields", "too-many-fields", "no-train", "no-dev", "header-only",
    ],
)
def test_bad_rows_are_rejected(tmp_path: Path, rows: list[list[str]], expected: list[str]) -> None:
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(DataError) as info:
        load_corpus(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for part in expected:
        assert part in message


def test_missing_columns_are_all_named(tmp_path: Path) -> None:
    header = ["id", "split", "A", "D"]
    path = write_csv(tmp_path / "bad.csv", [row[:2] + row[3:5] for row in GOOD_ROWS], header=header)
    with pytest.raises(DataError, match=r"bad\.csv, line 1: missing columns 'V', 'text'"):
        load_corpus(path)


def test_line_numbers_count_physical_lines(tmp_path: Path) -> None:
    """A quoted field that spans lines shifts later rows; the message must name the real line."""
    rows = [["m1", "train", "3", "3", "3", "one\ntwo\nthree"], ["m2", "dev", "3", "x", "3", "ok"]]
    path = write_csv(tmp_path / "multi.csv", rows)
    with pytest.raises(DataError, match=r"multi\.csv, line 5, column 'A': 'x' is not a number"):
        load_corpus(path)


def test_malformed_quoting_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "quotes.csv"
    path.write_text(",".join(COLUMNS) + '\na1,train,3,3,3,"closed"junk\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"quotes\.csv, line 2: malformed CSV"):
        load_corpus(path)


def test_an_unclosed_quote_names_its_line(tmp_path: Path) -> None:
    # The rest of the file becomes one field; the csv module's own words name only a size limit.
    path = tmp_path / "open.csv"
    rows = [f"r{i},train,3,3,3,sentence number {i} of a long file" for i in range(4000)]
    rows[2] = rows[2].replace("sentence", '"sentence')
    path.write_text(",".join(COLUMNS) + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"open\.csv, line 4: a field runs on past 131,072 characters; is a quote "
                                        r"opened on this line and never closed\?"):
        load_corpus(path)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.csv is empty"):
        load_corpus(path)


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    text = ",".join(COLUMNS) + "\na1,train,3,3,3,ok\na2,dev,3,3,3,caf\u00e9\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv, line 3: the file is not UTF-8"):
        load_corpus(path)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        load_corpus(tmp_path)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.csv does not exist"):
        load_corpus(tmp_path / "nowhere.csv")


# -------------------------------------------------------------------------------------------- subset


def test_subset_is_deterministic_and_keeps_order(tiny_corpus: data.Corpus) -> None:
    small = tiny_corpus.subset(10, 5, 3, seed=1)
    assert (len(small.train), len(small.dev), len(small.test)) == (10, 5, 3)
    assert small.train.ids == tiny_corpus.subset(10, 5, 3, seed=1).train.ids
    assert small.train.ids != tiny_corpus.subset(10, 5, 3, seed=2).train.ids
    positions = [tiny_corpus.train.ids.index(i) for i in small.train.ids]
    assert positions == sorted(positions)
    for i, row_id in enumerate(small.dev.ids):
        j = tiny_corpus.dev.ids.index(row_id)
        assert small.dev.texts[i] == tiny_corpus.dev.texts[j]
        np.testing.assert_array_equal(small.dev.targets[i], tiny_corpus.dev.targets[j])


def test_subset_splits_are_independent(tiny_corpus: data.Corpus) -> None:
    assert tiny_corpus.subset(10, 5, 0).train.ids == tiny_corpus.subset(10, 8, 2).train.ids


def test_subset_changes_the_cache_key(tiny_corpus: data.Corpus) -> None:
    subsets = [tiny_corpus.subset(10, 5, 3), tiny_corpus.subset(10, 5, 3, seed=1)]
    keys = {tiny_corpus.sha256, *(s.sha256 for s in subsets)}
    assert len(keys) == 3
    assert all(len(key) == 64 for key in keys)


def test_subset_larger_than_split_keeps_it_whole(tiny_corpus: data.Corpus) -> None:
    assert tiny_corpus.subset(1000, 1000, 1000).train.ids == tiny_corpus.train.ids


@pytest.mark.parametrize("sizes", [(0, 5, 5), (5, 0, 5), (5, 5, -1)])
def test_subset_rejects_impossible_sizes(tiny_corpus: data.Corpus, sizes: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        tiny_corpus.subset(*sizes)


# -------------------------------------------------------------------------------------- finding a file


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No VADSEARCH_DATA, and a private empty cache directory (returned)."""
    monkeypatch.delenv("VADSEARCH_DATA", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("VADSEARCH_CACHE", str(cache))
    return cache


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VADSEARCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "vadsearch"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vadsearch"
    monkeypatch.setenv("VADSEARCH_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert not (tmp_path / "mine").exists()


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path) -> None:
    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("must not download")

    monkeypatch.setattr(data, "download_emobank", no_download)
    explicit = write_csv(tmp_path / "explicit.csv", GOOD_ROWS)
    from_env = write_csv(tmp_path / "env.csv", GOOD_ROWS)
    clean_env.mkdir()
    cached = write_csv(clean_env / "emobank.csv", GOOD_ROWS)
    monkeypatch.setenv("VADSEARCH_DATA", str(from_env))
    assert resolve_data_path(explicit) == explicit
    assert resolve_data_path() == from_env
    monkeypatch.delenv("VADSEARCH_DATA")
    assert resolve_data_path() == cached


def test_download_is_the_last_resort(monkeypatch: pytest.MonkeyPatch, clean_env: Path) -> None:
    calls = []

    def fake_download(dest: Path, url: str, sha256: str) -> Path:
        calls.append((dest, url, sha256))
        dest.parent.mkdir(parents=True)
        return write_csv(dest, GOOD_ROWS)

    monkeypatch.setattr(data, "download_emobank", fake_download)
    assert resolve_data_path() == clean_env / "emobank.csv"
    assert calls == [(clean_env / "emobank.csv", data.EMOBANK_URL, EMOBANK_SHA256)]


def test_no_download_when_disallowed(clean_env: Path) -> None:
    with pytest.raises(DataError, match="--data"):
        resolve_data_path(download=False)


def test_a_cached_file_that_is_not_emobank_is_refused(clean_env: Path) -> None:
    # Only a download was checked: a file put in the cache by hand passed for EmoBank.
    clean_env.mkdir()
    write_csv(clean_env / "emobank.csv", GOOD_ROWS)
    with pytest.raises(DataError, match=r"emobank.csv is not the published EmoBank file \(sha256 [0-9a-f]{12}…\): "
                                        "delete it to download EmoBank again, or pass your own file with --data"):
        load_emobank()
    assert len(load_emobank(clean_env / "emobank.csv").train)  # named by the user: theirs to use


def test_paths_that_cannot_be_read_are_one_line(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="fifo.csv is not a regular file, not a CSV file"):
        load_emobank(fifo)  # was read for ever
    with pytest.raises(DataError, match="cannot read .*: File name too long"):
        load_emobank(tmp_path / ("x" * 300))  # was an OSError from pathlib


def test_missing_explicit_path_is_named(clean_env: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.csv does not exist"):
        resolve_data_path(tmp_path / "gone.csv")


def test_missing_env_path_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("VADSEARCH_DATA", str(tmp_path / "gone.csv"))
    with pytest.raises(DataError, match=r"VADSEARCH_DATA points to .*gone\.csv"):
        resolve_data_path()


# ------------------------------------------------------------------------------------------ downloading


class FakeResponse(io.BytesIO):
    """What urlopen returns, serving fixed bytes; `fail_after` bytes raise a timeout mid-stream."""

    def __init__(self, payload: bytes, fail_after: int | None = None) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise TimeoutError("The read operation timed out")
        return super().read(size)


def serve(monkeypatch: pytest.MonkeyPatch, payload: bytes, fail_after: int | None = None) -> list[str]:
    """Make urlopen serve `payload`; returns the list of requested URLs."""
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float | None = None) -> FakeResponse:
        assert timeout is not None, "a download without a timeout can hang forever"
        requested.append(url)
        return FakeResponse(payload, fail_after)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return requested


def refuse_network(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def fake_urlopen(url: str, timeout: float | None = None) -> FakeResponse:
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)


@pytest.fixture
def payload(tiny_csv: Path) -> bytes:
    return tiny_csv.read_bytes()


def test_good_download_is_verified_and_cached(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, payload: bytes, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setattr(data, "EMOBANK_SHA256", hashlib.sha256(payload).hexdigest())
    requested = serve(monkeypatch, payload)
    caplog.set_level(logging.INFO, logger="vadsearch.download")
    corpus = load_emobank()
    # Off a terminal (a worker's log file): what was fetched and where it went, in lines, and no bar.
    assert [r.getMessage() for r in caplog.records] == [
        f"downloading EmoBank ({len(payload) / 1e6:.1f} MB) from {data.EMOBANK_URL}",
        f"saved EmoBank to {clean_env / 'emobank.csv'} (sha256 verified)"]
    shown = capsys.readouterr().err  # log lines may be there, if an earlier test routed logging to stderr
    assert "\r" not in shown and "B/s" not in shown
    assert corpus.path == clean_env / "emobank.csv"
    assert corpus.path.read_bytes() == payload
    assert requested == [data.EMOBANK_URL]
    assert list(clean_env.iterdir()) == [clean_env / "emobank.csv"]  # no temp file left behind
    refuse_network(monkeypatch, urllib.error.URLError("offline"))
    assert load_emobank().sha256 == corpus.sha256  # second time from the cache


def test_bad_checksum_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: bytes) -> None:
    serve(monkeypatch, payload)
    with pytest.raises(DataError, match="sha256"):
        download_emobank(tmp_path / "dl" / "emobank.csv", sha256="0" * 64)
    assert list((tmp_path / "dl").iterdir()) == []


@pytest.mark.parametrize(
    "error",
    [urllib.error.URLError("Name or service not known"), TimeoutError("timed out"), ConnectionResetError()],
    ids=["url-error", "timeout", "reset"],
)
def test_network_error_says_how_to_pass_a_path(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, error: Exception
) -> None:
    refuse_network(monkeypatch, error)
    with pytest.raises(DataError) as info:
        load_emobank()
    message = str(info.value)
    assert "failed" in message and "--data" in message and "VADSEARCH_DATA" in message
    assert list(clean_env.iterdir()) == []


def test_interrupted_download_leaves_no_partial_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: bytes
) -> None:
    serve(monkeypatch, payload, fail_after=len(payload) // 2)
    dest = tmp_path / "emobank.csv"
    with pytest.raises(DataError, match="--data"):
        download_emobank(dest, sha256=hashlib.sha256(payload).hexdigest())
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_home_directory_is_one_line_wherever_it_is_given(monkeypatch: pytest.MonkeyPatch,
                                                                    clean_env: Path) -> None:
    text = "~no-such-user-vs/emobank.csv"  # pathlib raises a bare RuntimeError for it
    with pytest.raises(DataError, match=r"data file .* is not a usable path"):
        resolve_data_path(text)
    monkeypatch.setenv("VADSEARCH_DATA", text)
    with pytest.raises(DataError, match=r"VADSEARCH_DATA .* is not a usable path"):
        resolve_data_path()
    monkeypatch.delenv("VADSEARCH_DATA")
    monkeypatch.setenv("VADSEARCH_CACHE", text)
    with pytest.raises(DataError, match=r"VADSEARCH_CACHE .* is not a usable path"):
        resolve_data_path()
