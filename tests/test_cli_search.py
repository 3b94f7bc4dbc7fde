"""The search commands through the CLI, in-process: results, formats, and one-line errors."""

from __future__ import annotations

import csv
import datetime
import io
import json
import re
import sys

import pytest
from typer.testing import CliRunner

from search_helpers import write_study
from vadsearch.cli import app

runner = CliRunner()


def invoke(*args: str, cwd=None):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def finished(tmp_path, tiny_csv, monkeypatch):
    """A finished two-point study in tmp_path/vadsearch.db, run through `vadsearch worker`."""
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "tiny.toml", name="tiny", data=tiny_csv, search="hidden_size = [4, 8]")
    result = invoke("worker", str(study_file), "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    return result


def test_worker_prints_the_leaderboard_and_best_trial(finished):
    assert "worker stopped (finished): ran 2 trial(s): 2 complete" in finished.output
    assert "param.hidden_size" in finished.output and "test.mse" in finished.output


def test_ctrl_c_while_the_worker_checks_its_input_says_how_to_resume(tmp_path, tiny_csv, monkeypatch):
    # Pressed in the first seconds (word vectors, encoders, the corpus checked), it exited 130 in silence.
    import vadsearch.worker

    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "tiny.toml", name="tiny", data=tiny_csv, search="hidden_size = [4, 8]")

    def pressed(configs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vadsearch.worker, "check_models", pressed)
    result = invoke("worker", str(study_file), "--device", "cpu", "-q")
    assert result.exit_code == 130
    assert result.stdout == "worker stopped (interrupted): ran 0 trial(s): none\n"
    assert result.stderr == "interrupted: run the same command again to resume\n"


@pytest.mark.parametrize("fmt", ["table", "markdown", "csv", "json"])
def test_report_formats(finished, fmt):
    result = invoke("report", "tiny", "--format", fmt)
    assert result.exit_code == 0, result.output
    if fmt == "json":
        rows = json.loads(result.output)
        assert [r["rank"] for r in rows] == [1, 2] and rows[0]["dev_mse"] <= rows[1]["dev_mse"]
    elif fmt == "csv":
        assert len(list(csv.DictReader(io.StringIO(result.output)))) == 2
    elif fmt == "markdown":
        assert result.output.lstrip().startswith("|") and "---" in result.output
    else:
        assert "dev_mse" in result.output and "test.mse" in result.output


def test_best_is_the_lowest_dev_and_the_study_file_names_the_study(finished, tmp_path):
    by_name = json.loads(invoke("best", "tiny").output)
    by_file = json.loads(invoke("best", str(tmp_path / "tiny.toml")).output)
    assert by_name == by_file
    board = json.loads(invoke("report", "tiny", "--format", "json").output)
    assert by_name["trial"] == board[0]["trial"] and by_name["dev"]["mse"] == board[0]["dev_mse"]


@pytest.mark.parametrize("command", [["best", "tiny"], ["report", "tiny"], ["report", "tiny", "--trials"],
                                     ["compare", "tiny"], ["status"]])
@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_every_format_ends_in_one_line_end(finished, command, fmt):
    # A second one was an empty last row to a CSV reader.
    out = invoke(*command, "--format", fmt).stdout
    assert out.endswith("\n") and not out.endswith("\n\n"), out[-20:]
    if fmt == "csv":
        assert all(csv.reader(io.StringIO(out)))


def test_a_relative_data_path_is_stored_whole_and_a_bad_set_is_named(tmp_path, tiny_csv, monkeypatch):
    import shutil

    import optuna

    (tmp_path / "run").mkdir()
    shutil.copy(tiny_csv, tmp_path / "tiny.csv")
    monkeypatch.chdir(tmp_path / "run")
    write_study(tmp_path / "run" / "r.toml", name="r", data=tiny_csv, search="hidden_size = [4, 8]")
    result = invoke("worker", "r.toml", "--data", "../tiny.csv", "--n-trials", "0", "-q")
    assert result.exit_code == 0, result.output
    stored = optuna.load_study(study_name="r", storage="sqlite:///vadsearch.db").user_attrs["vadsearch"]
    assert stored["data_path"] == str(tmp_path / "tiny.csv")  # as typed, it was read from the wrong directory later

    # The file is sound: the override is what makes the points one run, and the line says so.
    refused = invoke("worker", "r.toml", "--set", "model=baseline")
    assert refused.exit_code == 2
    assert refused.stderr.strip().endswith("fix it in [train] or drop it (with --set model=baseline)")


