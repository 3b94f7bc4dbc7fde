"""TrainConfig: validation that names the field, typed `from_dict`, and the run fingerprint."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys

import pytest

from vadsearch.config import TrainConfig, check_device
from vadsearch.errors import ConfigError, VadsearchError

# ------------------------------------------------------------------------------------------ validation


def test_defaults_are_valid() -> None:
    config = TrainConfig()
    assert config.model == "lstm"
    assert TrainConfig.from_dict({}) == config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "gru"),
        ("optimizer", "sgd"),
        ("schedule", "cosine"),
        ("embedding", "glove"),
        ("baseline", "median"),
        ("max_epochs", 0),
        ("batch_size", 0),
        ("eval_batch_size", -1),
        ("hidden_size", 0),
        ("layers", 0),
        ("embedding_dim", 0),
        ("min_freq", 0),
        ("max_length", 0),
        ("max_length", 2),  # no room for [CLS], [SEP] and one token
        ("patience", -1),
        ("weight_decay", -0.1),
        ("grad_clip", -1.0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", math.nan),
        ("dropout", -0.1),
        ("dropout", 1.0),
        ("dropout", math.nan),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.5),
        ("trainable_layers", "top-2"),
        ("trainable_layers", "last-0"),
        ("trainable_layers", "last"),
        ("trainable_layers", "1-3"),
        ("trainable_layers", ""),
    ],
)
def test_invalid_value_is_rejected_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict({field: value})


def test_config_error_is_a_user_error_with_its_exit_code() -> None:
    with pytest.raises(VadsearchError) as info:
        TrainConfig(lr=-1.0)
    assert info.value.exit_code == 2


def test_external_embedding_needs_vectors() -> None:
    with pytest.raises(ConfigError, match="vectors"):
        TrainConfig(model="lstm", embedding="external")
    assert TrainConfig(model="lstm", embedding="external", vectors="glove.txt").vectors == "glove.txt"


def test_lstm_only_requirement_does_not_apply_to_other_models() -> None:
    # An irrelevant field does not block a BERT run: a search space may vary it for LSTMs only.
    assert TrainConfig(model="bert", embedding="external").embedding == "external"


@pytest.mark.parametrize("window", ["all", "none", "first-1", "middle-4", "last-12", "0:3", "10:12"])
def test_valid_layer_windows(window: str) -> None:
    assert TrainConfig(model="bert", trainable_layers=window).trainable_layers == window


@pytest.mark.parametrize("value", [0, 0.999, 0.5])
def test_range_limits_that_are_allowed(value: float) -> None:
    assert TrainConfig(dropout=value, warmup_ratio=value).dropout == value


@pytest.mark.parametrize(
    ("field", "value"),
    [("weight_decay", math.nan), ("weight_decay", math.inf), ("grad_clip", math.nan), ("grad_clip", math.inf),
     ("lr", math.inf)],
)
def test_non_finite_numbers_are_rejected(field: str, value: float) -> None:
    # NaN fails every comparison, so a `value < 0` check alone would let it through.
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_config_is_frozen() -> None:
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ from_dict


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown training option\(s\): hiden_size, learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1, "hiden_size": 4, "lr": 0.1})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_epochs", True),  # bool is an int subclass, but never a sensible count
        ("max_epochs", 2.0),
        ("max_epochs", "3"),
        ("hidden_size", None),
        ("lr", "0.001"),
        ("lr", True),
        ("lr", None),
        ("bidirectional", 1),
        ("bidirectional", "yes"),
        ("model", 1),
        ("vectors", 3),
        ("trainable_layers", 2),
    ],
)
def test_from_dict_rejects_wrong_types_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} must be "):
        TrainConfig.from_dict({field: value})


def test_from_dict_accepts_int_for_float() -> None:
    config = TrainConfig.from_dict({"lr": 1, "weight_decay": 0, "dropout": 0})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert isinstance(config.weight_decay, float) and isinstance(config.dropout, float)


def test_from_dict_accepts_none_for_optional_vectors() -> None:
    assert TrainConfig.from_dict({"vectors": None}).vectors is None


def test_to_dict_round_trips() -> None:
    config = TrainConfig(model="bert", lr=3e-5, trainable_layers="last-2", seed=7, batch_size=16)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_replace_validates() -> None:
    config = TrainConfig()
    assert config.replace(lr=0.5).lr == 0.5
    assert config.lr == 1e-3  # the original is untouched
    with pytest.raises(ConfigError, match="lr"):
        config.replace(lr=-1)
    with pytest.raises(ConfigError, match="unknown"):
        config.replace(nope=1)


# ---------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable() -> None:
    a = TrainConfig(model="lstm", hidden_size=64, lr=0.01)
    b = TrainConfig.from_dict({"lr": 0.01, "hidden_size": 64, "model": "lstm"})
    assert a.fingerprint() == b.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", a.fingerprint())


def test_fingerprint_is_the_same_in_another_process() -> None:
    # Checkpoints outlive the process: no hash() randomisation or set ordering may leak into it.
    code = "from vadsearch.config import TrainConfig; print(TrainConfig(model='bert', lr=2e-5).fingerprint())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == TrainConfig(model="bert", lr=2e-5).fingerprint()


@pytest.mark.parametrize(
    ("model", "change"),
    [
        ("lstm", {"lr": 0.01}),
        ("lstm", {"seed": 1}),
        ("lstm", {"hidden_size": 64}),
        ("lstm", {"layers": 2}),
        ("lstm", {"bidirectional": True}),
        ("lstm", {"dropout": 0.2}),
        ("lstm", {"min_freq": 2}),
        ("lstm", {"lowercase": False}),
        ("lstm", {"batch_size": 16}),
        ("lstm", {"optimizer": "adamw"}),
        ("lstm", {"schedule": "linear"}),
        ("lstm", {"embedding": "external", "vectors": "v.txt"}),
        ("bert", {"model_name": "other-bert"}),
        ("bert", {"max_length": 64}),
        ("bert", {"trainable_layers": "last-2"}),
        ("bert", {"train_embeddings": False}),
        ("bert", {"lr": 2e-5}),
        ("baseline", {"baseline": "mean"}),
    ],
)
def test_fingerprint_changes_with_relevant_fields(model: str, change: dict) -> None:
    base = TrainConfig(model=model)
    assert base.replace(**change).fingerprint() != base.fingerprint()


@pytest.mark.parametrize(
    ("model", "change"),
    [
        ("bert", {"hidden_size": 64}),
        ("bert", {"layers": 3}),
        ("bert", {"bidirectional": True}),
        ("bert", {"embedding_dim": 50}),
        ("bert", {"lowercase": False}),
        ("bert", {"min_freq": 3}),
        ("bert", {"baseline": "mean"}),
        ("lstm", {"model_name": "other-bert"}),
        ("lstm", {"max_length": 64}),
        ("lstm", {"trainable_layers": "last-2"}),
        ("lstm", {"train_embeddings": False}),
        ("lstm", {"baseline": "mean"}),
        ("lstm", {"vectors": "unused.txt"}),  # internal embeddings never read the file
        ("lstm", {"freeze_embeddings": True}),
        ("baseline", {"lr": 0.5}),
        ("baseline", {"hidden_size": 2}),
        ("baseline", {"max_epochs": 3, "schedule": "linear"}),
        ("lstm", {"patience": 3}),
    ],
)
def test_fingerprint_ignores_irrelevant_fields(model: str, change: dict) -> None:
    base = TrainConfig(model=model)
    assert base.replace(**change).fingerprint() == base.fingerprint()


def test_relevant_drops_fields_of_other_models() -> None:
    assert "hidden_size" not in TrainConfig(model="bert").relevant()
    assert "model_name" not in TrainConfig(model="lstm").relevant()
    assert set(TrainConfig(model="baseline").relevant()) == {"model", "seed", "baseline"}
    external = TrainConfig(model="lstm", embedding="external", vectors="v.txt", freeze_embeddings=True)
    assert external.relevant()["vectors"] == "v.txt" and external.relevant()["freeze_embeddings"] is True


def test_max_epochs_ignored_under_constant_schedule_only() -> None:
    constant = TrainConfig(schedule="constant", max_epochs=2)
    assert constant.replace(max_epochs=9).fingerprint() == constant.fingerprint()
    # A linear schedule decays to 0 at max_epochs: a different budget is a different run.
    linear = TrainConfig(schedule="linear", max_epochs=2)
    assert linear.replace(max_epochs=9).fingerprint() != linear.fingerprint()


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_names_that_can_train(name: str) -> None:
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["", "gpu", "cuda:", "cuda:x", "CPU", "cuda:0,1", " cpu"])
def test_device_names_rejected_without_torch(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        check_device(name)
