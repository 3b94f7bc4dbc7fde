"""Where a stop signal lands in a worker. One that arrives while it talks to its database is acted on when the
call returns: raised inside SQLAlchemy, it left the connection inside a transaction that held SQLite's write
lock, and the worker (marking its trial interrupted) and every other worker on the file waited on it, again
and again. One that lands as a trial's heartbeat thread starts no longer keeps the process from exiting."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

import vadsearch.storage
from vadsearch import interrupts
from vadsearch.storage import open_storage


def stop_myself() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode of this thread


def test_a_stop_signal_within_a_database_call_is_raised_as_the_call_returns():
    done = []
    with interrupts.handled():
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                with interrupts.deferred():  # a storage call made by another one
                    stop_myself()
                    done.append("inner")
                done.append("outer")
        assert done == ["inner", "outer"]
        with interrupts.deferred():  # the signal was raised once, not held for the next call
            done.append("next")
    assert interrupts.stopped() == ("stopped by SIGTERM", 128 + signal.SIGTERM)


def test_the_stop_replaces_the_error_of_the_call_it_waited_for():
    with interrupts.handled():
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                stop_myself()
                raise sqlite3.OperationalError("database is locked")  # would be retried: stopping comes first


def test_a_second_stop_signal_raises_at_once(monkeypatch):
    # The user insisting, while a call waits out a busy database (up to a minute), stops it there.
    monkeypatch.setattr(interrupts, "REPEAT_WINDOW", 0.0)
    reached = []
    with interrupts.handled():
        with pytest.raises(KeyboardInterrupt):
            with interrupts.deferred():
                stop_myself()
                reached.append(1)
                stop_myself()
                reached.append(2)
    assert reached == [1]


def test_a_call_in_another_thread_holds_nothing_back():
    # Optuna's heartbeat thread writes while the main thread trains: a Ctrl-C then stops the training at once.
    entered, release = threading.Event(), threading.Event()

    def heartbeat():
        with interrupts.deferred():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=heartbeat)
    with interrupts.handled():
        thread.start()
        entered.wait(10)
        try:
            with pytest.raises(KeyboardInterrupt):
                stop_myself()
                time.sleep(5)  # not reached
        finally:
            release.set()
            thread.join()


def test_a_signal_at_any_statement_of_a_trial_leaves_the_database_unlocked(tmp_path, monkeypatch):
    # Deterministic: the signal arrives right after the k-th SQL statement of a trial, for every k. Before,
    # from the second statement on, the file stayed locked and each later call failed with "database is locked".
    monkeypatch.setattr(vadsearch.storage, "SQLITE_BUSY_TIMEOUT_S", 0.5)
    path = tmp_path / "s.db"
    storage = open_storage(f"sqlite:///{path}", heartbeat_interval=60, grace_period=120, outage_limit=1)
    study = optuna.create_study(study_name="s", storage=storage)
    statements = {"seen": 0, "signal_at": None}

    @event.listens_for(storage.engine, "after_cursor_execute")
    def count(*_):
        if threading.current_thread() is not threading.main_thread():
            return  # Optuna's heartbeat thread: its statements come at no fixed place
        statements["seen"] += 1
        if statements["seen"] == statements["signal_at"]:
            stop_myself()

    def objective(trial):
        for step in range(3):
            trial.report(step, step)
        return 1.0

    study.optimize(objective, n_trials=1)  # the first trial of a study takes a few statements more
    statements["seen"] = 0
    study.optimize(objective, n_trials=1)
    per_trial = statements["seen"]
    assert per_trial > 10
    with interrupts.handled():
        for k in range(1, per_trial + 1):
            interrupts._first = None  # a fresh stop each time, not a copy of the last one
            statements.update(seen=0, signal_at=k)
            started = time.monotonic()
            try:
                study.optimize(objective, n_trials=1)
            except KeyboardInterrupt:
                pass
            except UnboundLocalError as exc:
                # Optuna's _run_trial does this to a Ctrl-C raised by its final write; the worker reads it as
                # the stop it is (test_worker.py).
                assert isinstance(exc.__context__, KeyboardInterrupt)
            else:
                pytest.fail(f"the signal after statement {k} did not stop the study")
            assert time.monotonic() - started < 2, f"statement {k}: stopping waited on the database"
            other = sqlite3.connect(path, timeout=0.1, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # fails at once if any connection kept the write lock
                other.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                pytest.fail(f"a signal after statement {k} left the database locked: {exc}")
            finally:
                other.close()


LEAKED_HEARTBEAT = textwrap.dedent("""
    import sys
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread
    from vadsearch.storage import open_storage

    storage = open_storage(sys.argv[1], heartbeat_interval=1, grace_period=2, outage_limit=5)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    # Started, then never stopped: what a Ctrl-C between its start and Optuna's `with` around the trial leaves.
    get_heartbeat_thread(trial._trial_id, storage).start()
    print("exiting", flush=True)