def test_status_counts_a_pruned_trial_as_done(tmp_path, monkeypatch):
    import optuna

    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(study_name="p", storage="sqlite:///vadsearch.db")
    study.set_user_attr("vadsearch", {"name": "p", "sampler": "tpe", "max_trials": 3, "base": {"model": "lstm"}})
    for state in ("COMPLETE", "PRUNED", "PRUNED"):
        study.add_trial(optuna.create_trial(state=optuna.trial.TrialState[state], value=0.1 if state == "COMPLETE"
                                            else None, intermediate_values={1: 0.2}))
    assert "p (lstm, tpe): 3/3 trials done (1 complete, 2 pruned), 0 running" in invoke("status").output
    # The budget lowered below what already ran (a later worker's file says max_trials = 2).
    study.set_user_attr("vadsearch", {**study.user_attrs["vadsearch"], "max_trials": 2})
    assert "p (lstm, tpe): 3 trials done, beyond max_trials = 2 (1 complete, 2 pruned)" in invoke("status").output


def test_a_study_of_another_tool_is_shown_by_status_and_refused_by_reports(finished):
    # Plain Optuna studies in the same database broke `status` for every study (a traceback), and reports
    # ranked a maximized or multi-objective study as if it were a dev MSE.
    import optuna

    storage = "sqlite:///vadsearch.db"
    optuna.create_study(study_name="plain-max", storage=storage, direction="maximize").add_trial(
        optuna.create_trial(value=0.8))
    optuna.create_study(study_name="plain-multi", storage=storage, directions=["minimize", "maximize"])
    status = invoke("status")
    assert status.exit_code == 0 and "tiny (lstm, grid): 2/2 configurations done" in status.output
    assert "plain-max: not a vadsearch study, 1 trial(s) (1 complete, 0 running, 0 failed)" in status.output
    for command in (["report", "plain-max"], ["best", "plain-multi"], ["compare", "tiny", "plain-max"]):
        line = one_line_error(invoke(*command), code=3)
        assert "was not made by vadsearch" in line and "optuna trials" in line, command


def test_status_and_compare(finished):
    status = invoke("status")
    assert ("tiny (lstm, grid): 2/2 configurations done (2 complete, 0 pruned), 0 running, 0 waiting, 0 failed"
            in status.output)
    compare = json.loads(invoke("compare", "tiny", "--format", "json").output)
    assert compare[0]["study"] == "tiny" and compare[0]["complete"] == 2


def test_status_and_report_say_why_trials_failed(finished):
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState

    study = optuna.load_study(study_name="tiny", storage="sqlite:///vadsearch.db")
    for number in range(7):
        study.add_trial(optuna.create_trial(
            state=TrialState.FAIL, params={"hidden_size": 4},
            distributions={"hidden_size": CategoricalDistribution([4, 8])},
            user_attrs={"point": "{}", "worker": "w:1", "fail_reason": f"ValueError: failure {number}"}))
    lines = invoke("status").output.splitlines()
    assert "0 waiting, 7 failed (6 retried)" in lines[0]  # each failure but the last was run again
    # The five latest failures (trials 4-8), and where to read the others.
    assert [line for line in lines if " failed: " in line] == [
        *(f"  trial {2 + n} failed: ValueError: failure {n}; retried as trial {3 + n}, fail" for n in range(2, 6)),
        "  trial 8 failed: ValueError: failure 6"]
    assert "  (2 earlier failures: vadsearch report tiny --trials)" in lines

    table = invoke("report", "tiny", "--trials").output
    assert "failure" in table and "ValueError: failure 0" in table and "COMPLETE" in table
    assert "point" not in table.splitlines()[0].split()  # the JSON point stays out of the table
    records = json.loads(invoke("report", "tiny", "--trials", "--format", "json").output)
    assert [r["state"] for r in records] == ["COMPLETE"] * 2 + ["FAIL"] * 7 and "point" in records[0]
    assert "use one of them" in one_line_error(invoke("report", "tiny", "--trials", "--top", "1"), code=2)


