"""One training configuration: a frozen, self-validating dataclass.

The same fields are what a study file's search space varies, what `vadsearch train` takes as options,
and what every checkpoint records, so a run can always be reproduced from its checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from vadsearch.errors import ConfigError

MODELS = ("lstm", "bert", "baseline")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "linear")
EMBEDDINGS = ("internal", "external")
BASELINES = ("constant", "mean")
_LAYER_WINDOW = re.compile(r"^(all|none|(first|middle|last)-[1-9]\d*|\d+:\d+)$")
MAX_LR = 10.0
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides one training run. Fields irrelevant to `model` are ignored."""

    model: str = "lstm"
    """Which regressor: `lstm`, `bert` or `baseline` (a constant predictor, no training)."""

    # --- the epoch loop and optimizer -----------------------------------------------------------
    max_epochs: int = 9
    """Upper bound on epochs; the best epoch on dev is the run's result (the report tuned 1-9)."""
    patience: int = 0
    """Stop after this many epochs without a dev improvement; 0 never stops early."""
    batch_size: int = 32
    eval_batch_size: int = 256
    """Evaluation holds no activations for backward, so it can use much larger batches."""
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Max global gradient norm; 0 disables clipping."""
    schedule: str = "constant"
    """`linear`: warm up for `warmup_ratio` of all steps, then decay linearly to 0."""
    warmup_ratio: float = 0.0
    seed: int = 0

    # --- LSTM -----------------------------------------------------------------------------------
    hidden_size: int = 500
    layers: int = 1
    bidirectional: bool = False
    embedding: str = "internal"
    """`internal`: learned from scratch; `external`: initialised from the `vectors` file."""
    embedding_dim: int = 300
    """Only for internal embeddings; external ones take the file's dimension."""
    vectors: str | None = None
    """Word-vector file in GloVe or word2vec text format, for `embedding = "external"`."""
    freeze_embeddings: bool = False
    lowercase: bool = True
    min_freq: int = 1
    """Words seen fewer times in the training split map to `<unk>`."""
    dropout: float = 0.1

    # --- BERT -----------------------------------------------------------------------------------
    model_name: str = "bert-base-uncased"
    """Hugging Face hub id or local directory of any encoder."""
    max_length: int = 128
    """Tokens per sentence after truncation, [CLS] and [SEP] included."""
    trainable_layers: str = "all"
    """Transformer layers that train: `all`, `none`, `first-K`, `middle-K`, `last-K` or `I:J`."""
    train_embeddings: bool = True
    """Whether the embedding layer trains too (studies/bert-freeze.toml freezes it, as the report did)."""

    # --- baseline -------------------------------------------------------------------------------
    baseline: str = "constant"
    """`constant` predicts (3, 3, 3); `mean` predicts the training-split means."""

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("embedding", self.embedding, EMBEDDINGS)
        _choice("baseline", self.baseline, BASELINES)
        for name in ("max_epochs", "batch_size", "eval_batch_size", "hidden_size", "layers",
                     "embedding_dim", "min_freq", "max_length"):
            # Past int32, torch fails inside C++ with a stack of its frames as the trial's reason.
            if not 1 <= getattr(self, name) < 2**31:
                raise ConfigError(f"{name} must be an integer in [1, 2**31), got {getattr(self, name)}")
        # Written as `not (x >= 0)` so that NaN, which fails every comparison, is rejected too.
        for name in ("patience", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0 or getattr(self, name) == math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's and torch's seeds
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        if not 0 < self.lr <= MAX_LR:  # far beyond any Adam rate that trains; 1e38 overflowed inside torch
            raise ConfigError(f"lr must be a positive number up to {MAX_LR:g}, got {self.lr}")
        for name in ("dropout", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_length < 3:
            raise ConfigError(f"max_length must leave room for [CLS], [SEP] and a token, got {self.max_length}")
        if not _LAYER_WINDOW.match(self.trainable_layers):
            raise ConfigError(
                f"trainable_layers must be all, none, first-K, middle-K, last-K or I:J, "
                f"got {self.trainable_layers!r}"
            )
        if self.model == "lstm" and self.embedding == "external" and not self.vectors:
            raise ConfigError("embedding = external needs a word-vector file: vectors = PATH in a study file, "
                              "--set vectors=PATH for a worker, --vectors PATH for train")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from plain values, naming any unknown key instead of a TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**_coerce(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def relevant(self) -> dict[str, Any]:
        """The fields that affect this model's training; what identifies a run."""
        common = {"model", "seed"}
        if self.model == "baseline":
            keep = common | {"baseline"}
        else:
            keep = {f.name for f in fields(self)} - {"baseline"}
            unused = _BERT_ONLY if self.model == "lstm" else _LSTM_ONLY
            keep -= unused
            if self.model == "lstm" and self.embedding == "internal":
                keep -= {"vectors", "freeze_embeddings"}
        values = {k: v for k, v in self.to_dict().items() if k in keep}
        unused = self._read_as_defaults()
        return {k: _DEFAULTS[k] if k in unused else v for k, v in values.items()}

    def _read_as_defaults(self) -> set[str]:
        """Read as their defaults by `relevant`, they no longer tell runs apart, and a run at the defaults
        keeps the fingerprint it always had: the evaluation batch (speed, not scores), warm-up under a
        constant learning rate, the width of embeddings taken from a vector file. (A baseline keeps its seed:
        it changes no score, but names a repetition, and N seeds are N instant trials to test a service by.)"""
        unused = {"eval_batch_size"}
        unused |= {"warmup_ratio"} if self.schedule == "constant" else set()
        unused |= {"embedding_dim"} if self.model == "lstm" and self.embedding == "external" else set()
        return unused

    def decisive(self) -> set[str]:
        """The options whose value changes this run (its epoch budget included)."""
        return set(self.relevant()) - self._read_as_defaults()

    def kind(self) -> str:
        """The options that decide which others matter, as they are here: "model lstm, embedding internal,
        schedule constant"."""
        relevant = self.relevant()
        return ", ".join(f"{k} {getattr(self, k)}" for k in SWITCHES if k in relevant)

    def unused(self, given: dict[str, Any]) -> list[str]:
        """The options of `given` that change nothing in this run."""
        decisive = self.decisive()
        return [k for k in given if k not in decisive]

    def out_of_patience(self, epoch: int, best_epoch: int) -> bool:
        """Whether a run whose best dev score so far came at `best_epoch` stops after `epoch`: `patience`
        epochs without improvement (0: never)."""
        return 0 < self.patience <= epoch - best_epoch

    def fingerprint(self) -> str:
        """Stable hash of `relevant()`: a checkpoint is resumed only under the same fingerprint.

        `patience`, and `max_epochs` under a constant learning rate, are left out: raising the epoch
        budget continues a finished run. A linear schedule spans all epochs, so there it stays in.
        """
        return hashlib.sha256(json.dumps(self._identity(), sort_keys=True).encode()).hexdigest()[:16]

    def _identity(self) -> dict[str, Any]:
        ignored = {"patience"} | ({"max_epochs"} if self.schedule == "constant" else set())
        return {k: v for k, v in self.relevant().items() if k not in ignored}

    def differences(self, other: dict[str, Any]) -> str:
        """How the run of the configuration `other` (a `to_dict`) differs from this one, in words: what
        makes their fingerprints differ ("" where `other` is no readable configuration)."""
        try:
            theirs = TrainConfig.from_dict(other)._identity()
        except (ConfigError, TypeError, ValueError):
            return ""
        ours = self._identity()
        return ", ".join(f"{k} {theirs.get(k)!r}, now {ours.get(k)!r}" for k in sorted(theirs.keys() | ours.keys())
                         if theirs.get(k) != ours.get(k))


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
SWITCHES = ("model", "embedding", "schedule")
"""The options that decide which others matter (`relevant`)."""
_BERT_ONLY = {"model_name", "max_length", "trainable_layers", "train_embeddings"}
_LSTM_ONLY = {"hidden_size", "layers", "bidirectional", "embedding", "embedding_dim", "vectors",
              "freeze_embeddings", "lowercase", "min_freq"}


def check_device(name: str) -> str:
    """`name` if it can name a training device; checked without loading torch, so that a baseline,
    which needs no device, still rejects a mistyped one."""
    if not _DEVICE.match(name):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    return name


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Check types against the field annotations; ints are accepted where floats are expected."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        kind = types[key]
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:  # TOML integers have no size limit
                raise ConfigError(f"{key} must be a float, got an integer of {len(str(abs(value)))} digits") from None
        expected = {"int": int, "float": float, "bool": bool, "str": str}.get(kind)
        if kind == "str | None":
            ok = value is None or isinstance(value, str)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, expected)
        if not ok:
            raise ConfigError(f"{key} must be {kind.replace(' | None', ' or null')}, got {value!r}")
        out[key] = value
    return out
