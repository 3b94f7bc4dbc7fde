"""Reports read what workers store: studies built here by hand with Optuna, no training."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from vadsearch import report
from vadsearch.errors import ConfigError, StorageError
from vadsearch.storage import open_storage

DISTRIBUTIONS = {
    "lr": CategoricalDistribution([1e-4, 1e-3, 1e-2]),
    "dropout": FloatDistribution(0.0, 0.5),
}


def scores(mse: float, r: float, n: int = 1000) -> dict[str, Any]:
    """A `Scores.as_dict` with per-dimension MSEs spread around `mse` (their mean is `mse`)."""
    return {"mse": mse, "mse_v": mse - 0.01, "mse_a": mse, "mse_d": mse + 0.01,
            "r_v": r, "r_a": r - 0.1, "r_d": r - 0.2, "n": n}


def make_study(storage: optuna.storages.BaseStorage, name: str, model: str, max_trials: int) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.set_user_attr("vadsearch", {"name": name, "sampler": "grid", "description": f"{model} grid",
                                      "max_trials": max_trials, "base": {"model": model, "max_epochs": 9}})
    return study


def add_complete(study: optuna.Study, params: dict[str, Any], dev_mse: float, test_mse: float,
                 best_epoch: int, **extra: Any) -> None:
    distributions = {k: DISTRIBUTIONS[k] for k in params}
    point = json.dumps(params, sort_keys=True)
    study.add_trial(optuna.create_trial(
        state=TrialState.COMPLETE,
        value=dev_mse,
        params=params,
        distributions=distributions,
        intermediate_values={epoch: dev_mse + 0.1 * (best_epoch - epoch) ** 2 for epoch in range(1, 4)},
        user_attrs={
            "point": point, "worker": "host:1", "config": {"lr": params.get("lr"), "model": "lstm"},
            "checkpoint_dir": f"/ckpt/{point}", "epochs_done": 3, "best_epoch": best_epoch,
            "dev": scores(dev_mse, 0.5), "test": scores(test_mse, 0.4), "trainable_params": 10,
            "total_params": 10, "seconds": 12.5, "resumed_from": 0, **extra,
        },
    ))


@pytest.fixture()
def storage(tmp_path: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db")


@pytest.fixture()
def lstm(storage: optuna.storages.RDBStorage) -> optuna.Study:
    """Trials 0-2 complete (1 best), 3 failed, 4 an orphan that would win if counted, 5 running."""
    study = make_study(storage, "lstm", "lstm", max_trials=6)
    add_complete(study, {"lr": 1e-3, "dropout": 0.1}, dev_mse=0.30, test_mse=0.33, best_epoch=2)
    add_complete(study, {"lr": 1e-4, "dropout": 0.2}, dev_mse=0.10, test_mse=0.12, best_epoch=3)
    add_complete(study, {"lr": 1e-2, "dropout": 0.3}, dev_mse=0.20, test_mse=0.05, best_epoch=1)
    study.add_trial(optuna.create_trial(
        state=TrialState.FAIL, params={"lr": 1e-2, "dropout": 0.0}, distributions=DISTRIBUTIONS,
        user_attrs={"point": "p", "worker": "host:2", "epochs_done": 1, "fail_reason": "loss diverged to NaN"},
    ))
    add_complete(study, {"lr": 1e-3, "dropout": 0.4}, dev_mse=0.01, test_mse=0.01, best_epoch=1,
                 orphan=True)
    running = study.ask({"lr": DISTRIBUTIONS["lr"]})
    running.set_user_attr("worker", "host:3")
    running.set_user_attr("epochs_done", 2)
    storage.record_heartbeat(running._trial_id)
    return study


@pytest.fixture()
def baseline(storage: optuna.storages.RDBStorage) -> optuna.Study:
    study = make_study(storage, "baseline", "baseline", max_trials=1)
    add_complete(study, {}, dev_mse=0.80, test_mse=0.82, best_epoch=0)
    return study


def test_trials_frame_has_every_trial_but_orphans(lstm: optuna.Study) -> None:
    frame = report.trials_frame(lstm)
    assert list(frame["number"]) == [0, 1, 2, 3, 5]
    assert list(frame["state"]) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL", "RUNNING"]
    assert {"param.lr", "param.dropout", "point", "worker", "seconds", "dev_r_v"} <= set(frame.columns)
    assert frame.loc[frame["state"] == "FAIL", "failure"].item() == "loss diverged to NaN"
    assert frame["dev_mse"].iloc[:3].tolist() == pytest.approx([0.30, 0.10, 0.20])
    assert pd.isna(frame["best_epoch"].iloc[-1])  # missing on a running trial, not an error
    assert not any(c.startswith("test") for c in frame.columns)  # model selection sees dev only


def test_an_unfinished_trials_epochs_come_from_the_dev_scores_it_reported(storage) -> None:
    study = make_study(storage, "u", "lstm", max_trials=3)
    study.add_trial(optuna.create_trial(state=TrialState.PRUNED, value=0.3, intermediate_values={1: 0.2, 2: 0.3},
                                        user_attrs={"point": "{}", "worker": "host:1"}))
    running = study.ask()
    for epoch, mse in ((1, 0.5), (2, 0.4), (3, 0.45)):
        running.report(mse, epoch)
    study.ask()  # started, no epoch yet
    frame = report.trials_frame(study)
    assert frame["epochs_done"].tolist()[:2] == [2, 3] and pd.isna(frame["epochs_done"].iloc[2])
    assert frame["best_epoch"].tolist()[:2] == [1, 2]
    assert frame["dev_mse"].tolist()[:2] == pytest.approx([0.2, 0.4])  # its best so far, not its last
    assert frame["failure"].iloc[0] == "pruned after epoch 2" and pd.isna(frame["failure"].iloc[1])


def test_each_failure_says_why_and_a_queued_trial_shows_its_point(storage: optuna.storages.RDBStorage) -> None:
    study = make_study(storage, "f", "lstm", max_trials=4)
    causes = [{"fail_reason": "RuntimeError: CUDA out of memory"}, {"interrupted": True},
              {"fail_reason": "CheckpointError: disk full", "machine_fault": True}, {}]  # {}: heartbeat stale
    for attrs in causes:
        study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"lr": 1e-3},
                                            distributions={"lr": DISTRIBUTIONS["lr"]},
                                            user_attrs={"point": "p", "worker": "gpu7:42", **attrs}))
    study.enqueue_trial({"lr": 1e-2}, user_attrs={"point": json.dumps({"lr": 1e-2})})
    frame = report.trials_frame(study)
    assert list(frame["failure"].iloc[:4]) == [
        "RuntimeError: CUDA out of memory",
        "interrupted (Ctrl-C or SIGTERM): the next worker resumes it without spending a retry",
        "CheckpointError: disk full",
        "worker gpu7:42 stopped sending heartbeats (killed, or its machine was lost)",
    ]
    assert frame["state"].iloc[4] == "WAITING" and frame["param.lr"].iloc[4] == 1e-2  # from its point
    assert pd.isna(frame["failure"].iloc[4])
    [row] = report.status(storage)
    assert [(t["number"], t["failure"]) for t in row["failed_trials"]] == list(enumerate(frame["failure"].iloc[:4]))
    # Each failure's configuration was tried again by the next trial of the same point, the last not yet.
    assert [(t["retried_as"], t["retry_state"]) for t in row["failed_trials"]] == [
        (1, "FAIL"), (2, "FAIL"), (3, "FAIL"), (None, None)]


def test_leaderboard_ranks_complete_trials_by_dev(lstm: optuna.Study) -> None:
    board = report.leaderboard(lstm)
    assert list(board["rank"]) == [1, 2, 3]
    assert list(board["trial"]) == [1, 2, 0]  # the orphan (dev 0.01) and unfinished trials are left out
    assert board["dev_mse"].tolist() == pytest.approx([0.10, 0.20, 0.30])
    first = board.iloc[0]
    assert (first["param.lr"], first["param.dropout"], first["best_epoch"]) == (1e-4, 0.2, 3)
    assert [first["dev_mse_v"], first["dev_mse_a"], first["dev_mse_d"]] == pytest.approx([0.09, 0.10, 0.11])
    assert [first["dev_r_v"], first["dev_r_a"], first["dev_r_d"]] == pytest.approx([0.5, 0.4, 0.3])
    assert list(report.leaderboard(lstm, top=2)["trial"]) == [1, 2]
    with pytest.raises(ConfigError, match="top"):
        report.leaderboard(lstm, top=0)


def test_best_picks_lowest_dev_and_reports_its_test_only(lstm: optuna.Study) -> None:
    record = report.best(lstm)
    json.dumps(record, allow_nan=False)
    assert record["study"] == "lstm" and record["trial"] == 1  # trial 2 has the better test: not chosen
    assert record["params"] == {"lr": 1e-4, "dropout": 0.2}
    assert record["best_epoch"] == 3
    assert record["dev"]["mse"] == pytest.approx(0.10)
    assert record["test"]["mse"] == pytest.approx(0.12)
    assert record["checkpoint_dir"].startswith("/ckpt/")
    assert record["config"]["model"] == "lstm"


def test_the_best_baseline_names_no_checkpoint_directory(storage: optuna.storages.RDBStorage,
                                                          lstm: optuna.Study) -> None:
    # A baseline keeps no weights: a directory named in `best` was never made, and looked lost.
    study = make_study(storage, "constant", "baseline", max_trials=1)
    add_complete(study, {}, dev_mse=0.8, test_mse=0.8, best_epoch=0, config={"model": "baseline", "seed": 0})
    assert report.best(study)["checkpoint_dir"] is None
    winner = report.best(lstm)
    assert winner["checkpoint_dir"] == lstm.trials[winner["trial"]].user_attrs["checkpoint_dir"]


def test_best_of_study_without_finished_trial(storage: optuna.storages.RDBStorage) -> None:
    study = make_study(storage, "empty", "bert", max_trials=6)
    study.ask()
    with pytest.raises(StorageError, match="no finished trial in study 'empty' yet"):
        report.best(study)
    assert report.leaderboard(study).empty


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_a_study_without_a_finished_trial_is_one_line_in_every_format(tmp_path: Path, fmt: str) -> None:
    from typer.testing import CliRunner

    from vadsearch.cli import app

    url = f"sqlite:///{tmp_path}/r.db"
    storage = open_storage(url)
    waiting = make_study(storage, "waiting", "lstm", max_trials=2)
    waiting.ask()
    failed = make_study(storage, "failed", "lstm", max_trials=2)
    for reason in ("TrainingError: training diverged at epoch 1", "ConfigError: trainable_layers 'last-99' does "
                   "not fit a model of 6 layers"):
        trial = failed.ask()
        trial.set_user_attr("fail_reason", reason)
        failed.tell(trial, state=TrialState.FAIL)
    pruned = make_study(storage, "pruned", "lstm", max_trials=2)
    for _ in range(2):  # a finished study, every trial pruned: not "none yet", no worker will finish one
        pruned.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED, intermediate_values={1: 0.2}))
    for name, code, line in (
        ("waiting", 3, "error: no finished trial in study 'waiting' yet (1 running): `vadsearch status` shows how far "
                       "each is, `vadsearch report waiting --trials` lists them"),
        ("failed", 5, "error: every trial of study 'failed' failed (2); the latest: ConfigError: trainable_layers "
                      "'last-99' does not fit a model of 6 layers (`vadsearch report failed --trials` lists them all)"),
        ("pruned", 3, "error: no trial of study 'pruned' ran to its end: 2 pruned; a pruned trial has no best weights "
                      "or test score. A new study with a gentler pruner (or none) trains its configurations through "
                      "(`vadsearch report pruned --trials` shows where each stopped)"),
    ):
        for command in (["report", name, "--format", fmt], ["best", name, "--format", fmt]):
            result = CliRunner().invoke(app, [*command, "--storage", url])
            assert (result.exit_code, result.stdout, result.stderr.strip()) == (code, "", line), command
    plotted = CliRunner().invoke(app, ["plot", "failed", "--kind", "history", "--storage", url,
                                       "--out", str(tmp_path / "plots")])
    assert plotted.exit_code == 5 and "every trial of study 'failed' failed" in plotted.stderr


def test_compare_has_one_row_per_study_in_order(baseline: optuna.Study, lstm: optuna.Study) -> None:
    table = report.compare([baseline, lstm])
    assert list(table["study"]) == ["baseline", "lstm"]
    assert list(table["model"]) == ["baseline", "lstm"]
    assert list(table["complete"]) == [1, 3]
    assert list(table["trials"]) == [1, 5]
    assert list(table["best_trial"]) == [0, 1]
    assert table["dev_mse"].tolist() == pytest.approx([0.80, 0.10])
    assert table["test_mse"].tolist() == pytest.approx([0.82, 0.12])
    assert table["test_r_d"].tolist() == pytest.approx([0.2, 0.2])


def test_status_counts_states_without_orphans(
    storage: optuna.storages.RDBStorage, baseline: optuna.Study, lstm: optuna.Study
) -> None:
    lstm.enqueue_trial({"lr": 1e-2, "dropout": 0.25})
    rows = {row["name"]: row for row in report.status(storage)}
    assert list(rows) == ["baseline", "lstm"]
    row = rows["lstm"]
    assert (row["trials"], row["complete"], row["running"], row["waiting"], row["fail"], row["pruned"]) == (
        6, 3, 1, 1, 1, 0)
    assert (row["model"], row["sampler"], row["max_trials"]) == ("lstm", "grid", 6)
    [running] = row["running_trials"]
    assert (running["number"], running["worker"], running["epochs_done"]) == (5, "host:3", 2)
    assert running["max_epochs"] == 9  # the study file's [train] value
    assert 0 <= running["heartbeat_age_s"] < 60 and 0 <= running["running_s"] < 60
    assert rows["baseline"]["complete"] == 1 and rows["baseline"]["running_trials"] == []
    json.dumps(list(rows.values()), allow_nan=False)


def test_a_running_trials_epoch_count_comes_from_its_search_then_its_config(
    storage: optuna.storages.RDBStorage
) -> None:
    study = make_study(storage, "e", "lstm", max_trials=3)
    searched = study.ask({"max_epochs": CategoricalDistribution([2, 4])})
    configured = study.ask()
    configured.set_user_attr("config", {"model": "lstm", "max_epochs": 3})
    [row] = report.status(storage)
    by_number = {t["number"]: t["max_epochs"] for t in row["running_trials"]}
    assert by_number == {searched.number: searched.params["max_epochs"], configured.number: 3}


def test_running_trial_without_heartbeat_has_no_age(storage: optuna.storages.RDBStorage) -> None:
    make_study(storage, "quiet", "lstm", max_trials=2).ask()
    [row] = report.status(storage)
    assert row["running_trials"][0]["heartbeat_age_s"] is None


def test_unknown_study_names_the_ones_there(storage: optuna.storages.RDBStorage, lstm: optuna.Study,
                                             baseline: optuna.Study) -> None:
    assert report.list_studies(storage) == ["baseline", "lstm"]
    assert report.load(storage, "lstm").study_name == "lstm"
    with pytest.raises(StorageError) as caught:
        report.load(storage, "bert", where="sqlite:///s.db")
    message = str(caught.value)
    assert message == "no study named 'bert' in sqlite:///s.db; studies: baseline, lstm"
    assert "\n" not in message


def test_every_format_parses_back(lstm: optuna.Study) -> None:
    board = report.leaderboard(lstm)
    records = json.loads(report.render(board, "json"))
    assert [r["trial"] for r in records] == [1, 2, 0]
    assert records[0]["dev_mse"] == pytest.approx(0.10)

    frame = report.trials_frame(lstm)  # NaN and missing values in it
    as_json = json.loads(report.render(frame, "json"))
    assert as_json[-1]["best_epoch"] is None and as_json[-1]["dev_mse"] is None

    back = pd.read_csv(io.StringIO(report.render(board, "csv")))
    assert list(back.columns) == list(board.columns)
    assert back["dev_mse"].tolist() == pytest.approx(board["dev_mse"].tolist())

    markdown = report.render(board, "markdown").splitlines()
    assert markdown[0].startswith("| rank") and "dev_mse" in markdown[0]
    assert set(markdown[1]) <= set("|-: ")
    assert len(markdown) == 2 + len(board)
    assert "0.1000" in markdown[2] and "0.0001" in markdown[2]  # scores: 4 decimals; lr: as set

    table = report.render(board, "table").splitlines()
    assert table[0].split()[:2] == ["rank", "trial"] and len(table) == 2 + len(board)


def test_render_best_record_and_status(lstm: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    record = report.best(lstm)
    assert json.loads(report.render(record, "json")) == record
    [row] = pd.read_csv(io.StringIO(report.render(record, "csv"))).to_dict(orient="records")
    assert row["trial"] == 1 and row["test.mse"] == pytest.approx(0.12)
    markdown = report.render(record, "markdown")
    assert markdown.startswith("| field") and "| dev.mse" in markdown and "| 0.0001 " in markdown
    assert "test.r_v" in report.render(record, "table")

    rows = report.status(storage)
    assert json.loads(report.render(rows, "json"))[0]["name"] == "lstm"
    assert pd.read_csv(io.StringIO(report.render(rows, "csv")))["complete"].tolist() == [3]
    assert "lstm" in report.render(rows, "table")


def test_unknown_format_is_a_config_error(lstm: optuna.Study) -> None:
    with pytest.raises(ConfigError, match="table, markdown, csv, json"):
        report.render(report.leaderboard(lstm), "xlsx")


def test_empty_frames_render(storage: optuna.storages.RDBStorage) -> None:
    study = make_study(storage, "new", "bert", max_trials=6)
    for fmt in report.FORMATS:
        assert report.render(report.leaderboard(study), fmt)
    assert json.loads(report.render(report.trials_frame(study), "json")) == []
    [row] = report.compare([study]).to_dict(orient="records")
    assert (row["complete"], row["trials"]) == (0, 0)
    assert pd.isna(row["best_trial"]) and math.isnan(row["dev_mse"]) and math.isnan(row["test_mse"])


def test_a_searched_model_is_named_by_the_winner_in_compare_and_by_its_choices_in_status(
    storage: optuna.storages.RDBStorage
) -> None:
    """A study may search `model`: its [train] default is then no description of the study or its best."""
    study = make_study(storage, "models", "lstm", max_trials=2)  # "lstm": the TrainConfig default
    spec = study.user_attrs["vadsearch"]
    study.set_user_attr("vadsearch", {**spec, "space": [{"name": "model", "kind": "categorical",
                                                         "choices": ["baseline", "bert"]}]})
    for model, dev in (("baseline", 0.8), ("bert", 0.1)):
        study.add_trial(optuna.create_trial(
            state=TrialState.COMPLETE, value=dev, params={"model": model},
            distributions={"model": CategoricalDistribution(["baseline", "bert"])},
            user_attrs={"config": {"model": model}, "dev": scores(dev, 0.5), "test": scores(dev, 0.4)}))
    [row] = report.compare([study]).to_dict(orient="records")
    assert (row["model"], row["best_trial"]) == ("bert", 1)
    [status] = report.status(storage)
    assert status["model"] == "baseline/bert"


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_a_text_with_a_line_break_stays_on_its_row(fmt: str) -> None:
    """`predict` renders texts (a CSV's quoted field may hold line breaks): one record, one line."""
    frame = pd.DataFrame({"text": ["two\nlines", "one|line"], "V": [3.0, 2.5]})
    lines = report.render(frame, fmt).splitlines()
    assert len(lines) == 2 + len(frame)
    assert ("two<br>lines" if fmt == "markdown" else "two\\nlines") in lines[2]


def test_compare_says_when_studies_were_scored_on_different_sentences(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A quick-* subset beside a full run, or another data file: rows side by side that are not comparable."""
    from search_helpers import vadsearch

    url = f"sqlite:///{tmp_path}/c.db"
    storage = open_storage(url)
    for name, extra, n in (("full", {"data_sha256": "a" * 64}, 1000), ("same", {"data_sha256": "a" * 64}, 1000),
                           ("quick", {"data_sha256": "b" * 64, "data_subset": [800, 100, 100], "seed": 0}, 100)):
        study = make_study(storage, name, "lstm", max_trials=1)
        study.set_user_attr("vadsearch", {**study.user_attrs["vadsearch"], **extra})
        add_complete(study, {"lr": 1e-3}, dev_mse=0.1, test_mse=0.1, best_epoch=1,
                     dev=scores(0.1, 0.5, n=n), test=scores(0.1, 0.4, n=n))
    full, same, quick = (report.load(storage, n) for n in ("full", "same", "quick"))
    with caplog.at_level("WARNING", logger="vadsearch.report"):
        caplog.clear()
        report.compare([full, same])
        assert not caplog.records
        table = report.compare([full, quick])
    assert list(table["study"]) == ["full", "quick"]  # the table itself is unchanged
    [record] = [r for r in caplog.records if r.name == "vadsearch.report"]
    assert "not comparable" in record.message and "quick: 100 dev and 100 test sentences of a subset" in record.message
    assert "full: 1000 dev and 1000 test sentences of data aaaaaaaaaaaa" in record.message
    # The real command: the warning on stderr, stdout still a plain csv.
    result = vadsearch("compare", "full", "quick", "--storage", url, "--format", "csv", cwd=tmp_path)
    assert result.returncode == 0 and "not comparable" in result.stderr, result.stderr
    assert pd.read_csv(io.StringIO(result.stdout))["study"].tolist() == ["full", "quick"]


def test_compare_tells_subsets_of_two_files_apart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Subsets drawn with one seed are one set of sentences only if they were drawn from one file; a subset
    stored before the file's checksum was kept beside it is compared by its seed."""
    storage = open_storage(f"sqlite:///{tmp_path}/c.db")
    subset = {"data_subset": [800, 100, 100], "seed": 0}
    for name, extra in (("small", {"data_sha256": "1" * 64, "file_sha256": "a" * 64}),
                        ("large", {"data_sha256": "2" * 64, "file_sha256": "a" * 64}),  # more training rows
                        ("other", {"data_sha256": "3" * 64, "file_sha256": "c" * 64}),
                        ("older", {"data_sha256": "4" * 64})):
        study = make_study(storage, name, "lstm", max_trials=1)
        study.set_user_attr("vadsearch", {**study.user_attrs["vadsearch"], **subset, **extra})
        add_complete(study, {"lr": 1e-3}, dev_mse=0.1, test_mse=0.1, best_epoch=1,
                     dev=scores(0.1, 0.5, n=100), test=scores(0.1, 0.4, n=100))
    small, large, other, older = (report.load(storage, n) for n in ("small", "large", "other", "older"))
    with caplog.at_level("WARNING", logger="vadsearch.report"):
        caplog.clear()
        report.compare([small, large])
        report.compare([small, older])
        assert not caplog.records
        report.compare([small, other])
    [record] = caplog.records
    assert "small: 100 dev and 100 test sentences of a subset (seed 0) of data aaaaaaaaaaaa" in record.message
    assert "other: 100 dev and 100 test sentences of a subset (seed 0) of data cccccccccccc" in record.message


def test_a_worker_stores_the_file_a_subset_was_drawn_from(tmp_path: Path, tiny_csv: Path) -> None:
    from search_helpers import write_study
    from vadsearch.data import file_sha256
    from vadsearch.studyfile import load_study_file
    from vadsearch.worker import open_study, study_corpus

    path = write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search="hidden_size = [4]")
    path.write_text(path.read_text().replace("[train]", "[data.subset]\ntrain = 30\ndev = 10\ntest = 10\n\n[train]"))
    spec = load_study_file(path)
    study = open_study(spec, open_storage(f"sqlite:///{tmp_path}/w.db"), 3, study_corpus(spec))
    stored = study.user_attrs["vadsearch"]
    assert stored["file_sha256"] == file_sha256(tiny_csv) != stored["data_sha256"]