@pytest.mark.parametrize("terminal", [True, False])
def test_launch_progress_is_a_bar_on_a_terminal_and_a_line_per_change_elsewhere(finished, tmp_path, monkeypatch,
                                                                                  terminal):
    from vadsearch.cli import _progress_bar
    from vadsearch.studyfile import load_study_file

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stderr", Stderr())
    tick = _progress_bar(load_study_file(tmp_path / "tiny.toml"), "sqlite:///vadsearch.db")
    for _ in range(3):
        tick()
    shown = sys.stderr.getvalue()
    if terminal:
        assert "tiny: 100%" in shown and "2/2" in shown and "running=0" in shown
    else:  # three ticks, no change: one timestamped line
        [line] = [line for line in shown.splitlines() if "configurations done" in line]
        assert "\r" not in shown
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d tiny: 2/2 configurations done, 0 running, 0 given up",
                            line)


def test_launch_progress_reads_only_the_trials_that_changed_since_its_last_tick(finished, tmp_path, monkeypatch):
    # It read every trial each second: 30 s a read at 30,000 trials, a core kept busy beside the workers.
    import optuna
    from optuna.storages import RDBStorage

    from vadsearch.cli import _progress_bar
    from vadsearch.studyfile import load_study_file

    real, reads = RDBStorage._get_trials, []

    def recorded(self, study_id, states, included_trial_ids, trial_id_greater_than):
        found = real(self, study_id, states, included_trial_ids, trial_id_greater_than)
        reads.append(len(found))
        return found

    monkeypatch.setattr(RDBStorage, "_get_trials", recorded)
    tick = _progress_bar(load_study_file(tmp_path / "tiny.toml"), "sqlite:///vadsearch.db")
    tick()
    assert reads == [2]  # the two trials of the finished study
    tick()
    study = optuna.load_study(study_name="tiny", storage="sqlite:///vadsearch.db")
    study.enqueue_trial({"hidden_size": 4})  # a new trial (a retry, say) since
    tick()
    assert reads[1] == 0 and reads[-1] == 1


def test_report_shows_the_best_twenty_unless_asked_for_more(finished):
    # A study run for days printed thousands of rows, the best trial's summary below them all.
    import optuna

    study = optuna.load_study(study_name="tiny", storage="sqlite:///vadsearch.db")
    template = study.trials[0]
    for i in range(21):
        study.add_trial(optuna.create_trial(params=template.params, distributions=template.distributions,
                                            value=1.0 + i, user_attrs=template.user_attrs,
                                            intermediate_values=template.intermediate_values))
    table = invoke("report", "tiny").output
    ranks = re.findall(r"^\s*(\d+)\s+\d+\s", table, flags=re.M)
    assert ranks == [str(r) for r in range(1, 21)]
    assert "(3 more complete trial(s): --top N shows more, --format csv every one)" in table
    assert "test" in table.split("more complete trial")[1]  # the best trial's summary follows
    assert len(invoke("report", "tiny", "--top", "30").output.split("more complete trial")) == 1
    assert len(invoke("report", "tiny", "--format", "csv").output.strip().splitlines()) == 1 + 23


