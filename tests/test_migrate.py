"""`vadsearch migrate`: studies copied between storages with every trial, and resumable on the target.

The fast tests build studies by hand on SQLite; the slow ones run the real worker on the tiny corpus,
copy a finished and a half-finished study into the real PostgreSQL at 127.0.0.1:5432, and finish the
half-finished one there.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from search_helpers import POSTGRES_URL, points_finished, synchronous_checkpoints, write_study
from search_helpers import vadsearch as run_vadsearch
from typer.testing import CliRunner

import vadsearch.migrate
import vadsearch.report
import vadsearch.train
from vadsearch.cli import app
from vadsearch.errors import ConfigError, StorageError
from vadsearch.migrate import _same_database, migrate
from vadsearch.storage import open_storage
from vadsearch.studyfile import load_study_file
from vadsearch.worker import Worker, WorkerOptions, point_key

runner = CliRunner()


def trial_record(trial: optuna.trial.FrozenTrial) -> dict:
    """Everything a copy must keep of a trial (its id is the storage's own)."""
    return {
        "number": trial.number, "state": trial.state, "values": trial.values, "params": trial.params,
        "distributions": trial.distributions, "intermediate": trial.intermediate_values,
        "user_attrs": trial.user_attrs, "system_attrs": trial.system_attrs,
        "start": trial.datetime_start, "complete": trial.datetime_complete,
    }


def load(storage, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())


def assert_same_study(source: optuna.Study, target: optuna.Study) -> None:
    """The target holds the source, except that a RUNNING trial arrives failed as interrupted."""
    assert target.directions == source.directions
    assert target.user_attrs == source.user_attrs
    assert target._storage.get_study_system_attrs(target._study_id) == source._storage.get_study_system_attrs(
        source._study_id)
    assert len(target.trials) == len(source.trials)
    for before, after in zip(source.trials, target.trials):
        expected = trial_record(before)
        if before.state == TrialState.RUNNING:
            expected["state"] = TrialState.FAIL
            expected["user_attrs"] = {**before.user_attrs, "interrupted": True, "migrated_running": True}
            expected["complete"] = after.datetime_complete
            assert after.datetime_complete is not None
        assert trial_record(after) == expected


# ------------------------------------------------------------------------------------- fast, SQLite


@pytest.fixture
def hand_made(tmp_path):
    """A SQLite study with a trial in each state a copy must handle, built without training."""
    url = f"sqlite:///{tmp_path}/source.db"
    study = optuna.create_study(study_name="made", storage=open_storage(url), direction="minimize")
    study.set_user_attr("vadsearch", {"name": "made", "sampler": "grid"})
    distribution = {"lr": FloatDistribution(1e-4, 1e-1, log=True)}
    study.add_trial(optuna.create_trial(params={"lr": 0.01}, distributions=distribution, value=0.05,
                                        intermediate_values={1: 0.07, 2: 0.05},
                                        user_attrs={"point": '{"lr": 0.01}', "best_epoch": 2}))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"lr": 0.1}, distributions=distribution,
                                        user_attrs={"point": '{"lr": 0.1}', "fail_reason": "TrainingError: NaN"}))
    running = study.ask()  # a worker that was killed mid-trial leaves this behind
    running.set_user_attr("point", '{"lr": 0.003}')
    study._storage.set_trial_intermediate_value(running._trial_id, 1, 0.08)
    study.enqueue_trial({"lr": 0.001}, user_attrs={"point": '{"lr": 0.001}'})
    _started_an_hour_ago(url, running._trial_id)  # killed long ago: not a trial a worker still trains
    return url


def _started_an_hour_ago(url: str, trial_id: int) -> None:
    import datetime

    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE trials SET datetime_start = :start WHERE trial_id = :id"),
                           {"start": datetime.datetime.now() - datetime.timedelta(hours=1), "id": trial_id})
    engine.dispose()


