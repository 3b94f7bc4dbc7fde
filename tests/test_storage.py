"""Storage URLs, password masking, and the study lock, on SQLite and the real PostgreSQL."""

from __future__ import annotations

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


@pytest.mark.parametrize("url, message", [
    ("not a url", "not a database URL"),
    ("mysql://u:pw@host/db", "unsupported database"),
    ("sqlite:////no/such/dir/x.db", "does not exist"),
])
def test_bad_urls_are_one_clear_error(url, message):
    with pytest.raises(StorageError, match=message) as error:
        open_storage(url)
    assert "\n" not in str(error.value) and "pw" not in str(error.value)


def test_unreachable_postgres_names_the_host_but_not_the_password():
    url = "postgresql+psycopg://alice:s3cret-pw@127.0.0.1:1/vad"  # port 1: nothing listens
    with pytest.raises(StorageError) as error:
        open_storage(url)
    text = str(error.value)
    assert "cannot open" in text and "127.0.0.1" in text and "s3cret-pw" not in text and "\n" not in text


def test_reading_a_missing_sqlite_file_creates_nothing(tmp_path):
    with pytest.raises(StorageError, match="no study database"):
        open_storage(f"sqlite:///{tmp_path}/missing.db", create=False)
    assert list(tmp_path.iterdir()) == []


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

    from vadsearch.storage import has_waiting_trial, set_user_attrs

    study = optuna.create_study(study_name=f"attrs-{uuid.uuid4().hex[:8]}", storage=storage)
    study.enqueue_trial({"x": 1.0}, user_attrs={"point": "p"})
    assert has_waiting_trial(study)
    trial = study.ask()
    assert not has_waiting_trial(study)
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


def test_the_batched_calls_ride_out_a_lost_database_like_optunas_own(tmp_path, monkeypatch):
    import sqlite3
    import uuid

    import optuna
    from optuna.storages._rdb import storage as rdb
    from sqlalchemy.exc import OperationalError

    from vadsearch.storage import has_waiting_trial, set_user_attrs

    storage = open_storage(f"sqlite:///{tmp_path}/r.db", outage_limit=30)
    study = optuna.create_study(study_name=f"r-{uuid.uuid4().hex[:8]}", storage=storage)
    study.enqueue_trial({"x": 1.0})
    trial = study.ask()
    study.enqueue_trial({"x": 2.0})
    real, failures = rdb._create_scoped_session, []

    def flaky(*args, **kwargs):
        if len(failures) < 2:  # the database is away for the first two attempts of each call
            failures.append(1)
            raise OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rdb, "_create_scoped_session", flaky)
    assert has_waiting_trial(study) and len(failures) == 2
    failures.clear()
    set_user_attrs(trial, {"worker": "w"})
    assert len(failures) == 2
    monkeypatch.undo()
    assert study.trials[0].user_attrs == {"worker": "w"}