def test_status_shows_a_running_trials_epoch_of_how_many_time_running_and_heartbeat(finished):
    import optuna

    storage = optuna.storages.RDBStorage("sqlite:///vadsearch.db")
    study = optuna.load_study(study_name="tiny", storage=storage)
    running = study.ask()
    running.set_user_attr("worker", "gpu3:77")
    running.report(0.2, 1)
    storage.record_heartbeat(running._trial_id)
    lines = invoke("status").output.splitlines()
    assert any(re.fullmatch(rf"  trial {running.number}: epoch 1/2 on gpu3:77, running \d+ s, heartbeat \d+ s ago",
                            line) for line in lines), lines


def test_status_calls_a_trial_silent_past_the_grace_period_stale(finished):
    import optuna
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    from vadsearch.storage import GRACE_PERIOD_S
    from vadsearch.worker import WorkerOptions

    assert GRACE_PERIOD_S == WorkerOptions.grace_period  # the default a worker takes a trial for dead after
    storage = optuna.storages.RDBStorage("sqlite:///vadsearch.db")
    study = optuna.load_study(study_name="tiny", storage=storage)
    running, patient = study.ask(), study.ask()
    patient.set_user_attr("grace_period_s", 3600)  # its worker runs with --grace-period 3600
    beat = models.TrialHeartbeatModel
    for trial in (running, patient):
        storage.record_heartbeat(trial._trial_id)
        with storage.engine.begin() as connection:  # sent 27 minutes ago
            mine = beat.trial_id == trial._trial_id
            sent = connection.execute(sa.select(beat.heartbeat).where(mine)).scalar_one()
            connection.execute(sa.update(beat).where(mine).values(heartbeat=sent - datetime.timedelta(minutes=27)))
    lines = invoke("status").output.splitlines()
    [line] = [line for line in lines if line.startswith(f"  trial {running.number}:")]
    assert line.endswith("heartbeat 27 min ago (stale: its worker seems gone; the next worker on this study takes "
                         "it over)")
    [line] = [line for line in lines if line.startswith(f"  trial {patient.number}:")]
    assert line.endswith("heartbeat 27 min ago")  # within its own worker's grace period
    [row] = json.loads(invoke("status", "--format", "json").output)
    assert [t["stale"] for t in row["running_trials"]] == [True, False]


@pytest.mark.parametrize(("seconds", "shown"), [(None, "?"), (4.4, "4 s"), (119, "119 s"), (150, "2 min"),
                                                (7199, "120 min"), (9000, "2.5 h")])
def test_durations_read_at_a_glance(seconds, shown):
    from vadsearch.cli import _duration

    assert _duration(seconds) == shown


def test_set_overrides_train_values(tmp_path, tiny_csv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "t.toml", name="t", data=tiny_csv, search="hidden_size = [4]")
    assert invoke("worker", str(study_file), "--device", "cpu", "-q", "--set", "max_epochs=1").exit_code == 0
    assert json.loads(invoke("best", "t").output)["config"]["max_epochs"] == 1


def one_line_error(result, code: int | None = None) -> str:
    assert result.exit_code != 0
    if code is not None:
        assert result.exit_code == code
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_study_file_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\nsmapler = "grid"\n[train]\nmodel = "lstm"\n')
    line = one_line_error(invoke("worker", str(bad)), code=2)
    assert "bad.toml" in line and "study.smapler" in line
    assert not (tmp_path / "vadsearch.db").exists()


def test_launch_rejects_a_mistyped_device_once_before_starting_workers(tmp_path, tiny_csv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "t.toml", name="t", data=tiny_csv, search="hidden_size = [4]")
    line = one_line_error(invoke("launch", str(study_file), "--workers", "2", "--device", "gpu0"), code=2)
    assert "unknown device 'gpu0'" in line
    assert not (tmp_path / "vadsearch-logs").exists() and not (tmp_path / "vadsearch.db").exists()


