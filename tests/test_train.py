"""The epoch loop on the CPU: training, exact resume, fallbacks, early stopping, test-split isolation."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import synthetic_rows, write_csv
from vadsearch import train as train_module
from vadsearch.config import TrainConfig
from vadsearch.data import Corpus, load_corpus
from vadsearch.encoding import encode_corpus
from vadsearch.checkpoint import BackgroundWriter, RunDirectory
from vadsearch.errors import CheckpointError, ConfigError, TrainingError
from vadsearch.metrics import constant_baseline, mean_baseline
from vadsearch.fit import fit
from vadsearch.train import EpochResult, RunResult, describe_device, resolve_device, train

TINY_LSTM = TrainConfig(
    model="lstm", hidden_size=8, embedding_dim=8, batch_size=8, eval_batch_size=16, max_epochs=4, lr=0.02,
    dropout=0.2, seed=0,
)
STEPS_PER_EPOCH = 8  # 60 training rows in batches of 8


def _run(config: TrainConfig, corpus: Corpus, run_dir: Path | None = None, **kwargs) -> RunResult:
    return fit(config, corpus, run_dir=run_dir, device="cpu", **kwargs)


def _epochs(result: RunResult) -> list[tuple[int, float, float]]:
    """What must match between runs, exactly: (epoch, train loss, dev MSE)."""
    return [(h.epoch, h.train_loss, h.dev.mse) for h in result.history]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """TINY_LSTM trained for 4 epochs in one call: the reference every resumed run must equal."""
    return _run(TINY_LSTM, tiny_corpus, tmp_path_factory.mktemp("uninterrupted"))


# ---------------------------------------------------------------------------------------- training


def test_lstm_trains(uninterrupted: RunResult, tiny_corpus: Corpus) -> None:
    result = uninterrupted
    assert len(result.history) == TINY_LSTM.max_epochs
    assert [h.epoch for h in result.history] == [1, 2, 3, 4]
    assert all(math.isfinite(h.train_loss) and math.isfinite(h.dev.mse) for h in result.history)
    dev = [h.dev.mse for h in result.history]
    assert result.best_epoch == int(np.argmin(dev)) + 1
    assert result.dev == result.history[result.best_epoch - 1].dev
    assert [h.best for h in result.history] == [d < min(dev[:i], default=math.inf) for i, d in enumerate(dev)]
    assert result.test is not None and result.test.n == len(tiny_corpus.test)
    assert result.dev.n == len(tiny_corpus.dev)
    assert result.resumed_from == 0 and not result.stopped_early
    assert 0 < result.trainable_params == result.total_params
    assert "embedding.weight" in result.trainable_names and "head.bias" in result.trainable_names
    # It learns: the words drive the ratings, so it beats predicting the training means.
    assert result.dev.mse < mean_baseline(tiny_corpus)["dev"].mse
    assert result.history[-1].train_loss < result.history[0].train_loss


@pytest.mark.parametrize("terminal", [True, False])
def test_batch_bars_are_drawn_on_a_terminal_only(tiny_corpus: Corpus, monkeypatch, terminal: bool) -> None:
    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    stderr = Stderr()
    monkeypatch.setattr(sys, "stderr", stderr)
    _run(dataclasses.replace(TINY_LSTM, max_epochs=1), tiny_corpus, progress=True)
    # A worker logging to a file (as under `launch`) gets its log lines, not a redraw per batch.
    assert ("epoch 1/1" in stderr.getvalue()) is terminal


def test_as_dict_is_json_ready(uninterrupted: RunResult) -> None:
    d = json.loads(json.dumps(uninterrupted.as_dict()))
    assert d["best_epoch"] == uninterrupted.best_epoch
    assert [h["epoch"] for h in d["history"]] == [1, 2, 3, 4]
    assert d["config"] == TINY_LSTM.relevant()


def test_without_run_dir_nothing_is_written(tiny_corpus: Corpus, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _run(TINY_LSTM.replace(max_epochs=1), tiny_corpus)
    assert len(result.history) == 1 and list(tmp_path.iterdir()) == []


def test_same_seed_same_result_other_seed_other_result(tiny_corpus: Corpus, uninterrupted: RunResult) -> None:
    config = TINY_LSTM.replace(max_epochs=2)
    assert _epochs(_run(config, tiny_corpus)) == _epochs(uninterrupted)[:2]
    assert _epochs(_run(config.replace(seed=1), tiny_corpus)) != _epochs(uninterrupted)[:2]


# ------------------------------------------------------------------------------------------ resuming


def test_resume_is_exact(tiny_corpus: Corpus, tmp_path: Path, uninterrupted: RunResult) -> None:
    first = _run(TINY_LSTM.replace(max_epochs=2), tiny_corpus, tmp_path)
    assert _epochs(first) == _epochs(uninterrupted)[:2]
    seen: list[tuple[int, bool]] = []
    resumed = _run(TINY_LSTM, tiny_corpus, tmp_path, on_epoch=lambda e: seen.append((e.epoch, e.restored)))
    assert resumed.resumed_from == 2
    assert seen == [(1, True), (2, True), (3, False), (4, False)]
    # The configuration's time, the restored epochs' included: not only the part this call trained.
    assert resumed.seconds >= sum(e.seconds for e in resumed.history) > sum(e.seconds for e in resumed.history[2:])
    assert _epochs(resumed) == _epochs(uninterrupted)  # ==, not approx: same batches, RNG and state
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert resumed.dev.as_dict() == uninterrupted.dev.as_dict()
    assert resumed.test.as_dict() == uninterrupted.test.as_dict()


def test_resume_depends_on_restoring_the_rng(
    tiny_corpus: Corpus, tmp_path: Path, uninterrupted: RunResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Shows that the exactness above is not trivial: without the RNG state, dropout masks differ.
    _run(TINY_LSTM.replace(max_epochs=2), tiny_corpus, tmp_path)
    monkeypatch.setattr(train_module, "restore_rng", lambda state, device=None: None)
    resumed = _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert _epochs(resumed)[:2] == _epochs(uninterrupted)[:2]
    assert _epochs(resumed)[2:] != _epochs(uninterrupted)[2:]


def test_finished_run_is_not_trained_again(tiny_corpus: Corpus, tmp_path: Path, monkeypatch) -> None:
    config = TINY_LSTM.replace(max_epochs=2)
    first = _run(config, tiny_corpus, tmp_path)
    monkeypatch.setattr(train_module, "_train_epoch", _fail("no epoch may be trained again"))
    again = _run(config, tiny_corpus, tmp_path)
    assert again.resumed_from == 2 and _epochs(again) == _epochs(first)
    assert again.test.as_dict() == first.test.as_dict()
    assert all(not h.restored for h in again.history)  # `restored` is only for the callback


def _fail(message: str):
    def fail(*args, **kwargs):
        raise AssertionError(message)

    return fail


class _Interrupt(Exception):
    pass


def test_exception_in_on_epoch_leaves_a_resumable_checkpoint(
    tiny_corpus: Corpus, tmp_path: Path, uninterrupted: RunResult
) -> None:
    def stop_at_two(epoch: EpochResult) -> None:
        if epoch.epoch == 2:
            raise _Interrupt("pruned")

    with pytest.raises(_Interrupt):
        _run(TINY_LSTM, tiny_corpus, tmp_path, on_epoch=stop_at_two)
    assert (tmp_path / "epoch-0002.pt").is_file() and not (tmp_path / "epoch-0003.pt").exists()
    resumed = _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert resumed.resumed_from == 2
    assert _epochs(resumed) == _epochs(uninterrupted)
    assert resumed.test.as_dict() == uninterrupted.test.as_dict()


def test_corrupt_newest_checkpoint_falls_back_and_finishes_identically(
    tiny_corpus: Corpus, tmp_path: Path, uninterrupted: RunResult, caplog: pytest.LogCaptureFixture
) -> None:
    _run(TINY_LSTM.replace(max_epochs=3), tiny_corpus, tmp_path)
    newest = tmp_path / "epoch-0003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn write
    caplog.set_level(logging.WARNING)
    resumed = _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert resumed.resumed_from == 2
    assert _epochs(resumed) == _epochs(uninterrupted)
    assert resumed.test.as_dict() == uninterrupted.test.as_dict()
    assert len(_warnings(caplog)) == 1 and "epoch-0003.pt" in caplog.text
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == [
        "epoch-0003.pt", "epoch-0003.pt.rejected", "epoch-0004.pt"
    ]


def test_checkpoint_of_other_data_is_not_resumed(tiny_corpus: Corpus, tmp_path: Path) -> None:
    _run(TINY_LSTM.replace(max_epochs=1), tiny_corpus, tmp_path)
    other = load_corpus(write_csv(tmp_path / "other.csv", synthetic_rows(30, 10, 10, seed=5)))
    result = _run(TINY_LSTM.replace(max_epochs=1), other, tmp_path)
    assert result.resumed_from == 0 and (tmp_path / "epoch-0001.pt.rejected").is_file()


def test_linear_schedule_with_max_epochs_changed_starts_over(tiny_corpus: Corpus, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    linear = TINY_LSTM.replace(schedule="linear", warmup_ratio=0.25)
    _run(linear.replace(max_epochs=2), tiny_corpus, tmp_path)
    # The decay spans max_epochs, so a 4-epoch run cannot continue a finished 2-epoch one; the warning says
    # what differs, not only that something does.
    caplog.set_level(logging.WARNING)
    assert _run(linear, tiny_corpus, tmp_path).resumed_from == 0
    assert "rejected: it belongs to another configuration (max_epochs 2, now 4)" in _warnings(caplog)[0].getMessage()


def test_lower_max_epochs_with_the_best_beyond_it_starts_over(
    tiny_corpus: Corpus, tmp_path: Path, uninterrupted: RunResult, caplog: pytest.LogCaptureFixture
) -> None:
    assert uninterrupted.best_epoch == 4  # the premise: the finished run's best lies beyond 2
    _run(TINY_LSTM, tiny_corpus, tmp_path)
    caplog.set_level(logging.WARNING)
    result = _run(TINY_LSTM.replace(max_epochs=2), tiny_corpus, tmp_path)
    fresh = _run(TINY_LSTM.replace(max_epochs=2), tiny_corpus)
    assert result.resumed_from == 0
    assert _epochs(result) == _epochs(fresh) == _epochs(uninterrupted)[:2]
    assert result.best_epoch <= 2 and result.test.as_dict() == fresh.test.as_dict()
    assert len(_warnings(caplog)) == 1


def test_lower_max_epochs_with_the_best_within_it_reuses_the_run(
    tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = encode_corpus(TINY_LSTM, tiny_corpus).dev
    calls = _fake_dev_predictions(monkeypatch, dev, [0.2, 0.1, 0.3, 0.4])
    _run(TINY_LSTM, tiny_corpus, tmp_path)
    monkeypatch.setattr(train_module, "_train_epoch", _fail("the best epoch lies within the budget"))
    result = _run(TINY_LSTM.replace(max_epochs=3), tiny_corpus, tmp_path)
    assert result.resumed_from == 3 and [h.epoch for h in result.history] == [1, 2, 3]
    assert result.best_epoch == 2 and result.dev.mse == pytest.approx(0.1**2, rel=1e-5)
    assert calls == ["dev"] * 4 + ["test", "test"]


# ----------------------------------------------------------------------------- schedules and options


def test_linear_schedule_with_warmup(tiny_corpus: Corpus, tmp_path: Path) -> None:
    config = TINY_LSTM.replace(schedule="linear", warmup_ratio=0.25)
    result = _run(config, tiny_corpus, tmp_path)
    assert len(result.history) == 4 and all(math.isfinite(h.dev.mse) for h in result.history)
    total, warmup = 4 * STEPS_PER_EPOCH, int(0.25 * 4 * STEPS_PER_EPOCH)
    after_3 = torch.load(tmp_path / "epoch-0003.pt", weights_only=True)["scheduler"]["_last_lr"][0]
    after_4 = torch.load(tmp_path / "epoch-0004.pt", weights_only=True)["scheduler"]["_last_lr"][0]
    assert after_3 == pytest.approx(config.lr * (total - 3 * STEPS_PER_EPOCH) / (total - warmup))
    assert after_4 == 0.0  # decayed to zero at the last step


def test_constant_schedule_keeps_the_learning_rate(tiny_corpus: Corpus, tmp_path: Path) -> None:
    _run(TINY_LSTM.replace(max_epochs=1), tiny_corpus, tmp_path)
    state = torch.load(tmp_path / "epoch-0001.pt", weights_only=True)
    assert state["scheduler"]["_last_lr"] == [TINY_LSTM.lr]
    assert state["scheduler"]["last_epoch"] == STEPS_PER_EPOCH


def test_adamw_with_grad_clip(tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = torch.nn.utils.clip_grad_norm_
    norms: list[float] = []

    def spy(params, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(train_module.nn.utils, "clip_grad_norm_", spy)
    config = TINY_LSTM.replace(optimizer="adamw", weight_decay=0.01, grad_clip=0.5, max_epochs=2)
    result = _run(config, tiny_corpus, tmp_path)
    assert all(math.isfinite(h.dev.mse) for h in result.history)
    assert norms == [0.5] * (2 * STEPS_PER_EPOCH)
    group = torch.load(tmp_path / "epoch-0002.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.01


def test_no_grad_clip_by_default(tiny_corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module.nn.utils, "clip_grad_norm_", _fail("grad_clip = 0 must not clip"))
    _run(TINY_LSTM.replace(max_epochs=1), tiny_corpus)


def test_bidirectional_stacked_lstm_trains(tiny_corpus: Corpus) -> None:
    result = _run(TINY_LSTM.replace(layers=2, bidirectional=True, max_epochs=1, min_freq=2), tiny_corpus)
    assert math.isfinite(result.dev.mse)
    assert "lstm.weight_hh_l1_reverse" in result.trainable_names


def test_external_frozen_embeddings_train(tiny_corpus: Corpus, tmp_path: Path) -> None:
    vocab = encode_corpus(TINY_LSTM, tiny_corpus).vocab
    vectors = tmp_path / "v.txt"
    rng = np.random.default_rng(0)
    vectors.write_text("".join(f"{w} {' '.join(map(str, rng.normal(size=6)))}\n" for w in vocab.itos[2:]))
    config = TINY_LSTM.replace(embedding="external", vectors=str(vectors), freeze_embeddings=True, max_epochs=1)
    result = _run(config, tiny_corpus)
    assert "embedding.weight" not in result.trainable_names
    assert result.total_params - result.trainable_params == len(vocab) * 6


# ---------------------------------------------------------------------------------- early stopping


def _fake_dev_predictions(monkeypatch: pytest.MonkeyPatch, dev, errors: list[float]) -> list[str]:
    """Dev predictions off by errors[k] at the k-th evaluation (MSE = error²); test predictions exact.

    Returns the log of which split each call predicted.
    """
    real = train_module.predict
    calls: list[str] = []

    def fake(model, split, batch_size, device):
        real(model, split, batch_size, device)  # the real evaluation still runs
        calls.append("dev" if split is dev else "test")
        if split is dev:
            return split.targets + errors[calls.count("dev") - 1]
        return split.targets.copy()

    monkeypatch.setattr(train_module, "predict", fake)
    return calls


def test_patience_stops_early(tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = TINY_LSTM.replace(patience=2, max_epochs=9)
    calls = _fake_dev_predictions(monkeypatch, encode_corpus(config, tiny_corpus).dev, [0.1, 0.2, 0.3, 0.05])
    result = _run(config, tiny_corpus, tmp_path)
    assert len(result.history) == 3 and result.stopped_early
    assert result.best_epoch == 1 and result.dev.mse == pytest.approx(0.1**2, rel=1e-5)
    assert [h.best for h in result.history] == [True, False, False]
    assert calls == ["dev", "dev", "dev", "test"]
    assert result.test.mse == 0.0
    # Resuming a stopped run trains nothing more.
    again = _run(config, tiny_corpus, tmp_path)
    assert again.stopped_early and again.resumed_from == 3 and len(again.history) == 3
    assert calls[4:] == ["test"]


def test_patience_zero_never_stops(tiny_corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_dev_predictions(monkeypatch, encode_corpus(TINY_LSTM, tiny_corpus).dev, [0.1, 0.2, 0.3, 0.4])
    result = _run(TINY_LSTM.replace(patience=0), tiny_corpus)
    assert len(result.history) == 4 and not result.stopped_early and result.best_epoch == 1


def test_lower_patience_with_a_later_best_starts_over(
    tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # patience is not in the fingerprint: a patience-2 trial shares the run directory of a patience-0 one.
    # Uninterrupted, patience 2 stops after epoch 3 with epoch 1 best; the finished run's best (4) lies beyond.
    dev = encode_corpus(TINY_LSTM, tiny_corpus).dev
    calls = _fake_dev_predictions(monkeypatch, dev, [0.1, 0.2, 0.3, 0.05] + [0.1, 0.2, 0.3])
    assert _run(TINY_LSTM, tiny_corpus, tmp_path).best_epoch == 4
    caplog.set_level(logging.WARNING)
    result = _run(TINY_LSTM.replace(patience=2), tiny_corpus, tmp_path)
    assert result.resumed_from == 0 and len(_warnings(caplog)) == 1
    assert [h.epoch for h in result.history] == [1, 2, 3] and result.stopped_early
    assert result.best_epoch == 1 and result.dev.mse == pytest.approx(0.1**2, rel=1e-5)
    assert calls == ["dev"] * 4 + ["test"] + ["dev"] * 3 + ["test"]


def test_lower_patience_with_the_best_before_the_stop_reuses_the_run(
    tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = encode_corpus(TINY_LSTM, tiny_corpus).dev
    _fake_dev_predictions(monkeypatch, dev, [0.1, 0.2, 0.3, 0.4])
    _run(TINY_LSTM, tiny_corpus, tmp_path)
    monkeypatch.setattr(train_module, "_train_epoch", _fail("patience 2 stops after epoch 3, already trained"))
    result = _run(TINY_LSTM.replace(patience=2), tiny_corpus, tmp_path)
    # As an uninterrupted patience-2 run: three epochs, the last two without improvement.
    assert result.resumed_from == 3 and [h.epoch for h in result.history] == [1, 2, 3]
    assert result.stopped_early and result.best_epoch == 1


def test_test_split_is_predicted_once_after_training(tiny_corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = encode_corpus(TINY_LSTM, tiny_corpus)
    real = train_module.predict
    events: list[str] = []

    def spy(model, split, batch_size, device):
        events.append({id(encoded.train): "predict train", id(encoded.dev): "predict dev",
                       id(encoded.test): "predict test"}[id(split)])
        return real(model, split, batch_size, device)

    monkeypatch.setattr(train_module, "predict", spy)
    _run(TINY_LSTM, tiny_corpus, on_epoch=lambda e: events.append(f"epoch {e.epoch}"))
    expected = [x for epoch in range(1, 5) for x in ("predict dev", f"epoch {epoch}")] + ["predict test"]
    assert events == expected


def test_test_scores_use_the_best_epoch_weights(tiny_corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = encode_corpus(TINY_LSTM, tiny_corpus)
    real = train_module.predict
    dev_predictions: list[np.ndarray] = []
    test_predictions: list[np.ndarray] = []

    def spy(model, split, batch_size, device):
        out = real(model, split, batch_size, device)
        if split is encoded.dev:
            dev_predictions.append(out)
            test_predictions.append(real(model, encoded.test, batch_size, device))  # the test score then
        return out

    monkeypatch.setattr(train_module, "predict", spy)
    result = _run(TINY_LSTM, tiny_corpus)
    from vadsearch.metrics import score

    at_best = score(test_predictions[result.best_epoch - 1], encoded.test.targets)
    assert result.test.as_dict() == at_best.as_dict()


def test_empty_test_split_gives_no_test_score(tmp_path: Path) -> None:
    corpus = load_corpus(write_csv(tmp_path / "c.csv", synthetic_rows(30, 10, 0, seed=1)))
    result = _run(TINY_LSTM.replace(max_epochs=1), corpus)
    assert result.test is None and math.isfinite(result.dev.mse)


# ------------------------------------------------------------------------------------------ failures


def test_divergence_is_a_training_error(tiny_corpus: Corpus, tmp_path: Path, monkeypatch) -> None:
    real = train_module._train_epoch
    # An epoch trained for real whose loss overflowed (no allowed Adam rate makes a tiny LSTM's do so).
    monkeypatch.setattr(train_module, "_train_epoch", lambda *args, **kwargs: real(*args, **kwargs) * math.inf)
    with pytest.raises(TrainingError, match="diverged at epoch 1.*lower the learning rate"):
        _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert not list(tmp_path.glob("epoch-*"))  # a diverged epoch is never checkpointed


def test_nan_loss_is_a_training_error(tiny_corpus: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_module._train_epoch
    losses = iter([0.5, math.nan])

    def epoch(*args, **kwargs):
        real(*args, **kwargs)
        return next(losses)

    monkeypatch.setattr(train_module, "_train_epoch", epoch)
    with pytest.raises(TrainingError, match="diverged at epoch 2"):
        _run(TINY_LSTM, tiny_corpus)


def test_unknown_device() -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu-ish")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_a_gpu_index_beyond_the_visible_ones_is_refused_before_training(monkeypatch) -> None:
    # Two GPUs seen: cuda:2 would fail every trial of a study with an invalid device ordinal.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert str(resolve_device("cuda:1")) == "cuda:1" and str(resolve_device("cuda")) == "cuda"
    with pytest.raises(ConfigError, match=r"sees 2 CUDA GPU\(s\), cuda:0 to cuda:1 \(CUDA_VISIBLE_DEVICES=4,5\)"):
        resolve_device("cuda:2")
    # A worker's log names the card, and which of the machine's GPUs the process was given.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"Card {torch.device(device).index}")
    assert describe_device(torch.device("cuda:1")) == "cuda:1 (Card 1, CUDA_VISIBLE_DEVICES=4,5)"
    assert describe_device(torch.device("cpu")) == "cpu"


def test_mps_without_an_apple_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no Apple MPS device"):
        resolve_device("mps")


# ------------------------------------------------------------------------------------------ baseline


@pytest.mark.parametrize(("kind", "expected"), [("constant", constant_baseline), ("mean", mean_baseline)])
def test_baseline_scores_without_training(tiny_corpus: Corpus, monkeypatch, kind: str, expected) -> None:
    import vadsearch.models

    monkeypatch.setattr(vadsearch.models, "build_model", _fail("a baseline builds no model"))
    monkeypatch.setattr(train_module, "_train_epoch", _fail("a baseline trains nothing"))
    result = _run(TrainConfig(model="baseline", baseline=kind), tiny_corpus)
    scores = expected(tiny_corpus)
    assert result.dev.as_dict() == scores["dev"].as_dict()
    assert result.test.as_dict() == scores["test"].as_dict()
    assert result.best_epoch == 0 and result.history == () and result.trainable_params == 0


def test_constant_baseline_on_real_data(real_corpus: Corpus) -> None:
    result = _run(TrainConfig(model="baseline"), real_corpus)
    assert round(result.dev.mse, 4) == 0.0751 and round(result.test.mse, 4) == 0.0765


def test_train_refuses_the_baseline_it_cannot_train(tiny_corpus: Corpus) -> None:
    with pytest.raises(ValueError, match="vadsearch.fit.fit"):
        train(TrainConfig(model="baseline"), tiny_corpus, device="cpu")


# --------------------------------------------------------------------------------------------- BERT


def _tiny_bert(tiny_bert_dir: str, **overrides) -> TrainConfig:
    options = {"model": "bert", "model_name": tiny_bert_dir, "max_length": 32, "batch_size": 8,
               "eval_batch_size": 16, "lr": 1e-3, "max_epochs": 2, "dropout": 0.1, "trainable_layers": "last-2",
               "seed": 0}
    return TrainConfig(**{**options, **overrides})


def test_bert_trains_a_window_of_layers(tiny_corpus: Corpus, tiny_bert_dir: str) -> None:
    result = _run(_tiny_bert(tiny_bert_dir), tiny_corpus)
    assert len(result.history) == 2 and all(math.isfinite(h.dev.mse) for h in result.history)
    assert 0 < result.trainable_params < result.total_params
    layers = {name.split(".")[3] for name in result.trainable_names if name.startswith("encoder.encoder.layer.")}
    assert layers == {"2", "3"}
    assert any(name.startswith("encoder.embeddings.") for name in result.trainable_names)


def test_bert_resume_is_exact(tiny_corpus: Corpus, tiny_bert_dir: str, tmp_path: Path) -> None:
    config = _tiny_bert(tiny_bert_dir)
    reference = _run(config, tiny_corpus, tmp_path / "a")
    _run(config.replace(max_epochs=1), tiny_corpus, tmp_path / "b")
    resumed = _run(config, tiny_corpus, tmp_path / "b")
    assert resumed.resumed_from == 1
    assert _epochs(resumed) == _epochs(reference)
    assert resumed.test.as_dict() == reference.test.as_dict()


# ----------------------------------------------------------------------------------------- real data


@pytest.fixture()
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two busy processes with two threads each slow
    each other down many times over; one thread costs ~15% when the machine is idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lstm_beats_the_constant_baseline_on_real_data(real_corpus: Corpus, one_thread) -> None:
    config = TrainConfig(model="lstm", hidden_size=64, layers=1, embedding_dim=64, batch_size=32, lr=1e-3,
                         max_epochs=2, seed=0)
    started = time.perf_counter()
    result = _run(config, real_corpus)
    assert result.dev.mse < 0.0751, f"dev MSE {result.dev.mse:.4f} after {time.perf_counter() - started:.0f} s"


# ------------------------------------------------------------------------------ background checkpoints


def _slow_saves(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.3, log: list | None = None) -> None:
    real = RunDirectory.save

    def slow(self, state, *args, **kwargs):
        started = time.monotonic()
        time.sleep(seconds)  # a large model's checkpoint: seconds of disk I/O
        real(self, state, *args, **kwargs)
        if log is not None:
            log.append(("written", state["epoch"], started, time.monotonic()))

    monkeypatch.setattr(RunDirectory, "save", slow)


def test_training_goes_on_while_a_checkpoint_is_written(
    tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: RunResult
) -> None:
    log: list = []
    _slow_saves(monkeypatch, log=log)
    real_epoch = train_module._train_epoch

    def logged_epoch(run, step, epoch, *args, **kwargs):
        log.append(("trains", epoch, time.monotonic()))
        return real_epoch(run, step, epoch, *args, **kwargs)

    monkeypatch.setattr(train_module, "_train_epoch", logged_epoch)
    on_disk_when_reported = []
    result = _run(TINY_LSTM, tiny_corpus, tmp_path,
                  on_epoch=lambda e: on_disk_when_reported.append((tmp_path / f"epoch-{e.epoch:04d}.pt").is_file()))
    written_until = {entry[1]: entry[3] for entry in log if entry[0] == "written"}
    trains_from = {entry[1]: entry[2] for entry in log if entry[0] == "trains"}
    assert all(trains_from[n + 1] < written_until[n] for n in (1, 2, 3))  # epoch n+1 trained during write n
    assert on_disk_when_reported == [True] * 4  # ...and each epoch was reported only once on disk
    assert _epochs(result) == _epochs(uninterrupted)
    resumed = _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert resumed.resumed_from == 4 and _epochs(resumed) == _epochs(uninterrupted)


def test_an_exception_waits_for_the_checkpoint_in_flight(
    tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: RunResult
) -> None:
    _slow_saves(monkeypatch)

    def stop_at_two(epoch: EpochResult) -> None:
        if epoch.epoch == 2:
            raise _Interrupt("pruned")

    with pytest.raises(_Interrupt):
        _run(TINY_LSTM, tiny_corpus, tmp_path, on_epoch=stop_at_two)
    # Epoch 2 was reported once on disk; epoch 3 may have trained meanwhile, and its write, already
    # started when the exception came, was finished rather than abandoned.
    assert (tmp_path / "epoch-0002.pt").is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    resumed = _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert resumed.resumed_from >= 2 and _epochs(resumed) == _epochs(uninterrupted)


def test_a_failed_background_write_fails_the_run(
    tiny_corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self, state, *args):
        if state["epoch"] == 2:
            raise CheckpointError("cannot write checkpoint: No space left on device")

    monkeypatch.setattr(RunDirectory, "save", disk_full)
    reported = []
    with pytest.raises(CheckpointError, match="No space left"):
        _run(TINY_LSTM, tiny_corpus, tmp_path, on_epoch=lambda e: reported.append(e.epoch))
    assert reported == [1]  # epoch 2 never reached the disk, so it was never reported


def test_the_writer_saves_a_snapshot_not_the_live_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_saves(monkeypatch, 0.2)
    weights = torch.zeros(4)
    state = {"fingerprint": "f", "data_sha256": "d", "epoch": 1, "best_epoch": 1, "model": {"w": weights},
             "optimizer": {"state": {0: {"exp_avg": weights}}, "param_groups": [{"params": [0]}]}}
    writer = BackgroundWriter(RunDirectory(tmp_path))
    writer.save(state, {"w": weights.clone()}, previous_best=0)
    weights += 1  # the next training step, while the write is in flight
    writer.wait()
    saved = torch.load(tmp_path / "epoch-0001.pt", weights_only=True)
    assert saved["model"]["w"].tolist() == [0.0] * 4
    assert saved["optimizer"]["state"][0]["exp_avg"].tolist() == [0.0] * 4


def test_a_stop_signal_is_raised_between_training_steps_never_inside_one(tiny_corpus, tmp_path, monkeypatch):
    # Raised inside torch (where its C++ calls back into Python) the KeyboardInterrupt aborted the process or
    # made it exit by SIGINT; now the step it lands in finishes and the next one does not start.
    import os
    import signal

    from vadsearch import interrupts

    real_make_step = train_module.make_step
    calls = {"started": 0, "finished": 0}

    def make_step(*args, **kwargs):
        step = real_make_step(*args, **kwargs)

        def counted(*batch):
            calls["started"] += 1
            if calls["started"] == STEPS_PER_EPOCH + 3:  # the third step of epoch 2
                os.kill(os.getpid(), signal.SIGTERM)
            loss = step(*batch)
            calls["finished"] += 1
            return loss

        return counted

    monkeypatch.setattr(train_module, "make_step", make_step)
    with interrupts.handled(), pytest.raises(KeyboardInterrupt):
        _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert calls == {"started": STEPS_PER_EPOCH + 3, "finished": STEPS_PER_EPOCH + 3}
    monkeypatch.undo()
    assert _run(TINY_LSTM, tiny_corpus, tmp_path).resumed_from == 1  # resumable as ever


def test_a_stop_signal_while_the_model_is_built_waits_for_it_and_trains_nothing(tiny_corpus, tmp_path,
                                                                                 monkeypatch):
    # Building a model runs torch (and its finalizers, where a KeyboardInterrupt is printed and dropped).
    import os
    import signal

    import vadsearch.models
    from vadsearch import interrupts

    real_build, built, steps = vadsearch.models.build_model, [], []

    def build_model(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        built.append(real_build(*args, **kwargs))
        return built[-1]

    real_make_step = train_module.make_step
    monkeypatch.setattr(vadsearch.models, "build_model", build_model)
    monkeypatch.setattr(train_module, "make_step", lambda *a, **k: steps.append(1) or real_make_step(*a, **k))
    with interrupts.handled(), pytest.raises(KeyboardInterrupt):
        _run(TINY_LSTM, tiny_corpus, tmp_path)
    assert len(built) == 1 and steps == []
