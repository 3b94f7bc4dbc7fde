"""Storage URLs, password masking, and the study lock, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import re
import threading
import time

import pytest

from search_helpers import POSTGRES_URL
from vadsearch.errors import StorageError
from vadsearch.storage import DEFAULT_STORAGE, mask, open_storage, scrub, storage_url, study_lock


def test_url_precedence(monkeypatch):
    monkeypatch.delenv("VADSEARCH_STORAGE", raising=False)
    assert storage_url() == DEFAULT_STORAGE
    monkeypatch.setenv("VADSEARCH_STORAGE", "sqlite:///env.db")
    assert storage_url() == "sqlite:///env.db"
    assert storage_url("sqlite:///flag.db") == "sqlite:///flag.db"


@pytest.mark.parametrize("url", [
    "postgresql+psycopg://alice:s3cret-pw@db.example:5432/vad",
    "postgresql://alice:s3cret-pw@db/vad?sslmode=require",
])
def test_passwords_are_masked(url):
    assert "s3cret-pw" not in mask(url)
    assert "***" in mask(url)
    assert "s3cret-pw" not in scrub(f'connection to "{url}" failed for password s3cret-pw', url)


@pytest.mark.parametrize("url, message, code", [
    ("not a url", "not a database URL", 2),
    ("mysql://u:pw@host/db", "unsupported database", 2),
    ("postgresql+psycopg2://u:pw@127.0.0.1/db", "No module named 'psycopg2'; vadsearch connects to PostgreSQL with "
                                                "psycopg 3: postgresql+psycopg://", 2),
    ("sqlite:////no/such/dir/x.db", "does not exist", 3),
])
def test_bad_urls_are_one_clear_error(url, message, code):
    # A mistyped URL is bad input (exit 2); a database that cannot be reached or made, a storage error (3).
    with pytest.raises(StorageError, match=re.escape(message)) as error:
        open_storage(url)
    assert "\n" not in str(error.value) and "pw" not in str(error.value) and error.value.exit_code == code


def test_unreachable_postgres_names_the_host_but_not_the_password():
    url = "postgresql+psycopg://alice:s3cret-pw@127.0.0.1:1/vad"  # port 1: nothing listens
    with pytest.raises(StorageError) as error:
        open_storage(url)
    text = str(error.value)
    assert "cannot open" in text and "127.0.0.1" in text and "s3cret-pw" not in text and "\n" not in text
    assert text.endswith("check the URL (--storage or $VADSEARCH_STORAGE) and that the server is up")


def test_reading_a_missing_sqlite_file_creates_nothing(tmp_path):
    with pytest.raises(StorageError, match="no study database"):
        open_storage(f"sqlite:///{tmp_path}/missing.db", create=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_an_in_memory_database_is_refused(url):
    with pytest.raises(StorageError, match=r"is an in-memory database, .*give a file, sqlite:///PATH$"):
        open_storage(url)


def test_a_path_that_is_no_database_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "ratings.csv").write_text("id,split,V,A,D,text\n")
    (tmp_path / "folder").mkdir()
    with pytest.raises(StorageError, match="ratings.csv is not an SQLite database"):
        open_storage(f"sqlite:///{tmp_path}/ratings.csv")
    with pytest.raises(StorageError, match="folder is a directory, not a study database"):
        open_storage(f"sqlite:///{tmp_path}/folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "ratings.csv"]  # no .lock beside them
    assert (tmp_path / "ratings.csv").read_text() == "id,split,V,A,D,text\n"
    open_storage(f"sqlite:///{tmp_path}/new.db")  # a new file is still a new database
    (tmp_path / "empty.db").touch()
    open_storage(f"sqlite:///{tmp_path}/empty.db")  # as SQLite itself treats an empty file


def _assert_exclusive(storage, name: str) -> None:
    inside, overlaps = [], []

    def hold():
        with study_lock(storage, name):
            if inside:
                overlaps.append(True)
            inside.append(True)
            time.sleep(0.2)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == []
    assert time.monotonic() - started >= 0.55  # three holders, one after another


def test_study_lock_is_exclusive_on_sqlite(tmp_path):
    _assert_exclusive(open_storage(f"sqlite:///{tmp_path}/s.db"), "s")


@pytest.mark.postgres
def test_study_lock_is_exclusive_on_postgres():
    try:
        storage = open_storage(POSTGRES_URL)
    except StorageError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    _assert_exclusive(storage, "lock-test")


def _attrs_round_trip(storage) -> None:
    import uuid

    import optuna

    from vadsearch.storage import set_user_attrs

    study = optuna.create_study(study_name=f"attrs-{uuid.uuid4().hex[:8]}", storage=storage)
    study.enqueue_trial({"x": 1.0}, user_attrs={"point": "p"})
    trial = study.ask()
    set_user_attrs(trial, {"worker": "w1", "config": {"lr": 0.1, "layers": [1, 2]}})
    set_user_attrs(trial, {"worker": "w2", "best_epoch": 3})  # an overwrite and a new one, together
    assert study.trials[0].user_attrs == {"point": "p", "worker": "w2", "config": {"lr": 0.1, "layers": [1, 2]},
                                          "best_epoch": 3}
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(trial, {"late": True})
    assert "late" not in study.trials[0].user_attrs
    optuna.delete_study(study_name=study.study_name, storage=storage)


def test_set_user_attrs_in_one_statement_on_sqlite(tmp_path):
    _attrs_round_trip(open_storage(f"sqlite:///{tmp_path}/a.db"))


@pytest.mark.postgres
def test_set_user_attrs_in_one_statement_on_postgres(postgres):
    _attrs_round_trip(postgres)


def _worker_storage_writes_attrs_with_state_changes(url: str) -> None:
    """A worker's storage writes a queued trial's start attributes as it starts, its final ones as it
    ends, each in the same transaction as the state, and never creates a trial of its own in a grid."""
    import uuid

    import optuna
    from optuna.trial import TrialState

    from vadsearch.reconnect import QueueEmpty
    from vadsearch.storage import set_user_attrs_with_final_state

    storage = open_storage(url, outage_limit=30)
    starts = []
    storage.on_start = lambda fixed: starts.append(fixed) or {"worker": "w", "x_seen": fixed["x"]}
    storage.queue_only = True
    study = optuna.create_study(study_name=f"ws-{uuid.uuid4().hex[:8]}", storage=storage)
    other = optuna.load_study(study_name=study.study_name, storage=open_storage(url))  # another worker's view
    try:
        study.enqueue_trial({"x": 1.0}, user_attrs={"point": "p1"})
        study.enqueue_trial({"x": 2.0}, user_attrs={"point": "p2"})
        first = study.ask()
        assert starts == [{"x": 1.0}]
        assert first.user_attrs == {"point": "p1", "worker": "w", "x_seen": 1.0}  # in Optuna's own read at `ask`

        set_user_attrs_with_final_state(first, {"best_epoch": 4, "dev": {"mse": 0.1}})
        assert "best_epoch" not in other.trials[0].user_attrs  # held back while the trial runs
        study.tell(first, 0.1)
        done = other.trials[0]
        assert done.state == TrialState.COMPLETE and done.user_attrs["dev"] == {"mse": 0.1}

        # A trial another worker finished first (as stale, say): neither its state nor these attributes change.
        second = study.ask()
        other.tell(other.trials[1].number, state=TrialState.FAIL)
        set_user_attrs_with_final_state(second, {"best_epoch": 9})
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_state_values(second._trial_id, TrialState.COMPLETE, [0.2])
        assert other.trials[1].state == TrialState.FAIL and "best_epoch" not in other.trials[1].user_attrs

        # The queue is empty: `ask` says so, and leaves no trial behind. Enqueueing still works.
        with pytest.raises(QueueEmpty):
            study.ask()
        assert len(other.trials) == 2
        storage.on_start = lambda fixed: 1 / 0  # a start hook that fails costs only its attributes
        study.enqueue_trial({"x": 3.0}, user_attrs={"point": "p3"})
        third = study.ask()
        assert third.params == {} and third.user_attrs == {"point": "p3"}
        assert other.trials[2].state == TrialState.RUNNING
    finally:
        optuna.delete_study(study_name=study.study_name, storage=storage)


def test_a_workers_storage_writes_attributes_with_state_changes_on_sqlite(tmp_path):
    _worker_storage_writes_attrs_with_state_changes(f"sqlite:///{tmp_path}/w.db")


@pytest.mark.postgres
def test_a_workers_storage_writes_attributes_with_state_changes_on_postgres(postgres):
    _worker_storage_writes_attrs_with_state_changes(POSTGRES_URL)


def test_the_batched_calls_ride_out_a_lost_database_like_optunas_own(tmp_path, monkeypatch):
    import sqlite3
    import uuid

    import optuna
    from optuna.storages._rdb import storage as rdb
    from optuna.trial import TrialState
    from sqlalchemy.exc import OperationalError

    from vadsearch.storage import set_user_attrs, set_user_attrs_with_final_state

    storage = open_storage(f"sqlite:///{tmp_path}/r.db", outage_limit=30)
    study = optuna.create_study(study_name=f"r-{uuid.uuid4().hex[:8]}", storage=storage)
    study.enqueue_trial({"x": 1.0})
    trial = study.ask()
    real, failures = rdb._create_scoped_session, []

    def flaky(*args, **kwargs):
        if len(failures) < 2:  # the database is away for the first two attempts of each call
            failures.append(1)
            raise OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked"))
        return real(*args, **kwargs)

    def survives(call):  # the database is away twice, then back: the call succeeds once, as if nothing happened
        failures.clear()
        result = call()
        assert len(failures) == 2
        return result

    monkeypatch.setattr(rdb, "_create_scoped_session", flaky)
    survives(lambda: set_user_attrs(trial, {"worker": "w"}))
    # Optuna's study cache reaches past the public API for these: trial creation, reads, parameters.
    survives(lambda: storage._create_new_trial(study._study_id))  # a fresh trial, as a sampled study's `ask`
    assert len(survives(lambda: study.get_trials(deepcopy=False))) == 2
    assert survives(lambda: trial.suggest_float("x", 0.0, 2.0)) == 1.0
    set_user_attrs_with_final_state(trial, {"best_epoch": 2})
    survives(lambda: study.tell(trial, 0.5))  # its attributes are written again with each retry of the state
    failures.clear()
    with pytest.raises(OperationalError):  # enqueueing is not retried: a lost answer would queue a point twice
        study.enqueue_trial({"x": 2.0})
    monkeypatch.undo()
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].params == {"x": 1.0}
    assert study.trials[0].user_attrs == {"worker": "w", "best_epoch": 2}
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.RUNNING]


@pytest.mark.postgres
def test_a_transaction_abandoned_mid_way_releases_its_locks_on_postgres(postgres, monkeypatch):
    """A worker cut off inside a transaction: the server ends its session, and another worker can take
    the trial's row lock instead of waiting until TCP notices the dead connection (hours)."""
    import uuid

    import optuna
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from vadsearch import storage as storage_module
    from vadsearch.reconnect import _transient

    monkeypatch.setattr(storage_module, "IDLE_IN_TRANSACTION_S", 1)
    cut = open_storage(POSTGRES_URL)
    study = optuna.create_study(study_name=f"idle-{uuid.uuid4().hex[:8]}", storage=cut)
    trial_id = study.ask()._trial_id
    lock = text("SELECT 1 FROM trials WHERE trial_id = :t FOR UPDATE")
    try:
        # The waiter connects first: on a loaded machine, connecting can outlast the 1 s timeout, and the
        # wait is timed from the moment the lock is taken, when the server's idle clock starts.
        with open_storage(POSTGRES_URL).engine.connect() as other:
            other.execute(text("SET lock_timeout = '20s'"))
            abandoned = cut.engine.connect()  # locks the trial's row, then goes silent
            assert abandoned.execute(text("SHOW idle_in_transaction_session_timeout")).scalar() == "1s"
            abandoned.execute(lock, {"t": trial_id})
            locked_at = time.monotonic()
            other.execute(lock, {"t": trial_id})
            held = time.monotonic() - locked_at
            other.rollback()
        assert 0.5 < held < 10, held
        # The abandoned session's next use fails as a lost connection, which a worker waits out and retries.
        with pytest.raises(DBAPIError) as lost:
            abandoned.execute(text("SELECT 1"))
        assert _transient(lost.value)
        abandoned.invalidate()
    finally:
        optuna.delete_study(study_name=study.study_name, storage=postgres)