def test_a_study_whose_worker_still_trains_a_trial_is_not_copied(tmp_path):
    # Copied, the trial finished in the source alone and a worker on the target trained it again.
    source, target = f"sqlite:///{tmp_path}/source.db", f"sqlite:///{tmp_path}/target.db"
    study = optuna.create_study(study_name="live", storage=open_storage(source))
    study.set_user_attr("vadsearch", {"name": "live", "sampler": "grid"})
    trial = study.ask()
    trial.set_user_attr("worker", "host:123")
    with pytest.raises(StorageError, match=r"trial 0 of study 'live' is being trained \(just started, worker "
                                           r"host:123\): stop the workers first, then migrate \(a killed worker's "
                                           r"trial counts as stopped 60 s after its last heartbeat"):
        migrate(source, target)
    assert not (tmp_path / "target.db").exists()
    result = CliRunner().invoke(app, ["migrate", source, target])
    assert result.exit_code == 3 and "is being trained" in result.stderr and not (tmp_path / "target.db").exists()
    # A worker running with a longer grace period: its trial is live for as long, unless told otherwise.
    trial.set_user_attr("grace_period_s", 7200)
    _started_an_hour_ago(source, trial._trial_id)
    with pytest.raises(StorageError, match=r"counts as stopped 7200 s after its last heartbeat"):
        migrate(source, target)
    with pytest.raises(StorageError, match=r"counts as stopped 3700 s after"):
        migrate(source, target, grace_period=3700)
    assert not (tmp_path / "target.db").exists()
    # The user knows its worker is gone: the trial is copied as interrupted, to resume on the target.
    result = CliRunner().invoke(app, ["migrate", source, target, "--grace-period", "0"])
    assert result.exit_code == 0 and "1 running trial(s) failed as interrupted" in result.stdout


def test_every_trial_is_copied_and_a_running_one_comes_back_interrupted(hand_made, tmp_path):
    target = f"sqlite:///{tmp_path}/target.db"
    [copied] = migrate(hand_made, target)
    assert (copied.name, copied.trials, copied.interrupted) == ("made", 4, 1)
    assert copied.states == {"COMPLETE": 1, "FAIL": 2, "WAITING": 1}
    assert_same_study(load(open_storage(hand_made), "made"), load(open_storage(target), "made"))
    # Status says why the copy failed and that it resumes, not that someone pressed Ctrl-C.
    [row] = vadsearch.report.status(open_storage(target))
    assert [t["failure"] for t in row["failed_trials"]] == [
        "TrainingError: NaN",
        "running when its study was migrated: the next worker resumes it without spending a retry"]


def test_each_copied_trial_is_told_as_it_is_copied(hand_made, tmp_path):
    # A study of 30,000 trials takes a quarter of an hour to copy, and nothing was shown until the end.
    calls = []
    [copied] = migrate(hand_made, f"sqlite:///{tmp_path}/target.db", on_copied=lambda *call: calls.append(call))
    assert calls == [("made", n, 4) for n in range(1, 5)] and copied.trials == 4
    assert copied.states == {"COMPLETE": 1, "FAIL": 2, "WAITING": 1}  # counted, copied all the same


def test_a_name_the_target_has_is_refused_before_anything_is_written(hand_made, tmp_path):
    target = f"sqlite:///{tmp_path}/target.db"
    other = optuna.create_study(study_name="other", storage=open_storage(hand_made))
    other.add_trial(optuna.create_trial(params={}, distributions={}, value=1.0))
    optuna.create_study(study_name="made", storage=open_storage(target))

    with pytest.raises(StorageError, match="already has a study named 'made'; nothing was copied"):
        migrate(hand_made, target)  # "other" comes before nothing: the check covers every name first
    assert optuna.get_all_study_names(open_storage(target)) == ["made"]
    assert load(open_storage(target), "made").trials == []

    [copied] = migrate(hand_made, target, ["other"])
    assert (copied.name, copied.trials) == ("other", 1)


