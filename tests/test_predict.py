"""The winning model in use: `vadsearch predict` and `export-model` against the model called directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from results_fixtures import bert_study, lstm_study  # noqa: F401 (fixtures)
from vadsearch.checkpoint import RunDirectory
from vadsearch.cli import app
from vadsearch.config import TrainConfig
from vadsearch.encoding import Vocabulary, load_tokenizer, word_tokenize
from vadsearch.metrics import score
from vadsearch.predict import best_trial, load_best, load_exported, study_corpus

# Sentences of different lengths (batches are sorted by length), one unseen word, one empty line's worth.
TEXTS = ["The dog was very happy today.", "We went to the house and it was sad", "Unhappily tired!",
         "Love", "", "a a a a a a a a a a a a a a a a a a calm strong weak afraid"]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def direct(study) -> np.ndarray:
    """The best trial's weights, loaded by hand into the regressor and called one sentence at a time."""
    loaded = study.load()
    trial = best_trial(loaded)
    best = RunDirectory(trial.user_attrs["checkpoint_dir"]).best()
    assert best["epoch"] == trial.user_attrs["best_epoch"]
    config = TrainConfig.from_dict(best["config"])
    if config.model == "lstm":
        from vadsearch.models.lstm import LSTMRegressor

        vocab = Vocabulary(tuple(best["vocab"]))
        model = LSTMRegressor(len(vocab), config.embedding_dim, config.hidden_size, config.layers,
                              config.bidirectional, 0.0, np.zeros(3))
        rows = [vocab.encode(tokens) for tokens in word_tokenize(TEXTS, config.lowercase)]
    else:
        from vadsearch.models.bert import BertRegressor, load_encoder

        model = BertRegressor(load_encoder(config.model_name), 0.0, np.zeros(3))
        rows = load_tokenizer(config.model_name)(TEXTS, truncation=True, max_length=config.max_length)["input_ids"]
    model.load_state_dict(best["model"])
    model.eval()
    with torch.no_grad():
        out = [model(torch.tensor([row]), torch.tensor([len(row)]))[0].numpy() for row in rows]
    return np.clip(np.stack(out), 1, 5)


@pytest.fixture(params=["lstm", "bert"])
def study(request):
    return request.getfixturevalue(f"{request.param}_study")


def test_predictions_equal_the_model_called_directly(study):
    predictor = load_best(study.load(), device="cpu")
    expected = direct(study)
    np.testing.assert_allclose(predictor.predict(TEXTS), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predictor.predict(TEXTS, batch_size=2), expected, rtol=1e-5, atol=1e-5)


def test_the_best_weights_reproduce_the_stored_dev_score(study):
    loaded = study.load()
    predictor = load_best(loaded, device="cpu")
    dev = study_corpus(loaded).dev
    stored = best_trial(loaded).user_attrs["dev"]["mse"]
    assert score(predictor.predict(dev.texts), dev.targets).mse == pytest.approx(stored, rel=1e-5)


def test_predict_cli_prints_the_same_numbers_in_every_format(study, tmp_path):
    expected = direct(study)
    result = invoke("predict", study.name, *TEXTS, "--storage", study.storage, "--device", "cpu", "-f", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["text"] for r in rows] == TEXTS and result.stdout.endswith("]\n")  # a line end, as `report` has
    np.testing.assert_allclose([[r["V"], r["A"], r["D"]] for r in rows], expected, rtol=1e-5, atol=1e-5)

    sentences = tmp_path / "in.csv"
    sentences.write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)), encoding="utf-8")
    result = invoke("predict", study.name, "--file", sentences, "--storage", study.storage, "-f", "csv")
    assert result.exit_code == 0, result.output
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["text"] for r in rows] == TEXTS
    np.testing.assert_allclose([[float(r[k]) for k in "VAD"] for r in rows], expected, rtol=1e-5, atol=1e-5)

    result = invoke("predict", study.name, "Love", "--storage", study.storage)
    assert result.exit_code == 0 and "Love" in result.output and f"{expected[3, 0]:.4f}" in result.output


