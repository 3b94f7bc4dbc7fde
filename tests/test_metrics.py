"""Scores and baselines; the real-data figures are the ones in shared/data/README.md."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from vadsearch.data import Corpus
from vadsearch.metrics import Scores, constant_baseline, mean_baseline, pearson, score, train_means


def test_hand_computed_example() -> None:
    gold = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    pred = np.array([[1.0, 2.0, 1.0], [2.0, 2.0, 3.0], [3.0, 2.0, 2.0]])
    # V exact; A constant at 2 (errors 1, 0, 1); D = 1, 3, 2 (errors 0, 1, 1, r = 1 / sqrt(2 * 2)).
    s = score(pred, gold)
    assert s.n == 3
    assert s.mse_v == 0.0
    assert s.mse_a == pytest.approx(2 / 3)
    assert s.mse_d == pytest.approx(2 / 3)
    assert s.mse == pytest.approx(4 / 9)
    assert s.r_v == pytest.approx(1.0)
    assert math.isnan(s.r_a)
    assert s.r_d == pytest.approx(0.5)


def test_pearson_matches_corrcoef() -> None:
    rng = np.random.default_rng(0)
    gold = rng.uniform(1, 5, size=(200, 3))
    pred = gold + rng.normal(0, 0.7, size=(200, 3))
    s = score(pred, gold)
    expected = [np.corrcoef(pred[:, j], gold[:, j])[0, 1] for j in range(3)]
    assert [s.r_v, s.r_a, s.r_d] == pytest.approx(expected, abs=1e-12)
    assert s.mse == pytest.approx(((pred - gold) ** 2).mean())


def test_constant_predictions_give_nan_without_warnings() -> None:
    gold = np.random.default_rng(1).uniform(1, 5, size=(50, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = score(np.full((50, 3), 0.1), gold)  # 0.1's mean is not exactly 0.1 in floating point
        assert math.isnan(pearson(gold[:, 0], np.full(50, 3.0)))
        one_row = score(gold[:1], gold[:1])
    assert all(math.isnan(r) for r in (s.r_v, s.r_a, s.r_d))
    assert one_row.mse == 0.0 and math.isnan(one_row.r_v)


@pytest.mark.parametrize(
    ("pred_shape", "gold_shape"),
    [((4, 3), (5, 3)), ((4, 2), (4, 2)), ((12,), (12,)), ((0, 3), (0, 3))],
    ids=["rows-differ", "two-columns", "one-dimensional", "empty"],
)
def test_bad_shapes_are_rejected(pred_shape: tuple[int, ...], gold_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        score(np.ones(pred_shape), np.ones(gold_shape))


def test_scores_round_trip_through_json() -> None:
    s = score(np.full((3, 3), 3.0), np.array([[1.0, 2, 3], [2, 3, 4], [3, 4, 5]]))
    d = json.loads(json.dumps(s.as_dict(), allow_nan=False))
    assert d["r_v"] is None and d["n"] == 3
    back = Scores.from_dict(d)
    assert back.as_dict() == s.as_dict()
    assert math.isnan(back.r_v) and isinstance(back.n, int)


def test_from_dict_names_missing_keys() -> None:
    with pytest.raises(ValueError, match="mse_d"):
        Scores.from_dict({"mse": 1.0, "mse_v": 1.0, "mse_a": 1.0, "r_v": None, "r_a": None, "n": 1})


def test_baselines_on_real_data_match_the_readme(real_corpus: Corpus) -> None:
    constant = constant_baseline(real_corpus)
    means = mean_baseline(real_corpus)
    assert set(constant) == set(means) == {"train", "dev", "test"}
    assert round(constant["dev"].mse, 4) == 0.0751
    assert round(constant["test"].mse, 4) == 0.0765
    assert round(means["dev"].mse, 4) == 0.0732
    assert round(means["test"].mse, 4) == 0.0746
    assert constant["dev"].n == 1000


def test_baselines_skip_empty_splits(tiny_corpus: Corpus) -> None:
    no_test = tiny_corpus.subset(60, 20, 0)
    assert set(mean_baseline(no_test)) == {"train", "dev"}
    assert set(constant_baseline(no_test, (2.0, 3.0, 4.0))) == {"train", "dev"}


def test_train_means(tiny_corpus: Corpus) -> None:
    means = train_means(tiny_corpus)
    assert means.shape == (3,)
    np.testing.assert_allclose(means, tiny_corpus.train.targets.mean(axis=0))
    # The training means are the best constant on the training split itself.
    assert mean_baseline(tiny_corpus)["train"].mse <= constant_baseline(tiny_corpus)["train"].mse


def test_constant_baseline_needs_three_values(tiny_corpus: Corpus) -> None:
    with pytest.raises(ValueError, match="3 numbers"):
        constant_baseline(tiny_corpus, (3.0, 3.0))