def test_a_missing_source_study_or_file_is_one_clear_error(hand_made, tmp_path):
    with pytest.raises(StorageError, match="no study named 'nope'.*studies there: made"):
        migrate(hand_made, f"sqlite:///{tmp_path}/target.db", ["nope"])
    assert not list(tmp_path.glob("target.db*"))  # refused before the target was made
    with pytest.raises(StorageError, match="no study database at .*absent.db: check SOURCE_URL"):
        migrate(f"sqlite:///{tmp_path}/absent.db", f"sqlite:///{tmp_path}/target.db")


def test_a_database_copied_onto_itself_is_refused(hand_made, tmp_path, monkeypatch):
    # It used to say the target "already has" every study of the source.
    monkeypatch.chdir(tmp_path)
    relative = f"sqlite:///{Path(hand_made.removeprefix('sqlite:///')).relative_to(tmp_path)}"
    with pytest.raises(ConfigError, match="is both the source and the target"):
        migrate(hand_made, relative)
    with pytest.raises(ConfigError, match="is both the source and the target"):
        migrate("postgresql+psycopg://a:pw@db/vad", "postgresql://b@db:5432/vad")
    assert not _same_database("postgresql://db/vad", "postgresql://db/other")
    assert not _same_database("postgresql://db/vad", f"sqlite:///{tmp_path}/vad")


def test_a_copy_that_fails_halfway_is_deleted_from_the_target(hand_made, tmp_path, monkeypatch):
    def broken(storage, name):
        raise RuntimeError("connection lost")

    monkeypatch.setattr(vadsearch.migrate, "_interrupt_running", broken)
    target = f"sqlite:///{tmp_path}/target.db"
    with pytest.raises(StorageError, match="partial copy was deleted: connection lost"):
        migrate(hand_made, target)
    assert optuna.get_all_study_names(open_storage(target)) == []
    monkeypatch.undo()
    assert migrate(hand_made, target)[0].trials == 4  # the same command works once the cause is gone


def test_cli_masks_passwords_and_reports_running_trials(hand_made, tmp_path, monkeypatch):
    monkeypatch.delenv("VADSEARCH_STORAGE", raising=False)
    target = f"sqlite:///{tmp_path}/target.db"
    result = runner.invoke(app, ["migrate", hand_made, target])
    assert result.exit_code == 0, result.output
    assert "copied made: 4 trial(s) (1 complete, 2 fail, 1 waiting)" in result.output
    assert "1 running trial(s) failed as interrupted" in result.output
    # The real entry point: Optuna's own line for each study made in the target is not shown.
    real = run_vadsearch("migrate", hand_made, f"sqlite:///{tmp_path}/other.db", cwd=tmp_path)
    assert real.returncode == 0 and real.stderr == "" and "copied made" in real.stdout, real.stderr

    again = runner.invoke(app, ["migrate", hand_made, target])
    assert again.exit_code == 3
    assert again.output.count("\n") == 1 and again.output.startswith("error: ")

    missing = runner.invoke(app, ["migrate", hand_made])
    assert missing.exit_code == 3
    assert missing.output == "error: no target database: pass TARGET_URL or set VADSEARCH_STORAGE\n"


# ----------------------------------------------------------------------- slow, the real PostgreSQL