def test_a_text_file_is_one_sentence_per_line(lstm_study, tmp_path):
    lines = tmp_path / "in.txt"
    lines.write_text("The dog was very happy today.\n\nLove\n", encoding="utf-8")
    result = invoke("predict", lstm_study.name, "--file", lines, "--storage", lstm_study.storage, "-f", "json")
    assert result.exit_code == 0, result.output
    assert [r["text"] for r in json.loads(result.stdout)] == ["The dog was very happy today.", "Love"]


def test_export_and_reload_predict_the_same(study, tmp_path):
    loaded = study.load()
    predictor = load_best(loaded, device="cpu")
    result = invoke("export-model", study.name, tmp_path / "model", "--storage", study.storage)
    assert result.exit_code == 0, result.output
    directory = tmp_path / "model"
    reloaded = load_exported(directory, device="cpu")
    np.testing.assert_allclose(reloaded.predict(TEXTS), predictor.predict(TEXTS), rtol=1e-6, atol=1e-6)

    config = json.loads((directory / "config.json").read_text())
    trial = best_trial(loaded)
    assert config["format"] == "vadsearch-model" and config["trial"] == trial.number
    assert config["dev"] == trial.user_attrs["dev"] and config["test"] == trial.user_attrs["test"]
    modes = {path.relative_to(directory).as_posix(): path.stat().st_mode & 0o777
             for path in directory.rglob("*") if path.is_file()}
    assert len(set(modes.values())) == 1, modes  # safetensors' files were the owner's alone (0600)
    card = (directory / "README.md").read_text()
    # The tiny corpus is no EmoBank: the card says so rather than "10k English sentences".
    for needle in ("format of [EmoBank]", "not the published file", predictor.info["data_sha256"],
                   f"Best epoch (on dev): {trial.user_attrs['best_epoch']}", f"{trial.user_attrs['test']['mse']:.4f}"):
        assert needle in card
    if predictor.config.model == "lstm":
        state = torch.load(directory / "model.pt", weights_only=True)  # a plain, safe state dict
        assert set(state) == set(predictor.model.state_dict())
        assert json.loads((directory / "vocab.json").read_text())[:2] == ["<pad>", "<unk>"]
    else:
        from transformers import AutoModel, AutoTokenizer

        assert AutoModel.from_pretrained(directory / "encoder").config.num_hidden_layers == 4
        assert AutoTokenizer.from_pretrained(directory / "encoder")("happy")["input_ids"]
        assert (directory / "head.safetensors").is_file()

    # `predict` takes the exported directory in place of a study.
    result = invoke("predict", directory, *TEXTS[:2], "-f", "json")
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose([[r["V"], r["A"], r["D"]] for r in json.loads(result.stdout)],
                               predictor.predict(TEXTS[:2]), rtol=1e-5, atol=1e-5)


def test_export_refuses_a_directory_with_files(lstm_study, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    result = invoke("export-model", lstm_study.name, tmp_path / "taken", "--storage", lstm_study.storage)
    assert result.exit_code == 2 and "exists and is not an empty directory" in result.output
    (tmp_path / "a-file").write_text("")
    for target, code, line in ((tmp_path / "a-file", 2, "exists and is not an empty directory"),
                               (tmp_path / "a-file" / "model", 4, "cannot write to the model directory"),
                               (Path("/proc/model"), 4, "cannot write to the model directory /proc/model")):
        result = invoke("export-model", lstm_study.name, target, "--storage", lstm_study.storage)
        assert result.exit_code == code and line in result.stderr and "Traceback" not in result.output, target


def test_one_line_errors(lstm_study, tmp_path):
    result = invoke("predict", lstm_study.name, "--storage", lstm_study.storage)
    assert result.exit_code == 2 and "nothing to rate" in result.output
    (tmp_path / "empty.txt").write_text("\n\n")
    result = invoke("predict", lstm_study.name, "--file", tmp_path / "empty.txt", "--storage", lstm_study.storage)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: nothing to rate: {tmp_path}/empty.txt holds no sentence"
    result = invoke("predict", "", "hi", "--storage", lstm_study.storage)  # not the working directory
    assert result.exit_code == 3 and "no study named ''" in result.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence\nhello\n")
    result = invoke("predict", lstm_study.name, "--file", bad, "--storage", lstm_study.storage)
    assert result.exit_code == 2 and "`text` column" in result.output
    result = invoke("predict", lstm_study.name, "x", "--storage", lstm_study.storage, "--artifacts", tmp_path)
    assert result.exit_code == 4 and "no best weights" in result.output and "Traceback" not in result.output


def test_a_relative_run_directory_missing_here_says_where_to_run(tmp_path, monkeypatch):
    # A worker stores its run directory relative to where it ran; read from elsewhere, the weights looked deleted.
    from vadsearch.errors import CheckpointError
    from vadsearch.predict import load_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no run directory vadsearch-artifacts/s/0123 here \(.+\): run from "
                                              r"the directory the workers ran in, or pass --artifacts DIR"):
        load_run(Path("vadsearch-artifacts/s/0123"), "cpu")


