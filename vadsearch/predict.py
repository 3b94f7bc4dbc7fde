"""The winning model, in use: load a study's best weights (or an exported model), predict V, A, D; export.

A `Predictor` holds a model in eval mode and what turns text into its input: the training vocabulary
(LSTM: spaCy words, lowercased when the run was) or the tokenizer (BERT family, truncated to the run's
`max_length`). Texts are encoded exactly as in training and predicted in length-sorted batches by
`vadsearch.train.predict`, clipped to the rating scale [1, 5].

An exported model directory (`vadsearch export-model STUDY DIR`)::

    DIR/README.md          model card: data, parameters, best epoch, dev and test scores
    DIR/config.json        {"format": "vadsearch-model", "train_config": {...}, "best_epoch": ..., ...}
    LSTM:  DIR/model.pt    torch state dict of `LSTMRegressor` (torch.load(..., weights_only=True))
           DIR/vocab.json  the word list: a word's index is its id (0 <pad>, 1 <unk>)
    BERT:  DIR/encoder/    the fine-tuned encoder and its tokenizer (Hugging Face save_pretrained)
           DIR/head.safetensors  the regression head: weight (3, hidden), bias (3,) over the [CLS] state

`load_exported(DIR)` reads it back; its predictions equal those of the study's weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from vadsearch.config import TrainConfig
from vadsearch.data import EMOBANK_SHA256, described_file_sha256
from vadsearch.errors import CheckpointError, ConfigError, DataError, StorageError, VadsearchError

if TYPE_CHECKING:
    import optuna
    import torch
    from torch import nn

EXPORT_FORMAT = "vadsearch-model"
EXPORT_VERSION = 1
CHUNK = 8192  # texts encoded at once: bounds the padded id array of a large input file
EMOBANK_URL = "https://github.com/JULIELab/EmoBank"


@dataclass
class Predictor:
    """A trained model and its text encoding; `predict(texts)` → (n, 3) array of V, A, D."""

    config: TrainConfig
    model: nn.Module
    device: torch.device
    vocab: Any = None  # vadsearch.encoding.Vocabulary (LSTM)
    tokenizer: Any = None  # a Hugging Face tokenizer (BERT family)
    info: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from: study, trial, best_epoch, data_sha256, dev, test, run_dir."""

    def encode(self, texts: Sequence[str]):
        """`texts` as an `EncodedSplit` (targets are zeros), encoded the way the training data was."""
        from vadsearch.encoding import EncodedSplit, pad_rows, subword_pad_id, subword_rows, word_rows

        texts = [str(t) for t in texts]
        if self.vocab is not None:
            rows, pad_id = word_rows(texts, self.vocab, self.config.lowercase), 0
        else:
            rows = subword_rows(texts, self.tokenizer, self.config.max_length)
            pad_id = subword_pad_id(self.tokenizer)
        ids, lengths = pad_rows(rows, pad_id)
        return EncodedSplit(ids, lengths, np.zeros((len(rows), 3), dtype=np.float32))

    def predict(self, texts: Iterable[str], batch_size: int | None = None) -> np.ndarray:
        """(n, 3) float32 predictions of V, A, D in input order, in [1, 5]."""
        from vadsearch.train import predict

        texts = list(texts)
        if batch_size is None:  # not `or`: 0 is an error, not the default
            batch_size = self.config.eval_batch_size
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        parts = [predict(self.model, self.encode(texts[i : i + CHUNK]), batch_size, self.device)
                 for i in range(0, len(texts), CHUNK)]
        return np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.float32)


# --- loading from a run directory and from a study -----------------------------------------------------