@pytest.fixture
def pg_names(postgres):
    """Unique study names; their studies are deleted from PostgreSQL afterwards."""
    names: list[str] = []

    def make(prefix: str) -> str:
        names.append(f"{prefix}-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    for name in names:
        try:
            optuna.delete_study(study_name=name, storage=postgres)
        except KeyError:
            pass


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so Optuna leaves the trial RUNNING with its heartbeat."""


@pytest.mark.slow
@pytest.mark.postgres
def test_sqlite_studies_move_to_postgres_and_the_half_finished_one_finishes_there(
    tmp_path, tiny_csv, postgres, pg_names, monkeypatch
):
    source = f"sqlite:///{tmp_path}/source.db"
    artifacts = tmp_path / "artifacts"  # the shared checkpoint directory moves with the study
    options = WorkerOptions(storage=source, artifacts=artifacts, device="cpu", progress=False,
                            heartbeat_interval=1, grace_period=2)

    done_name, half_name = pg_names("mig-done"), pg_names("mig-half")
    done = load_study_file(write_study(tmp_path / "done.toml", name=done_name, data=tiny_csv,
                                       search="hidden_size = [4, 8]"))
    assert Worker(done, options).run().stopped == "finished"

    half = load_study_file(write_study(tmp_path / "half.toml", name=half_name, data=tiny_csv, max_epochs=3,
                                       search="hidden_size = [4, 8]\nlr = [0.001, 0.01]"))
    first = Worker(half, WorkerOptions(**{**options.__dict__, "n_trials": 1})).run()
    assert (first.stopped, len(first.trials)) == ("n-trials", 1)
    real_train = vadsearch.train.train

    def killed_after_one_epoch(config, corpus, **kwargs):
        on_epoch = kwargs.pop("on_epoch")

        def die(epoch):
            on_epoch(epoch)
            raise _Killed  # after epoch 1's checkpoint and report

        return real_train(config, corpus, on_epoch=die, **kwargs)

    synchronous_checkpoints(monkeypatch)
    monkeypatch.setattr(vadsearch.train, "train", killed_after_one_epoch)
    with pytest.raises(_Killed):
        Worker(half, options).run()
    monkeypatch.setattr(vadsearch.train, "train", real_train)
    before = load(open_storage(source), half_name)
    assert [t.state for t in before.trials] == [TrialState.COMPLETE, TrialState.RUNNING] + [TrialState.WAITING] * 2
    assert before.trials[1].intermediate_values.keys() == {1}

    # Its worker was "killed" a moment ago, and is known to be gone.
    copied = {c.name: c for c in migrate(source, POSTGRES_URL, [done_name, half_name], grace_period=0)}
    assert (copied[done_name].trials, copied[done_name].interrupted) == (2, 0)
    assert (copied[half_name].trials, copied[half_name].interrupted) == (4, 1)
    for name in (done_name, half_name):
        assert_same_study(load(open_storage(source), name), load(postgres, name))

    with pytest.raises(StorageError, match="already has a study named"):
        migrate(source, POSTGRES_URL, [half_name], grace_period=0)
    assert len(load(postgres, half_name).trials) == 4

    on_postgres = WorkerOptions(**{**options.__dict__, "storage": POSTGRES_URL})
    assert Worker(done, on_postgres).run().trials == []  # finished: nothing runs again

    summary = Worker(half, on_postgres).run()
    assert summary.stopped == "finished"
    after = load(postgres, half_name)
    assert sorted(points_finished(after)) == sorted(point_key(p) for p in half.grid())
    assert set(points_finished(after).values()) == {1}  # every grid point complete exactly once
    assert trial_record(after.trials[0]) == trial_record(before.trials[0])  # the finished trial untouched
    assert before.trials[0].number not in summary.trials and len(summary.trials) == 3
    resumed = [t for t in after.trials if t.state == TrialState.COMPLETE
               and t.user_attrs["point"] == before.trials[1].user_attrs["point"]]
    assert len(resumed) == 1
    assert resumed[0].user_attrs["resumed_from"] == 1  # continued from the checkpoint of the killed trial
    assert sorted(resumed[0].intermediate_values) == [1, 2, 3]


@pytest.mark.postgres
def test_cli_never_prints_the_password(hand_made, postgres, pg_names):
    # The test server trusts local connections, so any password is accepted and must never be shown.
    from sqlalchemy.engine import make_url

    if make_url(POSTGRES_URL).password:
        pytest.skip("the test server's URL has a password of its own")
    url = make_url(POSTGRES_URL).set(password="s3cret-pw").render_as_string(hide_password=False)
    name = pg_names("mig-cli")
    optuna.copy_study(from_study_name="made", from_storage=open_storage(hand_made), to_storage=open_storage(hand_made),
                      to_study_name=name)
    result = runner.invoke(app, ["migrate", hand_made, url, "--study", name])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output and "postgres:***@" in result.output
    again = runner.invoke(app, ["migrate", hand_made, url, "--study", name])
    assert again.exit_code == 3 and "s3cret-pw" not in again.output and "***" in again.output