def test_the_artifacts_option_finds_moved_checkpoints(lstm_study, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(lstm_study.artifacts, moved)
    predictor = load_best(lstm_study.load(), artifacts=moved, device="cpu")
    assert Path(predictor.info["run_dir"]).is_relative_to(moved)
    np.testing.assert_allclose(predictor.predict(TEXTS), direct(lstm_study), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_predictions_on_the_gpu_match_the_cpu(study):
    cpu = load_best(study.load(), device="cpu").predict(TEXTS)
    gpu = load_best(study.load(), device="cuda").predict(TEXTS)
    np.testing.assert_allclose(gpu, cpu, atol=0.05)  # bf16 autocast on the GPU


def test_read_texts_keeps_csv_quoting_and_empty_texts(tmp_path):
    from vadsearch.predict import read_texts

    table = tmp_path / "in.csv"
    table.write_text('text,id\n"two\nlines, one text",1\n,2\nplain,3\n', encoding="utf-8")
    assert read_texts(table) == ["two\nlines, one text", "", "plain"]
    lines = tmp_path / "in.txt"
    lines.write_text("\ufefffirst\n\n  \nsecond\n", encoding="utf-8")
    assert read_texts(lines) == ["first", "second"]
    from vadsearch.errors import DataError

    with pytest.raises(DataError, match=r" is a directory: --file takes a text file \(one sentence per line\)"):
        read_texts(tmp_path)


def one_error(result, code: int) -> str:
    """The single `error: ...` line of a failed command (and no traceback)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and not result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_directory_is_a_model_directory_and_its_error_names_what_is_missing(lstm_study, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    for argument in (tmp_path / "emptydir", "./emptydir", "emptydir"):  # 'emptydir': no such study either
        line = one_error(invoke("predict", argument, "hi", "--storage", lstm_study.storage), 2)
        assert "is not an export-model directory" in line and "config.json" in line

    # A partial copy of an export: the missing weights are named, not a torch traceback.
    from vadsearch.predict import export

    export(load_best(lstm_study.load(), device="cpu"), tmp_path / "model")
    (tmp_path / "model" / "model.pt").unlink()
    line = one_error(invoke("predict", tmp_path / "model", "hi"), 2)
    assert "incomplete export-model directory: missing model.pt" in line


def test_a_study_named_like_a_directory_here_is_still_the_study(lstm_study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / lstm_study.name).mkdir()  # as inside the artifacts directory: a folder per study
    result = invoke("predict", lstm_study.name, "Love", "--storage", lstm_study.storage, "-f", "json")
    assert result.exit_code == 0, result.output
    assert [r["text"] for r in json.loads(result.stdout)] == ["Love"]


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_batch_size_below_one_is_refused(lstm_study, size):
    line = one_error(invoke("predict", lstm_study.name, "hi", "--storage", lstm_study.storage, "--batch-size", size), 2)
    assert line == f"error: batch size must be at least 1, got {size}"


def test_a_malformed_csv_is_one_error_naming_the_file_and_line(lstm_study, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('text\n"unterminated\nmore lines\n', encoding="utf-8")
    line = one_error(invoke("predict", lstm_study.name, "--file", bad, "--storage", lstm_study.storage), 2)
    assert line == f"error: {bad}, line 2: malformed CSV (unexpected end of data)"


def test_read_texts_is_strict_and_counts_lines_of_multiline_records(tmp_path):
    from vadsearch.errors import DataError
    from vadsearch.predict import read_texts

    table = tmp_path / "in.csv"
    table.write_text('id,text\n\n1,"two\nlines"\n2\n', encoding="utf-8")  # a blank line, a short row
    assert read_texts(table) == ["two\nlines", ""]
    table.write_text('text\n"two\nlines"\n"quoted"junk\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"in\.csv, line 4: malformed CSV \(',' expected after '\"'\)"):
        read_texts(table)
    table.write_text("id, text\n1,spaced header\n", encoding="utf-8")  # as the training data's header is read
    assert read_texts(table) == ["spaced header"]
    table.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="needs a `text` column; its columns are none"):
        read_texts(table)


def test_the_model_card_states_the_sentences_used(lstm_study):
    from vadsearch.data import EMOBANK_SHA256
    from vadsearch.predict import model_card

    predictor = load_best(lstm_study.load(), device="cpu")
    # A subset larger than the file is used whole: the card says what was used, not what was asked for.
    predictor.info.update(data_subset=[800, 100, 100], n_train=60, file_sha256=EMOBANK_SHA256)
    card = model_card(predictor)
    assert "subset of its train split (60 sentences), selected on 20 dev sentences and scored once on 20 test" in card
    assert "CC-BY-SA 4.0: 10k English sentences" in card and "not the published file" not in card


def test_sentences_that_are_not_utf8_are_one_line(lstm_study, tmp_path):
    # As arguments Python hands them over as lone surrogates, and stdin decoded them the same way: both
    # failed deep in a tokenizer, with a traceback.
    shown = subprocess.run([sys.executable, "-m", "vadsearch.cli", "predict", lstm_study.name, "caf\udce9",
                            "--storage", lstm_study.storage, "--device", "cpu"],
                           capture_output=True, text=True, errors="surrogateescape", cwd=tmp_path)
    assert shown.returncode == 2 and shown.stderr.strip() == "error: sentence 1 (caf\\xe9) is not UTF-8 text"
    piped = subprocess.run([sys.executable, "-m", "vadsearch.cli", "predict", lstm_study.name, "--file", "-",
                            "--storage", lstm_study.storage, "--device", "cpu"],
                           input=b"caf\xe9\n", capture_output=True, cwd=tmp_path)
    assert piped.returncode == 2 and b"error: standard input: cannot read as UTF-8 text" in piped.stderr


def test_a_text_file_splits_at_line_breaks_only(tmp_path):
    """A form feed, NEL or Unicode line separator inside a sentence does not make two rows (str.splitlines
    would): a file gives as many rows as its non-empty lines, as the same text on stdin does."""
    import io

    from vadsearch.predict import read_texts

    lines = tmp_path / "in.txt"
    lines.write_text("one\x0cpage\r\ntwo\u2028parts\nthree\x85x\n", encoding="utf-8")
    expected = ["one\x0cpage", "two\u2028parts", "three\x85x"]
    assert read_texts(lines) == expected
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.stdin", io.StringIO(lines.read_text(encoding="utf-8")))
        assert read_texts("-") == expected


@pytest.mark.parametrize("name, damage", [("model.pt", b"\x80\x02truncated"), ("vocab.json", b'["<pad>", ')])
def test_a_damaged_export_is_one_line_naming_the_directory(lstm_study, tmp_path, name, damage):
    from vadsearch.predict import export

    directory = export(load_best(lstm_study.load(), device="cpu"), tmp_path / "model")
    (directory / name).write_bytes(damage)  # an interrupted copy
    line = one_error(invoke("predict", directory, "hi"), 2)
    assert str(directory) in line and "export it again" in line
