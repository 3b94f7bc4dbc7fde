"""Tiny finished studies for the tests of results (plots, predictions, export, retention).

Import the fixtures into a test module (`from results_fixtures import lstm_study`); each module that
does gets its own copy of the study, built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from search_helpers import write_study
from vadsearch.storage import open_storage
from vadsearch.studyfile import load_study_file
from vadsearch.worker import Worker, WorkerOptions


@dataclass
class TinyStudy:
    name: str
    storage: str  # URL
    artifacts: Path
    data: Path

    def load(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=open_storage(self.storage, create=False))


def run_study(root: Path, data: Path, *, name: str, search: str, keep: str = "best", **train) -> TinyStudy:
    """Run a grid study of the tiny corpus to the end with one in-process worker."""
    root.mkdir(parents=True, exist_ok=True)
    spec = load_study_file(write_study(root / f"{name}.toml", name=name, data=data, search=search, **train))
    study = TinyStudy(name, f"sqlite:///{root}/{name}.db", root / "artifacts", data)
    options = WorkerOptions(storage=study.storage, artifacts=study.artifacts, device="cpu", progress=False, keep=keep)
    assert Worker(spec, options).run().stopped == "finished"
    return study


@pytest.fixture(scope="module")
def lstm_study(tmp_path_factory, tiny_csv) -> TinyStudy:
    """4 LSTM configurations (hidden 4/8 × lr 0.001/0.01), 2 epochs each."""
    return run_study(tmp_path_factory.mktemp("lstm-study"), tiny_csv, name="tiny-lstm",
                     search="hidden_size = [4, 8]\nlr = [0.001, 0.01]")


@pytest.fixture(scope="module")
def bert_study(tmp_path_factory, tiny_csv, tiny_bert_dir) -> TinyStudy:
    """The tiny BERT with two freezing options, 2 epochs each: a freezing figure in miniature."""
    return run_study(tmp_path_factory.mktemp("bert-study"), tiny_csv, name="tiny-bert",
                     search='trainable_layers = ["first-2", "last-2"]', model="bert", model_name=tiny_bert_dir,
                     lr=1e-3, max_length=32, train_embeddings=False)