@pytest.mark.parametrize(("flags", "code", "line"), [
    (["--storage", "postgres://x/y"], 2, "error: unsupported database 'postgres' in postgres://x/y"),
    (["--storage", "sqlite:///no-such-dir/v.db"], 3, "error: cannot create no-such-dir/v.db: directory no-such-dir"),
    (["--storage", "postgresql+psycopg://bob:hunter2@127.0.0.1:1/x"], 3, "error: cannot open postgresql+psycopg://bob:***@"),
    (["--workers", "0"], 2, "error: --workers must be at least 1, got 0"),
    (["--grace-period", "5", "--heartbeat-interval", "5"], 2, "error: --grace-period (5 s) must be longer than"),
])
def test_launch_refuses_a_bad_storage_or_worker_count_once_before_starting_workers(tmp_path, tiny_csv, monkeypatch,
                                                                                  flags, code, line):
    # Before: a bad --storage started every worker, each failed alone, and launch said only "worker(s) 0, 1
    # exited with an error"; --workers 0 made the log directory before it was refused.
    import vadsearch.launch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vadsearch.launch, "start", lambda plan: pytest.fail("a worker was started"))
    study_file = write_study(tmp_path / "t.toml", name="t", data=tiny_csv, search="hidden_size = [4]")
    result = runner.invoke(app, ["launch", str(study_file), "--device", "cpu", *flags])
    assert result.exit_code == code and result.stderr.startswith(line), result.output
    assert len(result.stderr.splitlines()) == 1 and "hunter2" not in result.stderr
    assert not (tmp_path / "vadsearch-logs").exists() and not list(tmp_path.glob("vadsearch.db*"))


def test_bad_set_and_bad_storage(tmp_path, tiny_csv, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "t.toml", name="t", data=tiny_csv, search="hidden_size = [4]")
    assert "--set takes KEY=VALUE" in one_line_error(invoke("worker", str(study_file), "--set", "max_epochs"))
    assert "unknown" in one_line_error(invoke("worker", str(study_file), "--set", "nonsense=1"))
    line = one_line_error(invoke("worker", str(study_file), "--storage",
                                 "postgresql+psycopg://bob:hunter2@127.0.0.1:1/x"), code=3)
    assert "hunter2" not in line
    assert not (tmp_path / "vadsearch.db").exists()


def test_a_study_whose_every_trial_failed_ends_the_worker_with_the_reason(tmp_path, tiny_csv, monkeypatch):
    import vadsearch.train
    from vadsearch.errors import TrainingError

    def diverges(*args, **kwargs):
        raise TrainingError("training diverged at epoch 1 (loss nan): lower the learning rate")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vadsearch.train, "train", diverges)
    study_file = write_study(tmp_path / "bad.toml", name="bad", data=tiny_csv, search="hidden_size = [4, 8]",
                             study="max_retries = 0")
    result = runner.invoke(app, ["worker", str(study_file), "--device", "cpu", "-q"])
    assert result.exit_code == 5  # not "no finished trial yet" (a storage error), and no empty leaderboard
    assert result.stdout == "worker stopped (finished): ran 2 trial(s): 2 fail\n"
    assert result.stderr.splitlines()[-1] == (  # after the log's lines of each failure
        "error: every trial of study 'bad' failed (2); the latest: TrainingError: training diverged at epoch 1 "
        "(loss nan): lower the learning rate (`vadsearch report bad --trials` lists them all)")
    # Finished, though nothing completed: status says the configurations were given up on, not still to run.
    assert ("bad (lstm, grid): 0/2 configurations done (0 complete, 0 pruned, 2 given up after max_retries), "
            "0 running, 0 waiting, 2 failed") in invoke("status").output


