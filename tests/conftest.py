"""Shared fixtures: the real EmoBank file (skipped where absent) and a tiny synthetic corpus."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from helpers import synthetic_rows, write_csv
from vadsearch.data import Corpus, load_corpus

REAL_DATA_PATH = (Path(__file__).parents[1] / ".." / "shared" / "data" / "emobank.csv").resolve()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Caches written by the code under test (word tokens) go to a session folder, never the user's."""
    saved = os.environ.get("VADSEARCH_CACHE")
    os.environ["VADSEARCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("VADSEARCH_CACHE", None)
    else:
        os.environ["VADSEARCH_CACHE"] = saved


@pytest.fixture(autouse=True)
def _stop_signal_handlers():
    """A test that stops itself with a signal inside `interrupts.handled()` leaves the signal ignored, as a
    stopping worker must: put the handlers back, or later tests' child processes inherit the ignoring."""
    from vadsearch import interrupts

    saved = {signum: signal.getsignal(signum) for signum in interrupts.STOP_SIGNALS}
    yield
    interrupts.started()
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def real_data_path() -> Path:
    """The real EmoBank file; CI and developers keep it at ../shared/data/emobank.csv."""
    if not REAL_DATA_PATH.is_file():
        pytest.skip(f"real EmoBank file not found at {REAL_DATA_PATH}")
    return REAL_DATA_PATH


@pytest.fixture(scope="session")
def real_corpus(real_data_path: Path) -> Corpus:
    return load_corpus(real_data_path)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 60/20/20 train/dev/test corpus file. Shared by the session: copy it before changing it."""
    return write_csv(tmp_path_factory.mktemp("tiny") / "tiny.csv", synthetic_rows(60, 20, 20, seed=0))


@pytest.fixture(scope="session")
def tiny_corpus(tiny_csv: Path) -> Corpus:
    return load_corpus(tiny_csv)


# Word pieces beyond the corpus words, so that unseen inflections split into pieces instead of [UNK].
_TINY_BERT_PIECES = ("##s", "##ed", "##ing", "##ly", "un", "##happy", "!", ",", "?")
TINY_BERT_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 4-layer, 32-wide BERT with a WordPiece vocabulary of the tiny corpus, built without network.

    Randomly initialised (seeded): good enough to check shapes, masking, freezing and resuming.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from helpers import NEUTRAL_WORDS, WORD_EFFECTS

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORD_EFFECTS, *NEUTRAL_WORDS, *_TINY_BERT_PIECES]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # from_pretrained on a folder holding vocab.txt works across transformers 4 and 5 (5 ignores the
    # `vocab_file=` argument of the constructor and would silently build an empty vocabulary).
    tokenizer = BertTokenizerFast.from_pretrained(str(directory))
    assert len(tokenizer.get_vocab()) == len(vocab), "the tiny BERT tokenizer lost its vocabulary"
    tokenizer.save_pretrained(str(directory))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=TINY_BERT_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def postgres():
    """The shared PostgreSQL server (127.0.0.1:5432, or $VADSEARCH_TEST_POSTGRES); skips without one."""
    from search_helpers import POSTGRES_URL
    from vadsearch.errors import StorageError
    from vadsearch.storage import open_storage

    try:
        return open_storage(POSTGRES_URL)
    except StorageError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")

