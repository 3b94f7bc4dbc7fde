"""Helpers for tests that write corpus files; import with `from helpers import write_csv`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vadsearch.data import COLUMNS

# Words with a (valence, arousal, dominance) push; neutral words have none. Lets a model learn something.
WORD_EFFECTS: dict[str, tuple[float, float, float]] = {
    "happy": (0.8, 0.3, 0.2),
    "love": (0.9, 0.4, 0.1),
    "great": (0.6, 0.2, 0.3),
    "sad": (-0.8, -0.3, -0.3),
    "angry": (-0.6, 0.8, 0.4),
    "afraid": (-0.6, 0.6, -0.6),
    "calm": (0.3, -0.7, 0.1),
    "tired": (-0.3, -0.6, -0.2),
    "strong": (0.3, 0.3, 0.8),
    "weak": (-0.3, -0.2, -0.8),
}
NEUTRAL_WORDS = ("the", "a", "dog", "house", "we", "went", "to", "today", "it", "was", "very", "and")


def write_csv(
    path: str | Path, rows: Iterable[Sequence[object]], header: Sequence[str] | None = COLUMNS
) -> Path:
    """Write `rows` (any field count, so malformed files are easy) under `header`; None omits the header."""
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def synthetic_rows(n_train: int = 60, n_dev: int = 20, n_test: int = 20, seed: int = 0) -> list[list[object]]:
    """Rows in EmoBank format whose ratings follow the emotion words in each sentence, splits interleaved."""
    rng = np.random.default_rng(seed)
    splits = ["train"] * n_train + ["dev"] * n_dev + ["test"] * n_test
    rng.shuffle(splits)
    vocabulary = list(WORD_EFFECTS) + list(NEUTRAL_WORDS)
    rows: list[list[object]] = []
    for i, split in enumerate(splits):
        words = list(rng.choice(vocabulary, size=int(rng.integers(3, 8))))
        push = sum((np.array(WORD_EFFECTS.get(w, (0.0, 0.0, 0.0))) for w in words), np.zeros(3))
        vad = np.clip(3.0 + 0.5 * push + rng.normal(0.0, 0.1, size=3), 1.0, 5.0)
        text = " ".join(words).capitalize() + "."
        rows.append([f"tiny_{i:04d}", split, *(f"{x:.2f}" for x in vad), text])
    return rows