@pytest.mark.parametrize(("flags", "line"), [
    (["--heartbeat-interval", "0"], "error: --heartbeat-interval must be at least 1 second, got 0"),
    (["--grace-period", "0"], "error: --grace-period (0 s) must be longer than --heartbeat-interval (10 s)"),
    (["--grace-period", "5", "--heartbeat-interval", "5"], "error: --grace-period (5 s) must be longer than"),
    (["--n-trials", "-1"], "error: --n-trials must be 0 or more, got -1"),
    (["--db-timeout", "-1"], "error: --db-timeout must be a number of seconds >= 0, got -1.0"),
])
def test_worker_timing_options_are_checked_before_anything_is_written(tmp_path, tiny_csv, monkeypatch, flags, line):
    monkeypatch.chdir(tmp_path)
    study_file = write_study(tmp_path / "t.toml", name="t", data=tiny_csv, search="hidden_size = [4]")
    result = runner.invoke(app, ["worker", str(study_file), "--device", "cpu", *flags])
    assert result.exit_code == 2 and result.stderr.startswith(line) and len(result.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("vadsearch.db*"))


def test_output_directories_that_cannot_be_written_are_one_line_before_any_work(finished, tmp_path):
    (tmp_path / "a-file").write_text("")
    for args, line in (
        (["plot", "tiny", "--kind", "history", "--out", "/proc/plots"],
         "error: cannot write to the figure directory /proc/plots: No such file or directory; pass another --out"),
        (["plot", "tiny", "--kind", "history", "--out", "a-file/plots"],
         "error: cannot write to the figure directory a-file/plots: Not a directory; pass another --out"),
        (["launch", "tiny.toml", "--device", "cpu", "--log-dir", "a-file"],
         "error: the log directory a-file is a file, not a directory; pass another --log-dir"),
    ):
        result = runner.invoke(app, args)
        assert (result.exit_code, result.stderr.strip()) == (4, line), args
    assert not (tmp_path / "vadsearch-logs").exists()  # launch started no worker


def test_unknown_study_lists_the_existing_ones(finished):
    line = one_line_error(invoke("report", "nope"), code=3)
    assert "nope" in line and "tiny" in line


def test_reports_without_a_database_create_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (["status"], ["report", "x"], ["best", "x"], ["compare", "x"]):
        assert "no study database" in one_line_error(invoke(*command), code=3)
    assert list(tmp_path.iterdir()) == []


def test_help_wraps_prose_to_the_terminal_and_keeps_examples_on_their_own_lines():
    wide = runner.invoke(app, ["worker", "--help"], env={"COLUMNS": "200"}, catch_exceptions=False).output
    # One paragraph of the docstring, wrapped in the source, is one line on a wide terminal.
    assert ("Any number of workers, on any number of machines, can run the same study file against one storage. "
            "Stop a worker with Ctrl-C") in wide
    assert "\n   vadsearch worker studies/quickstart.toml" in wide
    narrow = runner.invoke(app, ["plot", "--help"], env={"COLUMNS": "60"}, catch_exceptions=False).output
    assert max(len(line) for line in narrow.splitlines()) <= 60
    assert "fANOVA parameter importances" in " ".join(narrow.split())


def test_every_command_teaches_in_its_help():
    result = invoke("--help")
    for command in ("train", "worker", "launch", "status", "report", "best", "compare"):
        assert command in result.output
        help_text = invoke(command, "--help").output
        assert "Usage" in help_text and len(help_text) > 200


def test_launch_passes_the_workers_timing_on(tmp_path, tiny_csv, monkeypatch):
    # Its workers ran with the defaults whatever the network: a PostgreSQL across a slow link needs longer.
    import vadsearch.launch

    monkeypatch.chdir(tmp_path)
    plans = []
    monkeypatch.setattr(vadsearch.launch, "start", lambda plan: plans.append(plan) or [])
    monkeypatch.setattr(vadsearch.launch, "wait", lambda processes, on_tick=None, on_exit=None: [])
    study_file = write_study(tmp_path / "t.toml", name="t", data=tiny_csv, search="hidden_size = [4]")
    runner.invoke(app, ["launch", str(study_file), "--device", "cpu", "--grace-period", "300",
                        "--heartbeat-interval", "30", "--db-timeout", "1800"])
    args = " ".join(plans[0].worker_args)
    assert "--heartbeat-interval 30 --grace-period 300 --db-timeout 1800.0" in args