""")


def test_a_heartbeat_thread_that_was_never_stopped_lets_the_worker_exit(tmp_path):
    # Before, it recorded heartbeats forever: the worker never exited, and its trial never went stale.
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", LEAKED_HEARTBEAT, f"sqlite:///{tmp_path}/s.db"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and "exiting" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 15


# A worker as `launch` sees it: on Ctrl-C it writes to the study (its trial's interrupted state), then exits;
# exit 3 if the database stayed locked.
WRITING_WORKER = textwrap.dedent("""
    import signal, sqlite3, sys, time

    def stop(*_):
        db = sqlite3.connect(sys.argv[1], timeout=0.5, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("UPDATE studies SET study_name = study_name")
            db.execute("COMMIT")
        except sqlite3.OperationalError:
            sys.exit(3)
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_stop_signal_during_launchs_progress_read_leaves_its_workers_free_to_write(tmp_path, tiny_csv):
    # `launch` reads the study each second for its progress bar. A Ctrl-C raised inside that read kept SQLite's
    # shared lock while `launch` stopped its workers: none could write its trial's interrupted state, each
    # waited out the busy timeout and its retries (minutes), and `launch` waited for them.
    from vadsearch import cli, launch
    from vadsearch.studyfile import load_study_file
    from vadsearch.worker import Worker, WorkerOptions

    from search_helpers import write_study

    spec = load_study_file(write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search="hidden_size = [4]",
                                       max_epochs=1))
    path = tmp_path / "s.db"
    Worker(spec, WorkerOptions(storage=f"sqlite:///{path}", artifacts=tmp_path / "art", device="cpu",
                               progress=False)).run()
    tick = cli._progress_bar(spec, f"sqlite:///{path}")
    statements = {"seen": 0, "signal_at": None}

    def count(*_):
        statements["seen"] += 1
        if statements["seen"] == statements["signal_at"]:
            stop_myself()

    event.listen(Engine, "after_cursor_execute", count)
    try:
        tick()  # opens the storage
        statements["seen"] = 0
        tick()
        per_tick = statements["seen"]
        assert per_tick >= 2  # a kept study reads what changed: two statements
        for k in range(1, per_tick + 1):
            worker = subprocess.Popen([sys.executable, "-c", WRITING_WORKER, str(path)], stdout=subprocess.PIPE,
                                      text=True)
            try:
                assert worker.stdout.readline() == "ready\n"
                statements.update(seen=0, signal_at=k)
                with interrupts.handled(), pytest.raises(KeyboardInterrupt):
                    launch.wait([worker], on_tick=tick, tick=0.01)
            finally:
                worker.kill() if worker.poll() is None else None
                worker.wait()
            assert worker.returncode == 0, f"a signal after statement {k} of the read left the study locked"
    finally:
        event.remove(Engine, "after_cursor_execute", count)


def test_a_stop_point_raises_a_held_signal_and_nothing_else():
    with interrupts.handled():
        with interrupts.deferred():
            interrupts.stop_point()  # nothing held: goes on
            stop_myself()
            with pytest.raises(KeyboardInterrupt):
                interrupts.stop_point()
        # Raised once: the block's end raises nothing more.


