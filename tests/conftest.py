"""Shared fixtures: the real EmoBank file (skipped where absent) and a tiny synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import synthetic_rows, write_csv
from vadsearch.data import Corpus, load_corpus

REAL_DATA_PATH = (Path(__file__).parents[1] / ".." / "shared" / "data" / "emobank.csv").resolve()


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