def load_run(run_dir: str | Path, device: str = "auto", *, epoch: int | None = None,
             fingerprint: str | None = None) -> Predictor:
    """The best weights in a run directory (`best-NNNN.pt`; the newest, or that of `epoch`)."""
    from vadsearch.checkpoint import RunDirectory
    from vadsearch.models import build_for_weights

    run = RunDirectory(run_dir)
    try:
        best = run.best(epoch)
    except Exception as exc:  # a torn or foreign file: anything unpicklable
        raise CheckpointError(f"cannot read the best weights in {run.path}: {type(exc).__name__}") from None
    if best is None and not run.path.exists() and not run.path.is_absolute():
        # Most often the command runs elsewhere than the worker did: the stored path is relative to it.
        raise CheckpointError(
            f"no run directory {run.path} here ({Path.cwd()}): run from the directory the workers ran in, or "
            "pass --artifacts DIR (theirs)")
    if best is None:
        raise CheckpointError(
            f"no best weights (best-*.pt) in {run.path}: the run was deleted, or `--keep study-best` removed "
            "them because another trial was better; pass --artifacts if the checkpoints live elsewhere"
        )
    if fingerprint is not None and best.get("fingerprint") != fingerprint:
        raise CheckpointError(f"the weights in {run.path} belong to another configuration than the trial's")
    config = TrainConfig.from_dict(best["config"])
    info = {"best_epoch": best.get("epoch"), "data_sha256": best.get("data_sha256"), "run_dir": str(run.path)}
    _check_model(config)
    return _predictor(config, build_for_weights(config, best["model"]), device, words=best.get("vocab"), info=info)


def _check_model(config: TrainConfig) -> None:
    if config.model == "baseline":
        raise ConfigError("the constant baseline has no model to predict with")


def _predictor(config: TrainConfig, model: nn.Module, device: str, *, words: Sequence[str] | None = None,
               encoder: str | None = None, info: dict | None = None) -> Predictor:
    from vadsearch.train import resolve_device

    target = resolve_device(device)
    vocab = tokenizer = None
    if config.model == "lstm":
        from vadsearch.encoding import Vocabulary

        if not words:
            raise CheckpointError("these LSTM weights carry no vocabulary: they cannot encode text")
        vocab = Vocabulary(tuple(words))
    elif config.model == "bert":
        from vadsearch.encoding import load_tokenizer

        tokenizer = load_tokenizer(encoder or config.model_name)
    return Predictor(config, model.eval().to(target), target, vocab=vocab, tokenizer=tokenizer,
                     info=dict(info or {}))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The study's best COMPLETE trial by dev MSE (as `vadsearch best` picks it)."""
    from vadsearch import report

    chosen = report.best(study)["trial"]
    return next(t for t in study.get_trials(deepcopy=False) if t.number == chosen)


def trial_run_dir(trial: optuna.trial.FrozenTrial, study_name: str, artifacts: str | Path | None = None) -> Path:
    """Where a trial's checkpoints are: under `artifacts` when given (the directory the workers were
    started with), else the path the worker stored (relative to the worker's working directory)."""
    stored = trial.user_attrs.get("checkpoint_dir")
    if not stored:
        raise StorageError(f"trial {trial.number} of {study_name!r} has no checkpoint_dir: no vadsearch worker ran it")
    if artifacts is not None:
        from vadsearch.checkpoint import run_directory

        return run_directory(artifacts, study_name, Path(stored).name)
    return Path(stored)


def load_best(study: optuna.Study, *, artifacts: str | Path | None = None, device: str = "auto") -> Predictor:
    """The best trial's model of `study`, with the trial's scores in `info`."""
    trial = best_trial(study)
    attrs = trial.user_attrs
    config = TrainConfig.from_dict(attrs.get("config") or {})
    if config.model == "baseline":
        raise ConfigError(f"the best trial of {study.study_name!r} is the constant baseline: it has no model")
    predictor = load_run(trial_run_dir(trial, study.study_name, artifacts), device,
                         epoch=attrs.get("best_epoch"), fingerprint=config.fingerprint())
    described = study.user_attrs.get("vadsearch") or {}
    predictor.info.update({
        "study": study.study_name, "trial": trial.number, "params": dict(trial.params),
        "epochs_done": attrs.get("epochs_done"), "dev": attrs.get("dev"), "test": attrs.get("test"),
        "data_subset": described.get("data_subset"), "n_train": attrs.get("n_train"),
        "file_sha256": described_file_sha256(described),
    })
    return predictor