# A worker whose torch import is hit by SIGTERM (the finder runs inside the import machinery).
STOPPED_WHILE_TORCH_LOADS = textwrap.dedent("""
    import importlib.abc, os, signal, sys
    from vadsearch import interrupts
    from vadsearch.studyfile import load_study_file
    from vadsearch.worker import Worker, WorkerOptions

    class StopDuringImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "vadsearch.train":
                os.kill(os.getpid(), signal.SIGTERM)
            return None

    sys.meta_path.insert(0, StopDuringImport())
    options = WorkerOptions(storage=sys.argv[2], artifacts=sys.argv[3], device="cpu", progress=False)
    with interrupts.handled():
        summary = Worker(load_study_file(sys.argv[1]), options).run()
    print(summary.stopped, "vadsearch.train" in sys.modules)
""")


def test_a_stop_signal_while_torch_loads_waits_for_the_import(tmp_path, tiny_csv):
    # Raised inside torch's import, it could abort the process (std::terminate, exit -6).
    from search_helpers import write_study

    study_file = write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search="hidden_size = [4]")
    done = subprocess.run([sys.executable, "-c", STOPPED_WHILE_TORCH_LOADS, str(study_file),
                           f"sqlite:///{tmp_path}/s.db", str(tmp_path / "art")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["interrupted", "True"]  # stopped, after the import had finished


# The command line hit by a stop signal while typer builds its commands, before any command begins.
STOPPED_WHILE_STARTING = textwrap.dedent("""
    import os, signal, sys
    import typer.main
    from vadsearch import cli

    real, signum = typer.main.get_command, getattr(signal, sys.argv[1])

    def building(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    typer.main.get_command = building
    sys.argv = ["vadsearch", "status", "--storage", "sqlite:///" + sys.argv[2]]
    cli.main()
""")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_signal_before_the_command_begins_exits_quietly(tmp_path, signum):
    # `launch` passes a Ctrl-C on to workers that may still be starting: their logs held a traceback.
    done = subprocess.run([sys.executable, "-c", STOPPED_WHILE_STARTING, signum.name, str(tmp_path / "none.db")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signum, done.stderr
    assert done.stderr == "" and done.stdout == ""


def test_once_the_command_begins_it_handles_stop_signals_its_own_way():
    from typer.testing import CliRunner

    from vadsearch.cli import app

    interrupts.while_starting()
    assert signal.getsignal(signal.SIGTERM) == interrupts._exit_at_once
    CliRunner().invoke(app, ["status", "--storage", "sqlite:////nonexistent/x.db"])
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_a_stop_signal_as_a_trial_starts_leaves_no_heartbeat_thread_behind(tmp_path, tiny_csv, monkeypatch):
    # Raised inside Optuna as it started the trial's heartbeat thread, the stop skipped the `with` that stops
    # that thread: it beat on, and the worker's process did not exit until its next beat.
    from optuna.storages._heartbeat import HeartbeatThread
    from optuna.trial import TrialState

    from search_helpers import write_study
    from vadsearch.studyfile import load_study_file
    from vadsearch.worker import Worker, WorkerOptions

    real_start = HeartbeatThread.start

    def start(self):
        real_start(self)
        stop_myself()

    monkeypatch.setattr(HeartbeatThread, "start", start)
    spec = load_study_file(write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search="hidden_size = [4]"))
    options = WorkerOptions(storage=f"sqlite:///{tmp_path}/s.db", artifacts=tmp_path / "art", device="cpu",
                            progress=False, heartbeat_interval=30)
    with interrupts.handled():
        assert Worker(spec, options).run().stopped == "interrupted"
    beating = [t for t in threading.enumerate() if getattr(t, "_target", None) is HeartbeatThread._record_heartbeat]
    assert beating == []
    trial = optuna.load_study(study_name="s", storage=options.storage).trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"] is True
