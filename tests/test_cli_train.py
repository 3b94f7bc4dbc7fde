"""`vadsearch train` in-process: output, resuming, JSON, and one-line errors."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from helpers import write_csv
from vadsearch.cli import app

TINY_LSTM_OPTIONS = ["--model", "lstm", "--hidden-size", "8", "--embedding-dim", "8", "--batch-size", "8",
                     "--lr", "0.02", "--seed", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """The command reconfigures the root logger onto the runner's stream; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


def _one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------------------------- help


def test_help_lists_train(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "train" in result.output and "Train one configuration" in result.output


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "train" in result.output


def _commands() -> dict:
    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_has_help(runner: CliRunner, name: str) -> None:
    command = _commands()[name]
    assert command.help and command.help.strip(), f"`vadsearch {name}` has no docstring"
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0
    first_words = " ".join(command.help.split()[:4])
    assert first_words in " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_commands_examples_stand_out_from_its_prose(runner: CliRunner, name: str) -> None:
    # Where "Examples:" came right after the summary, the help renderer took the examples' indent for the
    # margin and printed them flush with the prose.
    shown = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
    examples = [line for line in shown.splitlines() if line.lstrip().startswith(f"vadsearch {name} ")
                or line.lstrip().startswith("VADSEARCH_STORAGE=")]
    assert examples, f"`vadsearch {name} --help` shows no example"
    assert all(line.startswith("   ") for line in examples), examples


@pytest.mark.parametrize("name", sorted(_commands()))
def test_no_option_help_loses_a_bracketed_word_to_markup(runner: CliRunner, name: str) -> None:
    # The help is rendered as rich markup, where an unescaped "[train]" is a style tag and vanishes.
    rendered = " ".join(runner.invoke(app, [name, "--help"]).output.replace("│", " ").split())
    for param in _commands()[name].params:
        for word in re.findall(r"\[[^\]]+\]", getattr(param, "help", None) or ""):
            assert word in rendered, f"--help of `vadsearch {name}` lost {word} from --{param.name}"


def test_train_help_shows_an_example(runner: CliRunner) -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "vadsearch train --model" in result.output


def test_train_help_gives_each_training_option_a_description_and_its_default() -> None:
    # The options default to None (to tell given ones apart), so the help showed no default at all, and
    # seven options had no words either.
    import typer.main

    from vadsearch.config import TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    trained = [name for name in TrainConfig.__dataclass_fields__ if name in params and name not in ("model", "vectors")]
    assert len(trained) == 24
    for name in trained:
        assert params[name].help and params[name].help.endswith("."), name
        assert " Default: " in params[name].help, name
    assert params["max_epochs"].help.endswith(f"Default: {TrainConfig.max_epochs}.")
    assert params["bidirectional"].help.endswith("Default: --unidirectional.")  # the flag in force, not "False"
    assert params["lowercase"].help.endswith("Default: --lowercase.")


def test_version_is_printed(runner: CliRunner) -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"vadsearch {version('vadsearch')}\n"


def test_a_library_that_prints_its_own_lines_is_not_printed_twice(capsys) -> None:
    # huggingface_hub's retries of a download (a mistyped --model-name, offline) came out twice each.
    from vadsearch.cli import _setup_logging

    library = logging.getLogger("huggingface_hub")
    # Its own handler, as huggingface_hub sets one when imported (here: on this test's stderr, not on the
    # stream of whichever test imported it first).
    before, library.handlers = library.handlers, [logging.StreamHandler()]
    try:
        _setup_logging(False)
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        assert capsys.readouterr().err.count("Retrying in 1s") == 1
    finally:
        library.handlers = before


def test_cli_module_does_not_import_heavy_libraries() -> None:
    code = "import sys, vadsearch.cli; print(sorted(m for m in ('torch', 'transformers', 'spacy', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "vadsearch.cli", "--help"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0 and "train" in out.stdout


# ------------------------------------------------------------------------------------------ baseline


def test_baseline_prints_dev_and_test(runner: CliRunner, tiny_csv: Path) -> None:
    result = runner.invoke(app, ["train", "--model", "baseline", "--data", str(tiny_csv), "--quiet"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["dev", "test"]
    # A constant has no correlation: one word for it, not a row of nan.
    assert all(" MSE " in line and line.endswith("r undefined: the predictions do not vary") for line in lines)
    assert "epoch" not in result.stdout


def test_baseline_on_real_data(runner: CliRunner, real_data_path: Path) -> None:
    result = runner.invoke(app, ["train", "--model", "baseline", "--data", str(real_data_path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dev   MSE 0.0751") and "\ntest  MSE 0.0765" in result.stdout


def test_mean_baseline_json(runner: CliRunner, tiny_csv: Path) -> None:
    result = runner.invoke(app, ["train", "--model", "baseline", "--baseline", "mean", "--data", str(tiny_csv), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["best_epoch"] == 0 and out["history"] == []
    assert out["config"] == {"model": "baseline", "seed": 0, "baseline": "mean"}


# --------------------------------------------------------------------------------------------- LSTM


def test_lstm_prints_epochs_and_resumes(runner: CliRunner, tiny_csv: Path, tmp_path: Path) -> None:
    args = ["train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv), "--checkpoint-dir", str(tmp_path / "run")]
    first = runner.invoke(app, [*args, "--max-epochs", "2"])
    assert first.exit_code == 0, first.output
    epoch_lines = [line for line in first.stdout.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in epoch_lines] == ["1", "2"]
    assert all("loss" in line and "dev" in line for line in epoch_lines)
    assert "(from checkpoint)" not in first.stdout
    assert "best epoch" in first.stdout and "\ndev " in first.stdout and "\ntest " in first.stdout
    assert re.search(r"\ndev +MSE [0-9.]+ +\(V [0-9.]+ +A [0-9.]+ +D [0-9.]+\) +r +V +[-+]\d\.\d{3} ", first.stdout)

    second = runner.invoke(app, [*args, "--max-epochs", "3"])
    assert second.exit_code == 0, second.output
    lines = [line for line in second.stdout.splitlines() if line.startswith("epoch")]
    assert [line.split()[1] for line in lines] == ["1", "2", "3"]
    assert [line.endswith("(from checkpoint)") for line in lines] == [True, True, False]
    # The restored epochs print the same numbers as when they were trained.
    for before, after in zip(epoch_lines, lines):
        assert before.split()[:6] == after.split()[:6]


def test_options_that_change_nothing_are_named(runner: CliRunner, tiny_csv: Path) -> None:
    # Accepted without a word, they read as if they had been tried.
    result = runner.invoke(app, ["train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv), "--max-epochs", "1",
                                 "--warmup-ratio", "0.3", "--trainable-layers", "last-2"])
    assert result.exit_code == 0, result.output
    assert ("--warmup-ratio, --trainable-layers change nothing in this run (model lstm, embedding internal, "
            "schedule constant): ignored") in result.stderr
    result = runner.invoke(app, ["train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv), "--max-epochs", "1",
                                 "--schedule", "linear", "--warmup-ratio", "0.3"])
    assert result.exit_code == 0 and "ignored" not in result.stderr, result.stderr


def test_an_unusable_checkpoint_dir_is_refused_before_training(runner: CliRunner, tiny_csv: Path,
                                                               tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = runner.invoke(app, ["train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv), "--max-epochs", "1",
                                 "--checkpoint-dir", str(tmp_path / "a-file")])
    assert result.exit_code == 4 and "epoch" not in result.stdout, result.output
    assert result.stderr == f"error: --checkpoint-dir {tmp_path / 'a-file'} is a file, not a directory; pass a " \
                            "writable directory\n"
    # A baseline keeps no checkpoints: the option is named as ignored and no directory appears.
    result = runner.invoke(app, ["train", "--model", "baseline", "--data", str(tiny_csv),
                                 "--checkpoint-dir", str(tmp_path / "run")])
    assert result.exit_code == 0 and "--checkpoint-dir: a baseline" in result.stderr, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("keep", [True, False])
def test_ctrl_c_says_whether_the_run_can_resume(tiny_csv: Path, tmp_path: Path, keep: bool) -> None:
    import signal

    where = ["--checkpoint-dir", str(tmp_path / "run")] if keep else []
    process = subprocess.Popen(
        [sys.executable, "-m", "vadsearch.cli", "train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv),
         "--max-epochs", "5000", *where], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("epoch  1")  # training is under way
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("interrupted: run the same command again to resume from the last epoch"
                                               if keep else "interrupted: nothing kept (--checkpoint-dir DIR keeps "
                                                            "each epoch)")


def test_lstm_json(runner: CliRunner, tiny_csv: Path) -> None:
    result = runner.invoke(app, ["train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv), "--max-epochs", "2",
                                 "--bidirectional", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["best_epoch"] in (1, 2) and len(out["history"]) == 2
    assert out["config"]["bidirectional"] is True and out["config"]["hidden_size"] == 8
    assert out["dev"]["mse"] == out["history"][out["best_epoch"] - 1]["dev"]["mse"]
    assert out["test"]["n"] == 20


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "lr must be"),
        (["--lr", "1e38"], "lr must be a positive number up to 10, got 1e+38"),  # overflowed inside Adam
        (["--model", "nope"], "model must be one of"),
        (["--max-epochs", "0"], "max_epochs must be an integer in [1, 2**31), got 0"),
        (["--trainable-layers", "top-3", "--model", "bert"], "trainable_layers"),
        (["--embedding", "external"], "vectors"),
        (["--model", "baseline", "--device", "gpu0"], "unknown device"),
    ],
)
def test_bad_option_is_one_error_line(runner: CliRunner, tiny_csv: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["train", "--data", str(tiny_csv), *args])
    assert message in _one_error_line(result)
    assert result.exit_code == 2


def test_missing_data_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--model", "baseline", "--data", str(tmp_path / "missing.csv")])
    line = _one_error_line(result)
    assert "missing.csv" in line and "does not exist" in line


def test_malformed_csv(runner: CliRunner, tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "bad.csv", [["a1", "train", "3", "3", "3", "ok"], ["a2", "dev", "x", "3", "3", "no"]])
    result = runner.invoke(app, ["train", "--model", "baseline", "--data", str(bad)])
    line = _one_error_line(result)
    assert "bad.csv, line 3" in line


def test_divergence_is_one_error_line(runner: CliRunner, tiny_csv: Path, monkeypatch) -> None:
    import vadsearch.train

    # Adam moves each weight by about lr per step, so no allowed lr overflows a tiny LSTM: a loss that did.
    monkeypatch.setattr(vadsearch.train, "_train_epoch", lambda *args, **kwargs: float("nan"))
    result = runner.invoke(app, ["train", *TINY_LSTM_OPTIONS, "--data", str(tiny_csv), "--max-epochs", "1"])
    assert "diverged" in _one_error_line(result)
    assert result.exit_code == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_error_line(runner: CliRunner, tiny_csv: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tiny_csv), "--device", "cuda", "--max-epochs", "1"])
    assert "--device cpu" in _one_error_line(result)


def test_unparsable_number_is_a_usage_error(runner: CliRunner, tiny_csv: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tiny_csv), "--max-epochs", "many"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and "Invalid value for '--max-epochs'" in result.output