def study_corpus(study: optuna.Study, data: str | Path | None = None):
    """The corpus the study was run on (its subset too), checked against the study's data sha256."""
    from vadsearch.data import load_emobank

    described = study.user_attrs.get("vadsearch") or {}
    corpus = load_emobank(data or described.get("data_path"))
    subset = described.get("data_subset")
    if subset:
        corpus = corpus.subset(*subset, seed=described.get("seed", 0))
    expected = described.get("data_sha256")
    if expected and corpus.sha256 != expected:
        raise DataError(f"study {study.study_name!r} was run on other data (sha256 {expected[:12]}…, this is "
                        f"{corpus.sha256[:12]}…): pass the workers' --data")
    return corpus


# --- export ------------------------------------------------------------------------------------------


def export(predictor: Predictor, directory: str | Path) -> Path:
    """Write the predictor as a self-contained model directory (see the module docstring)."""
    import torch

    from vadsearch.outdir import writable_dir

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} exists and is not an empty directory: choose a new directory")
    writable_dir(directory, "the model directory", advice="choose another directory")
    model = predictor.model
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if predictor.config.model == "lstm":
        torch.save(state, directory / "model.pt")
        (directory / "vocab.json").write_text(json.dumps(list(predictor.vocab.itos), ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    else:
        from safetensors.torch import save_file

        model.encoder.save_pretrained(directory / "encoder")
        predictor.tokenizer.save_pretrained(directory / "encoder")
        save_file({"weight": state["head.weight"].contiguous(), "bias": state["head.bias"].contiguous()},
                  str(directory / "head.safetensors"))
        # safetensors writes its files readable by their owner alone; an export is shared like its other files.
        mode = _umask_mode()
        for weights in directory.rglob("*.safetensors"):
            weights.chmod(mode)
    info = {k: v for k, v in predictor.info.items() if k != "run_dir"}
    document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": predictor.config.model,
                "train_config": predictor.config.to_dict(), **info}
    (directory / "config.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(model_card(predictor, directory), encoding="utf-8")
    return directory


def _umask_mode() -> int:
    """The mode a new file gets here (0o644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_exported(directory: str | Path, device: str = "auto") -> Predictor:
    """A model directory written by `export` (or `vadsearch export-model`)."""
    import torch

    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    if not is_exported(directory):
        raise DataError(f"{directory} is not an export-model directory: it has no config.json")
    try:
        document = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{directory}/config.json cannot be read ({type(exc).__name__}): is it a directory "
                        "written by export-model?") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise DataError(f"{directory}/config.json is not a vadsearch model (format {EXPORT_FORMAT!r})")
    if document.get("version", 0) > EXPORT_VERSION:
        raise DataError(f"{directory} was written by a newer vadsearch (version {document['version']}); upgrade")
    config = TrainConfig.from_dict(document["train_config"])
    info = {k: v for k, v in document.items() if k not in ("format", "version", "model", "train_config")}
    _check_model(config)
    needed = ("model.pt", "vocab.json") if config.model == "lstm" else ("encoder", "head.safetensors")
    missing = [name for name in needed if not (directory / name).exists()]
    if missing:  # a partial copy: name the files rather than fail inside torch or transformers
        raise DataError(f"{directory} is an incomplete export-model directory: missing {', '.join(missing)}")
    # A damaged copy (a torn file, not only a missing one) is one line, as in `load_run`, not a traceback
    # from torch, json or safetensors.
    try:
        if config.model == "lstm":
            from vadsearch.models import build_for_weights

            weights = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
            words = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
            return _predictor(config, build_for_weights(config, weights), device, words=words, info=info)
        from safetensors.torch import load_file

        from vadsearch.models.bert import BertRegressor, load_encoder

        encoder = str(directory / "encoder")
        model = BertRegressor(load_encoder(encoder), config.dropout, np.zeros(3, dtype=np.float32))
        model.head.load_state_dict(load_file(str(directory / "head.safetensors")))
        return _predictor(config, model, device, encoder=encoder, info=info)
    except VadsearchError:
        raise
    except Exception as exc:
        raise DataError(f"{directory}: its model files cannot be read ({type(exc).__name__}): a damaged copy? "
                        "export it again") from None


def is_exported(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def names_a_model_directory(argument: str, studies: Callable[[], list[str]]) -> bool:
    """Whether `predict`'s argument means a model directory rather than a study: an export, or any other
    directory (which `load_exported` then says is not one), unless it is a bare name that `studies()` also
    holds: inside the artifacts directory each study has a folder of its name."""
    if not argument.strip():  # Path("") is the working directory: an empty name is no directory
        return False
    path = Path(argument)
    if is_exported(path) or (path.is_dir() and argument != path.name):
        return True
    if not path.is_dir():
        return False
    try:
        return argument not in studies()
    except StorageError:  # no storage to hold a study of that name
        return True


# --- the model card ----------------------------------------------------------------------------------


def model_card(predictor: Predictor, directory: str | Path = "MODEL_DIR") -> str:
    """README.md of an exported model: what it predicts, how to use it, data, parameters, scores, files."""
    info, config = predictor.info, predictor.config
    title = f"{info['study']} trial {info['trial']}" if "study" in info else "vadsearch model"
    if config.model == "lstm":
        kind = (f"An LSTM ({'bidirectional, ' if config.bidirectional else ''}{config.layers} "
                f"layer{'s' if config.layers > 1 else ''}, hidden size {config.hidden_size})")
    else:
        kind = f"The encoder `{config.model_name}`, fine-tuned with a linear head on its [CLS] state,"
    subset = info.get("data_subset")
    if subset:
        # The sentences used (a split smaller than its subset is used whole), else, for older studies, those asked for.
        used = [info.get("n_train"), *((info.get(split) or {}).get("n") for split in ("dev", "test"))]
        n = [u if u is not None else asked for u, asked in zip(used, subset)]
        data = (f"Trained on a deterministic subset of its train split ({n[0]} sentences), selected on "
                f"{n[1]} dev sentences and scored once on {n[2]} test sentences. Data identity "
                "(sha256 of the file's sha256 with the subset's sizes and seed):")
    else:
        data = "Trained on its train split, selected on dev, scored once on test. sha256 of the data file:"
    corpus = (f"[EmoBank]({EMOBANK_URL}) (Buechel & Hahn, EACL 2017), licensed CC-BY-SA 4.0: 10k English "
              "sentences rated for V, A and D." if info.get("file_sha256") in (None, EMOBANK_SHA256) else
              f"A corpus in the format of [EmoBank]({EMOBANK_URL}) (not the published file: sha256 "
              f"`{info['file_sha256']}`).")
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(config.relevant().items()))
    epochs = info.get("epochs_done")
    best = f"{info.get('best_epoch')}" + (f" of {epochs}" if epochs else "")
    if config.model == "lstm":
        files = ("- `model.pt`: the state dict of `vadsearch.models.lstm.LSTMRegressor` (`embedding.weight` "
                 "vocabulary × dim, `lstm.*`, `head.weight` 3 × hidden·directions, `head.bias`); load it with "
                 "`torch.load(path, weights_only=True)`\n"
                 "- `vocab.json`: the word list, index = token id (0 `<pad>`, 1 `<unk>`); words are spaCy tokens"
                 + (", lowercased" if config.lowercase else ""))
    else:
        files = ("- `encoder/`: the fine-tuned encoder and its tokenizer (`AutoModel.from_pretrained`, "
                 "`AutoTokenizer.from_pretrained`)\n"
                 "- `head.safetensors`: the regression head, `weight` (3 × hidden) and `bias` (3): "
                 "[V, A, D] = weight · h[CLS] + bias")
    return f"""# {title}: Valence, Arousal, Dominance regression

{kind} that rates an English sentence for Valence, Arousal and Dominance on EmoBank's 1-5 scale
(predictions are clipped to [1, 5]). It is the best trial of a vadsearch hyperparameter search, at its
best epoch on dev.

## Use

```bash
vadsearch predict {directory} "What a wonderful day." "I am so tired of this."
```

```python
from vadsearch.predict import load_exported

model = load_exported("{directory}", device="cpu")
model.predict(["What a wonderful day."])  # array([[V, A, D]])
```

## Data

{corpus} {data}
`{info.get('data_sha256')}`.

## Parameters

| option | value |
| --- | --- |
{rows}

Best epoch (on dev): {best}.

## Scores

MSE averaged over V, A, D (lower is better), per-dimension MSE, and Pearson r.

{_scores_table(info)}

## Files

- `config.json`: the training configuration, the scores above, and where the model came from
{files}
"""


def _scores_table(info: dict[str, Any]) -> str:
    def cell(value):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    keys = ("mse", "mse_v", "mse_a", "mse_d", "r_v", "r_a", "r_d", "n")
    lines = ["| split | MSE | MSE V | MSE A | MSE D | r V | r A | r D | n |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for split in ("dev", "test"):
        scores = info.get(split)
        if isinstance(scores, dict):
            values = [cell(scores.get(k)) if k != "n" else str(scores.get("n", "")) for k in keys]
            lines.append(f"| {split} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# --- reading input texts -------------------------------------------------------------------------------


def check_texts(texts: list[str]) -> list[str]:
    """Sentences given as arguments: bytes that are not UTF-8 reach Python as lone surrogates, which no
    tokenizer takes; one line names the first such sentence."""
    for number, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "surrogateescape")[:40].decode("utf-8", "backslashreplace")
            raise DataError(f"sentence {number} ({shown}) is not UTF-8 text") from None
    return texts


def read_texts(path: str | Path) -> list[str]:
    """Sentences from a file: a CSV's `text` column (`.csv`), else one sentence per non-empty line."""
    import sys

    if str(path) == "-":
        # As bytes, decoded strictly: Python's own decoding of stdin lets invalid bytes through as surrogates,
        # which failed later, deep in a tokenizer.
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        try:
            text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise DataError(f"standard input: cannot read as UTF-8 text ({exc})") from None
        return [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory: --file takes a text file (one sentence per line) or a CSV")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    if path.suffix.lower() != ".csv":
        # "\n" only (read_text already turned \r\n and \r into it), as stdin splits: str.splitlines would
        # also split at a form feed, NEL or U+2028 inside a sentence, one input line giving two rows.
        return [line for line in raw.split("\n") if line.strip()]
    # Read as the training data is (strict quoting, header names stripped): an unterminated quote is an error,
    # not the rest of the file as one text.
    from vadsearch.data import csv_records

    header: list[str] | None = None
    texts: list[str] = []
    for _, fields in csv_records(raw, path):
        if header is None:
            header = [name.strip() for name in fields]
            if "text" not in header:
                raise DataError(f"{path}: a CSV needs a `text` column; its columns are {header}")
            column = header.index("text")
        else:
            texts.append(fields[column] if column < len(fields) else "")
    if header is None:
        raise DataError(f"{path}: a CSV needs a `text` column; its columns are none")
    return texts


def frame(texts: Sequence[str], predictions: np.ndarray):
    """text, V, A, D: one row per sentence."""
    import pandas as pd

    return pd.DataFrame({"text": list(texts), "V": predictions[:, 0].astype(float),
                         "A": predictions[:, 1].astype(float), "D": predictions[:, 2].astype(float)})
