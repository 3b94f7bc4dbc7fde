"""Scores for V/A/D predictions, and the trivial baselines every model has to beat.

The headline score is the MSE averaged over V, A and D (lower is better); Pearson r per dimension is
reported beside it because a model that predicts the mean everywhere has a fine MSE and no signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from vadsearch.data import Corpus

N_DIMENSIONS = 3  # V, A, D


@dataclass(frozen=True)
class Scores:
    """How well one set of predictions matches the gold ratings of one split."""

    mse: float  # MSE averaged over V, A, D: the headline score
    mse_v: float
    mse_a: float
    mse_d: float
    r_v: float  # Pearson r; nan when predictions or gold are constant
    r_a: float
    r_d: float
    n: int  # rows scored

    def as_dict(self) -> dict[str, float | int | None]:
        """A JSON-safe dict: nan becomes None, since JSON has no NaN."""
        return {f.name: _nan_to_none(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scores:
        """Inverse of `as_dict` (None becomes nan); unknown keys are ignored for forward compatibility."""
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"scores dict is missing {missing}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = d[f.name]
            if f.name == "n":
                values[f.name] = int(value)
            else:
                values[f.name] = math.nan if value is None else float(value)
        return cls(**values)


def score(pred: np.ndarray, gold: np.ndarray) -> Scores:
    """Score predictions against gold; both are (n, 3) arrays with columns V, A, D."""
    pred = np.asarray(pred, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if pred.shape != gold.shape or pred.ndim != 2 or pred.shape[1] != N_DIMENSIONS:
        raise ValueError(
            f"pred and gold must both have shape (n, {N_DIMENSIONS}); got {pred.shape} and {gold.shape}"
        )
    if len(gold) == 0:
        raise ValueError("cannot score zero rows")
    with np.errstate(all="ignore"):  # nan predictions from a diverged model give nan, not warnings
        mse_per_dim = ((pred - gold) ** 2).mean(axis=0)
    r_per_dim = [pearson(pred[:, j], gold[:, j]) for j in range(N_DIMENSIONS)]
    return Scores(
        mse=float(mse_per_dim.mean()),
        mse_v=float(mse_per_dim[0]),
        mse_a=float(mse_per_dim[1]),
        mse_d=float(mse_per_dim[2]),
        r_v=r_per_dim[0],
        r_a=r_per_dim[1],
        r_d=r_per_dim[2],
        n=len(gold),
    )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two 1-D arrays; nan when either is constant (r is undefined there)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # Test constancy directly: x - x.mean() of a constant array can be ~1e-17 instead of 0,
    # which would give a meaningless r instead of nan.
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    with np.errstate(all="ignore"):
        xc = x - x.mean()
        yc = y - y.mean()
        r = (xc @ yc) / math.sqrt((xc @ xc) * (yc @ yc))
    return float(np.clip(r, -1.0, 1.0)) if math.isfinite(r) else math.nan


def train_means(corpus: Corpus) -> np.ndarray:
    """Mean V, A, D of the training split, shape (3,): the best constant a model could learn."""
    return corpus.train.targets.mean(axis=0)


def constant_baseline(corpus: Corpus, value: Sequence[float] = (3.0, 3.0, 3.0)) -> dict[str, Scores]:
    """Scores of predicting `value` (V, A, D) for every row, per non-empty split."""
    constant = np.asarray(value, dtype=np.float64)
    if constant.shape != (N_DIMENSIONS,):
        raise ValueError(f"value must hold {N_DIMENSIONS} numbers (V, A, D); got {value!r}")
    return {
        name: score(np.broadcast_to(constant, split.targets.shape), split.targets)
        for name, split in corpus.splits.items()
        if len(split)
    }


def mean_baseline(corpus: Corpus) -> dict[str, Scores]:
    """Scores of predicting the training means everywhere, per non-empty split."""
    return constant_baseline(corpus, train_means(corpus))


def _nan_to_none(value: float | int) -> float | int | None:
    return None if isinstance(value, float) and math.isnan(value) else value
