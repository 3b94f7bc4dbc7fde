"""Workers in-process on SQLite: the queue of points, retries, interruption, joining rules."""

from __future__ import annotations

import dataclasses
import json
import shutil
import logging
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import vadsearch.models.bert
import vadsearch.report
import vadsearch.train
from search_helpers import points_finished, synchronous_checkpoints, write_study
from vadsearch.data import load_corpus
from vadsearch.errors import ConfigError, StudyFileError
from vadsearch.storage import open_storage
from vadsearch.studyfile import load_study_file
from vadsearch.worker import Worker, WorkerOptions, point_key, reconcile, survey


@pytest.fixture
def setup(tmp_path, tiny_csv):
    def make(search: str = "hidden_size = [4, 8]\nlr = [0.001, 0.01]", **kwargs):
        spec = load_study_file(write_study(tmp_path / "s.toml", name="s", data=tiny_csv, search=search, **kwargs))
        options = WorkerOptions(storage=f"sqlite:///{tmp_path}/s.db", artifacts=tmp_path / "art", device="cpu",
                                progress=False, grace_period=2, heartbeat_interval=1)
        return spec, options

    return make


def load(options, name="s"):
    return optuna.load_study(study_name=name, storage=open_storage(options.storage, create=False))


def test_grid_runs_every_point_once_and_a_rerun_runs_nothing(setup, caplog):
    spec, options = setup()
    caplog.set_level(logging.INFO, logger="vadsearch.worker")
    worker = Worker(spec, options)
    summary = worker.run()
    assert f"worker {worker.name} on study s ({options.storage}), device cpu" in caplog.messages
    assert summary.stopped == "finished"
    assert len(summary.trials) == 4
    study = load(options)
    assert sorted(points_finished(study)) == sorted(point_key(p) for p in spec.grid())
    assert set(points_finished(study).values()) == {1}
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert {t.number for t in complete} == set(summary.trials)
    for trial in complete:
        assert trial.value == trial.user_attrs["dev"]["mse"]
        assert sorted(trial.intermediate_values) == [1, 2]  # per-epoch dev, readable by stock Optuna
        assert trial.user_attrs["epochs_done"] == 2
        assert trial.user_attrs["test"]["n"] == 20

    again = Worker(spec, options).run()
    assert (again.stopped, again.trials) == ("finished", [])
    assert len(load(options).trials) == 4


IDENTITY = ("worker", "config", "checkpoint_dir", "grace_period_s")


def test_a_queued_trial_shows_who_runs_it_from_its_start_without_a_write_of_its_own(setup, monkeypatch):
    import vadsearch.worker as worker_module

    spec, options = setup("hidden_size = [4, 8]\n")
    real_train, seen = vadsearch.train.train, []

    def watched(config, *args, **kwargs):  # what another process reads while the trial trains
        running = load(options).get_trials(states=(TrialState.RUNNING,))
        seen.append({k: running[0].user_attrs.get(k) for k in IDENTITY})
        return real_train(config, *args, **kwargs)

    identity_writes = []
    real_write = worker_module.set_user_attrs
    monkeypatch.setattr(worker_module, "set_user_attrs", lambda *a: identity_writes.append(a) or real_write(*a))
    monkeypatch.setattr(vadsearch.train, "train", watched)
    worker = Worker(spec, options)
    assert worker.run().stopped == "finished"
    assert identity_writes == []  # written with the RUNNING state, in Optuna's own transaction
    complete = sorted(load(options).get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    assert seen == [{k: t.user_attrs[k] for k in IDENTITY} for t in complete]
    assert [s["config"]["hidden_size"] for s in seen] == [4, 8] and seen[0]["worker"] == worker.name
    assert {s["grace_period_s"] for s in seen} == {options.grace_period}  # what `status` judges its silence by
    assert all(s["checkpoint_dir"].endswith(spec.config_for(s["config"]).fingerprint()) for s in seen)


def test_n_trials_stops_early_and_the_next_worker_finishes(setup):
    spec, options = setup()
    first = Worker(spec, WorkerOptions(**{**options.__dict__, "n_trials": 1})).run()
    assert (first.stopped, len(first.trials)) == ("n-trials", 1)
    rest = Worker(spec, options).run()
    assert (rest.stopped, len(rest.trials)) == ("finished", 3)
    assert set(points_finished(load(options)).values()) == {1}


def test_a_failing_point_is_retried_then_given_up_while_the_others_finish(setup, monkeypatch):
    spec, options = setup('hidden_size = [4, 8]\n', study="max_retries = 1")
    real_train = vadsearch.train.train

    def flaky(config, *args, **kwargs):
        if config.hidden_size == 8:
            # as torch raises it from C++: the message, then the frames, which stay out of the reason
            raise RuntimeError("CUDA out of memory (simulated)\nException raised from malloc at alloc.cpp:42 (most "
                               "recent call first):\nframe #0: c10::Error::Error(...) + 0x9c")
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(vadsearch.train, "train", flaky)
    summary = Worker(spec, options).run()
    assert summary.stopped == "finished"
    study = load(options)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2  # the first try and one retry
    assert all(t.params == {"hidden_size": 8} for t in failed)
    assert all(t.user_attrs["fail_reason"] == "RuntimeError: CUDA out of memory (simulated)" for t in failed)
    assert points_finished(study) == {point_key({"hidden_size": 4}): 1}


def ctrl_c_after_epoch(last: int):
    """A `train` that is interrupted by Ctrl-C right after epoch `last` (its checkpoint written)."""
    real_train = vadsearch.train.train

    def interrupted(config, corpus, **kwargs):
        on_epoch = kwargs.pop("on_epoch")

        def stop(epoch):
            on_epoch(epoch)
            if epoch.epoch == last:
                raise KeyboardInterrupt

        return real_train(config, corpus, on_epoch=stop, **kwargs)

    return interrupted


def interrupt_after(epoch: int, spec, options, monkeypatch) -> None:
    """Run a worker whose first trial is stopped by Ctrl-C right after `epoch` (its checkpoint written)."""
    real_train = vadsearch.train.train
    synchronous_checkpoints(monkeypatch)
    monkeypatch.setattr(vadsearch.train, "train", ctrl_c_after_epoch(epoch))
    assert Worker(spec, options).run().stopped == "interrupted"
    monkeypatch.setattr(vadsearch.train, "train", real_train)


def test_ctrl_c_leaves_the_trial_resumable_without_spending_a_retry(setup, monkeypatch, caplog):
    spec, options = setup('hidden_size = [4]\n', max_epochs=3, study="max_retries = 0")
    real_train = vadsearch.train.train
    synchronous_checkpoints(monkeypatch)
    monkeypatch.setattr(vadsearch.train, "train", ctrl_c_after_epoch(2))
    assert Worker(spec, options).run().stopped == "interrupted"
    study = load(options)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs["interrupted"] is True

    monkeypatch.setattr(vadsearch.train, "train", real_train)
    caplog.set_level(logging.INFO, logger="vadsearch.worker")
    assert Worker(spec, options).run().stopped == "finished"
    resumed = load(options).trials[1]
    assert resumed.state == TrialState.COMPLETE
    assert resumed.user_attrs["resumed_from"] == 2  # continued from its epoch-2 checkpoint
    assert sorted(resumed.intermediate_values) == [1, 2, 3]  # restored epochs reported, none lost

    # The worker's log says where the trial resumed, before the epoch it trains (a BERT epoch takes minutes),
    # and shows that epoch, not the restored ones.
    lines = [r.getMessage() for r in caplog.records if r.name == "vadsearch.worker"]
    epochs = [line for line in lines if line.startswith("trial 1: epoch")]
    assert len(epochs) == 1 and epochs[0].startswith("trial 1: epoch 3/3  loss ")
    assert lines.index("trial 1: resumed from its epoch-2 checkpoint") == lines.index(epochs[0]) - 1
    assert not [line for line in caplog.messages if "holds no checkpoint" in line]
    assert f"dev {resumed.intermediate_values[3]:.4f}" in epochs[0]


def test_a_stop_signal_during_a_trials_final_write_stops_the_worker_and_keeps_the_result(setup):
    # Raised as that write returned, inside Optuna's _run_trial, the stop became an UnboundLocalError of
    # Optuna's own and the worker failed with it; it is now held until the trial is stored and settled.
    import os
    import signal
    import threading

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from vadsearch import interrupts

    spec, options = setup("hidden_size = [4, 8]\n", max_epochs=1)

    def on_statement(conn, cursor, statement, parameters, context, executemany):
        if (threading.current_thread() is threading.main_thread() and statement.startswith("UPDATE trials")
                and "COMPLETE" in str(parameters)):
            os.kill(os.getpid(), signal.SIGTERM)

    event.listen(Engine, "after_cursor_execute", on_statement)
    try:
        with interrupts.handled():
            summary = Worker(spec, options).run()
    finally:
        event.remove(Engine, "after_cursor_execute", on_statement)
    assert summary.stopped == "interrupted"
    trials = load(options).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.WAITING]
    # Settled before the stop: --keep best left its best weights alone, as after any finished trial.
    kept = sorted(p.name for p in Path(trials[0].user_attrs["checkpoint_dir"]).iterdir())
    assert kept == ["best-0001.pt"], kept


def test_a_stop_before_training_begins_is_an_interruption_not_a_lost_worker(setup, monkeypatch):
    # A Ctrl-C while the trial was still being set up left a FAIL without `interrupted`: counted as a lost
    # worker (a stale retry spent), its failure told as "stopped sending heartbeats".
    from vadsearch import failures
    from vadsearch.studyfile import StudySpec

    spec, options = setup("hidden_size = [4]\n", max_epochs=1)

    def stopped(self, trial):
        raise KeyboardInterrupt

    monkeypatch.setattr(StudySpec, "suggest", stopped)
    assert Worker(spec, options).run().stopped == "interrupted"
    monkeypatch.undo()
    trials = load(options).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert failures.kind(trials[0].user_attrs) == failures.INTERRUPTED


def test_a_starting_worker_reads_the_study_outside_the_lock_that_other_workers_wait_on(setup, monkeypatch):
    # Its first read is of every trial: a minute at 30,000, during which every other starting worker waited.
    import contextlib

    import vadsearch.worker
    from vadsearch.reconnect import ReconnectingRDBStorage

    spec, options = setup("hidden_size = [4, 8]\n", max_epochs=1)
    assert Worker(spec, options).run().stopped == "finished"
    real_lock, real_read = vadsearch.worker.study_lock, ReconnectingRDBStorage._get_trials
    held, read_under_lock = [False], []

    @contextlib.contextmanager
    def lock(*args, **kwargs):
        with real_lock(*args, **kwargs):
            held[0] = True
            try:
                yield
            finally:
                held[0] = False

    def read(self, *args, **kwargs):
        found = real_read(self, *args, **kwargs)
        if held[0]:
            read_under_lock.append(len(found))
        return found

    monkeypatch.setattr(vadsearch.worker, "study_lock", lock)
    monkeypatch.setattr(ReconnectingRDBStorage, "_get_trials", read)
    assert Worker(spec, options).run().stopped == "finished"
    assert read_under_lock and set(read_under_lock) == {0}  # read inside the lock: only what changed


def test_an_interrupted_configuration_resumes_before_the_untouched_ones(setup, monkeypatch):
    # Stopped every evening, a grid resumed yesterday's configuration last: queued again behind all the
    # others, while its checkpoints waited on disk and each evening began another.
    spec, options = setup("hidden_size = [4, 8, 16]\n", max_epochs=2)
    interrupt_after(1, spec, options, monkeypatch)
    before = load(options).trials
    assert [t.state for t in before] == [TrialState.FAIL] + [TrialState.WAITING] * 3
    summary = Worker(spec, dataclasses.replace(options, n_trials=1)).run()
    assert summary.trials == [3]  # the requeued one, not trial 1
    trial = load(options).trials[3]
    assert trial.params == before[0].params and trial.user_attrs["resumed_from"] == 1
    assert Worker(spec, options).run().stopped == "finished"
    assert sorted(points_finished(load(options)).values()) == [1, 1, 1]


def test_a_worker_whose_artifacts_lack_the_checkpoints_of_a_begun_configuration_says_so(setup, monkeypatch,
                                                                                         caplog, tmp_path):
    # Run from another directory (a relative --artifacts), or with another --artifacts: it trained the
    # configuration again from epoch 1 without a word, the first worker's checkpoints left on disk.
    spec, options = setup('hidden_size = [4]\n', max_epochs=3)
    interrupt_after(2, spec, options, monkeypatch)
    caplog.set_level(logging.WARNING, logger="vadsearch.worker")
    elsewhere = dataclasses.replace(options, artifacts=tmp_path / "elsewhere")
    assert Worker(spec, elsewhere).run().stopped == "finished"
    [said] = [line for line in caplog.messages if "holds no checkpoint" in line]
    assert said.startswith(f"trial 1: trial 0 of this configuration trained 2 epoch(s), but {tmp_path}/elsewhere/s/")
    assert f"(it wrote them to {tmp_path}/art/s/" in said and "training starts over" in said
    assert load(options).trials[1].user_attrs["resumed_from"] == 0


def test_a_study_of_the_same_name_in_another_database_cannot_take_over_its_checkpoints(setup, monkeypatch,
                                                                                      tmp_path):
    # $VADSEARCH_STORAGE forgotten in a new shell: a new study resumed from the first one's checkpoints,
    # then its retention deleted them, and the first study's retry trained from epoch 1 again.
    spec, options = setup('hidden_size = [4]\n', max_epochs=3)
    interrupt_after(2, spec, options, monkeypatch)
    checkpoints = sorted(p.name for p in (tmp_path / "art" / "s").glob("*/*.pt"))
    other = dataclasses.replace(options, storage=f"sqlite:///{tmp_path}/other.db")
    with pytest.raises(StudyFileError, match=rf"^{tmp_path}/art/s holds the checkpoints of another study named 's' "
                                             rf"\(in sqlite:///{tmp_path}/s.db\), not the one in sqlite:///"
                                             rf"{tmp_path}/other.db: pass that --storage, another --artifacts"):
        Worker(spec, other).run()
    assert sorted(p.name for p in (tmp_path / "art" / "s").glob("*/*.pt")) == checkpoints
    with pytest.raises(KeyError):
        load(other)  # refused before the study was made there
    # `launch` says so before its workers start (each would fail alone: "see logs").
    from typer.testing import CliRunner

    from vadsearch.cli import app

    result = CliRunner().invoke(app, ["launch", str(spec.path), "--storage", other.storage, "--artifacts",
                                      str(tmp_path / "art"), "--device", "cpu", "--log-dir", str(tmp_path / "logs")])
    assert result.exit_code == 2 and "holds the checkpoints of another study named 's'" in result.stderr
    assert not (tmp_path / "logs").exists()
    # With its own artifact directory it runs; the first study resumes from its own checkpoints.
    assert Worker(spec, dataclasses.replace(other, artifacts=tmp_path / "art2")).run().stopped == "finished"
    assert Worker(spec, options).run().stopped == "finished"
    assert load(options).trials[1].user_attrs["resumed_from"] == 2


def test_a_trial_stopped_after_its_last_epoch_says_it_resumed(setup, monkeypatch, caplog):
    # Stopped while it scored the test split: the retry trains nothing, and said nothing of where it began.
    spec, options = setup('hidden_size = [4]\n', max_epochs=2)
    interrupt_after(2, spec, options, monkeypatch)
    caplog.set_level(logging.INFO, logger="vadsearch.worker")
    assert Worker(spec, options).run().stopped == "finished"
    lines = [r.getMessage() for r in caplog.records if r.name == "vadsearch.worker"]
    assert "trial 1: resumed from its epoch-2 checkpoint" in lines
    assert not [line for line in lines if line.startswith("trial 1: epoch")]
    assert load(options).trials[1].user_attrs["resumed_from"] == 2


def test_ctrl_c_before_the_first_heartbeat_still_requeues_the_trial(setup, monkeypatch):
    # Between a trial's start and Optuna's handling of its objective lies the start of its heartbeat
    # thread: Ctrl-C there used to leave the trial RUNNING, with no heartbeat to go stale, for ever.
    spec, options = setup('hidden_size = [4]\n', max_epochs=1, study="max_retries = 0")
    real = optuna.study._optimize.get_heartbeat_thread

    def interrupted(trial_id, storage):
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.study._optimize, "get_heartbeat_thread", interrupted)
    assert Worker(spec, options).run().stopped == "interrupted"
    study = load(options)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[0].user_attrs["interrupted"] is True

    monkeypatch.setattr(optuna.study._optimize, "get_heartbeat_thread", real)
    assert Worker(spec, options).run().stopped == "finished"
    assert points_finished(load(options)) == {point_key({"hidden_size": 4}): 1}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_worker_died_before_its_first_heartbeat_goes_stale_too(setup, tmp_path):
    # SIGKILL in that same moment: no worker is left to say so, and no heartbeat ever goes stale.
    spec, options = setup('hidden_size = [4, 8]\n', max_epochs=1, study="max_retries = 0")
    assert Worker(spec, dataclasses.replace(options, n_trials=1)).run().stopped == "n-trials"
    storage = open_storage(options.storage, heartbeat_interval=1, grace_period=2, outage_limit=5)  # a worker's
    orphaned = optuna.load_study(study_name="s", storage=storage).ask()  # RUNNING, no heartbeat: left behind
    fresh = optuna.load_study(study_name="s", storage=storage).ask()
    with storage.engine.begin() as connection:  # started before the grace period (stored as naive UTC)
        from sqlalchemy import text

        then = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(seconds=30)
        connection.execute(text("UPDATE trials SET datetime_start = :then WHERE trial_id = :id"),
                           {"then": then, "id": orphaned._trial_id})
    stale = storage._get_stale_trial_ids(load(options)._study_id)
    assert stale == [orphaned._trial_id]  # the one just started is left alone
    storage.set_trial_state_values(fresh._trial_id, TrialState.FAIL)

    summary = Worker(spec, options).run()  # used to wait for the orphan for ever
    assert summary.stopped == "finished"
    study = load(options)
    assert study.trials[orphaned.number].state == TrialState.FAIL
    assert sorted(points_finished(study).values()) == [1, 1]


@pytest.mark.parametrize("search", ['trainable_layers = ["last-2", "last-99"]', 'lr = [0.001]'])
def test_a_layer_window_the_encoder_lacks_stops_the_worker_before_any_trial(tmp_path, tiny_csv, tiny_bert_dir,
                                                                            search):
    fixed = {} if "trainable_layers" in search else {"trainable_layers": "5:9"}
    spec = load_study_file(write_study(tmp_path / "b.toml", name="b", data=tiny_csv, search=search, model="bert",
                                       model_name=tiny_bert_dir, **fixed))
    options = WorkerOptions(storage=f"sqlite:///{tmp_path}/b.db", artifacts=tmp_path / "art", device="cpu",
                            progress=False)
    with pytest.raises(ConfigError, match="does not fit a model of 4 layers"):
        Worker(spec, options).run()
    assert not (tmp_path / "b.db").exists()  # not three failed attempts per configuration


def test_a_sampled_study_whose_model_axis_reaches_bert_checks_the_encoder_before_any_trial(tmp_path, tiny_csv):
    # Only the default [train] model (an LSTM) was checked: every trial then failed on the missing encoder.
    path = tmp_path / "m.toml"
    path.write_text(f'[study]\nsampler = "random"\nmax_trials = 2\n[data]\npath = {json.dumps(str(tiny_csv))}\n'
                    f'[train]\nmodel_name = {json.dumps(str(tmp_path / "no-such-encoder"))}\n'
                    '[search]\nmodel = ["bert"]\nlr = {low = 0.0001, high = 0.01, log = true}\n')
    options = WorkerOptions(storage=f"sqlite:///{tmp_path}/m.db", artifacts=tmp_path / "art", device="cpu",
                            progress=False)
    with pytest.raises(ConfigError, match="cannot load the tokenizer"):
        Worker(load_study_file(path), options).run()
    assert not (tmp_path / "m.db").exists()


def test_an_encoder_no_point_trains_with_is_never_loaded(setup, monkeypatch):
    # An LSTM study that names a BERT encoder (fixed, or a one-value axis) used to fetch its tokenizer first.
    import vadsearch.encoding

    monkeypatch.setattr(vadsearch.encoding, "load_tokenizer", lambda name: pytest.fail(f"loaded {name}"))
    spec, options = setup('hidden_size = [4]\nmodel_name = ["no-such-encoder"]')
    assert Worker(spec, options).run().stopped == "finished"
    # A BERT study that searches its encoders: the default one, bert-base-uncased, trains no point.
    loaded = []
    monkeypatch.setattr(vadsearch.encoding, "load_tokenizer", lambda name: loaded.append(name))
    monkeypatch.setattr(vadsearch.models.bert, "check_trainable_layers", lambda name, window: None)
    spec, options = setup('model_name = ["enc-a", "enc-b"]', model="bert")
    Worker(spec, dataclasses.replace(options, n_trials=0)).preflight()
    assert sorted(loaded) == ["enc-a", "enc-b"]


def test_a_worker_that_waits_for_a_killed_workers_trial_says_so_once(setup, caplog):
    # It sat silent until the heartbeat went stale (a grace period: a minute by default) and looked hung.
    spec, options = setup("hidden_size = [4]")
    Worker(spec, dataclasses.replace(options, n_trials=0)).run()  # creates the study and queues the point
    storage = open_storage(options.storage, heartbeat_interval=1, grace_period=2)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna's: ask() is no optimize(), which beats
        killed = optuna.load_study(study_name="s", storage=storage).ask()  # its worker then died
    storage.record_heartbeat(killed._trial_id)
    caplog.set_level(logging.INFO, logger="vadsearch.worker")
    assert Worker(spec, options).run().stopped == "finished"
    said = [m for m in caplog.messages if m.startswith("waiting:")]
    assert said == [f"waiting: every configuration left runs on another worker (trial {killed.number}); one whose "
                    "worker stopped is taken over once its heartbeat is 2 s old"]  # once, not at every poll
    assert load(options).trials[killed.number].state == TrialState.FAIL


def test_survey_classifies_failures_by_cause(setup):
    spec, _ = setup('hidden_size = [4, 8, 16]\n', study="max_retries = 1")
    key = point_key({"hidden_size": 4})

    def failed(**attrs):
        return optuna.create_trial(state=TrialState.FAIL, params={}, distributions={},
                                   user_attrs={"point": key, **attrs})

    trials = [failed(fail_reason="x"), failed(interrupted=True), failed()]
    point = survey(spec, trials, max_stale_retries=5)[key]
    assert (point.failures, point.stale, point.settled, point.active) == (1, 1, False, False)
    point = survey(spec, trials + [failed(fail_reason="y")], max_stale_retries=5)[key]
    assert point.settled  # max_retries = 1 spent
    point = survey(spec, [failed(), failed()], max_stale_retries=1)[key]
    assert point.settled
    orphan = optuna.create_trial(state=TrialState.PRUNED, value=None, params={}, distributions={},
                                 user_attrs={"orphan": True})
    assert set(survey(spec, [orphan], max_stale_retries=1)) == {point_key({"hidden_size": h}) for h in (4, 8, 16)}


def test_reconcile_never_queues_a_point_twice(setup, tmp_path):
    spec, options = setup()
    storage = open_storage(options.storage)
    study = optuna.create_study(study_name="s", storage=storage)
    assert reconcile(study, spec, 10) == 4
    assert reconcile(study, spec, 10) == 0
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 4


def test_a_study_left_undescribed_by_its_creator_is_described_by_the_next_worker(setup, monkeypatch):
    # Ctrl-C (or a kill, an outage) between creating the study and storing its description left a study
    # that any study file could join: another search space ran into it, and `status` showed "(None, None)".
    spec, options = setup()
    real = optuna.Study.set_user_attr

    def interrupted(self, key, value):
        raise KeyboardInterrupt

    monkeypatch.setattr(optuna.Study, "set_user_attr", interrupted)
    assert Worker(spec, options).run().stopped == "interrupted"
    monkeypatch.setattr(optuna.Study, "set_user_attr", real)
    assert "vadsearch" not in load(options).user_attrs

    changed, _ = setup("hidden_size = [4, 16]\nlr = [0.001, 0.01]")
    Worker(spec, dataclasses.replace(options, n_trials=0)).run()
    with pytest.raises(StudyFileError, match=r"other settings \(\[search\] hidden_size was \[4, 8\], now \[4, 16\]\)"):
        Worker(changed, options).run()
    assert Worker(spec, options).run().stopped == "finished"
    assert sorted(points_finished(load(options))) == sorted(point_key(p) for p in spec.grid())


def test_joining_with_another_search_space_or_other_data_is_refused_before_any_write(setup, tmp_path):
    spec, options = setup()
    Worker(spec, WorkerOptions(**{**options.__dict__, "n_trials": 1})).run()
    before = len(load(options).trials)

    # Each axis that differs, stored and now, as a study file writes it: "use the original file" days later.
    for search, said in [("hidden_size = [4, 16]\nlr = [0.001, 0.01]", "[search] hidden_size was [4, 8], now [4, 16])"),
                         ("hidden_size = [8, 4]\nlr = [0.001, 0.01]",
                          "[search] hidden_size was [4, 8], now [8, 4] (the same values in another order))")]:
        changed, _ = setup(search)
        with pytest.raises(StudyFileError, match=re.escape(f"other settings ({said}")):
            Worker(changed, options).run()
    # A smoke run's budget is no study's budget: its finished trials would count as the real ones.
    for train, said in [({"max_epochs": 3}, "[train] max_epochs was 2, now 3"),
                        ({"patience": 1, "dropout": 0.3}, "[train] dropout was 0.1, now 0.3; "
                                                          "[train] patience was 0, now 1")]:
        with pytest.raises(StudyFileError, match=re.escape(said)):
            Worker(spec.with_overrides(train=train), options).run()
    # A larger evaluation batch for a larger GPU changes speed, not scores: the same study. So do options no
    # run of this study reads (internal embeddings read no vector file; an LSTM no encoder); they used to be
    # refused as "other settings" although every run was the same.
    for unread in ({"eval_batch_size": 7}, {"vectors": "x.txt", "freeze_embeddings": True, "model_name": "x/y"}):
        Worker(spec.with_overrides(train=unread), dataclasses.replace(options, n_trials=0)).run()

    other = tmp_path / "other.csv"
    other.write_text(spec.data_path.read_text().replace("tiny_0000", "tiny_x"))
    with pytest.raises(StudyFileError, match=r"was run on another data file \(sha256 [0-9a-f]{12}\): pass the same"):
        Worker(spec.with_overrides(data_path=other), options).run()
    assert len(load(options).trials) == before


def test_a_subset_drawn_otherwise_is_named_as_such(setup, tmp_path):
    spec, options = setup(study="seed = 1")
    spec = dataclasses.replace(spec, data_subset=(20, 5, 5))
    Worker(spec, dataclasses.replace(options, n_trials=0)).run()
    with pytest.raises(StudyFileError, match=re.escape(
            "was run on other sentences (subset 20/5/5 drawn with seed 1; this file: subset 20/5/6 drawn with "
            "seed 1): use the original [data] subset and [study] seed")):
        Worker(dataclasses.replace(spec, data_subset=(20, 5, 6)), options).run()
    # The same subset of another file: the file it was drawn from is named by its checksum.
    from vadsearch.data import file_sha256

    other = tmp_path / "other.csv"
    other.write_text(spec.data_path.read_text().replace("tiny_0000", "tiny_x"))
    with pytest.raises(StudyFileError, match=re.escape(
            f"was run on another data file (sha256 {file_sha256(spec.data_path)[:12]}): pass the same")):
        Worker(spec.with_overrides(data_path=other), options).run()


def test_a_subset_larger_than_the_file_says_so(setup, caplog):
    from vadsearch.worker import study_corpus

    spec, _ = setup()
    with caplog.at_level("WARNING", logger="vadsearch.worker"):
        corpus = study_corpus(dataclasses.replace(spec, data_subset=(100, 5, 30)))
    assert [len(corpus.splits[s]) for s in ("train", "dev", "test")] == [60, 5, 20]
    [record] = caplog.records
    assert record.getMessage().endswith("[data] subset asks for 100 train sentences, the file has 60; "
                                        "30 test sentences, the file has 20: all of them are used")


def test_study_attrs_describe_the_study(setup):
    spec, options = setup()
    Worker(spec, WorkerOptions(**{**options.__dict__, "n_trials": 1})).run()
    described = load(options).user_attrs["vadsearch"]
    assert described["name"] == "s" and described["sampler"] == "grid"
    from vadsearch.data import load_corpus

    assert described["data_sha256"] == load_corpus(spec.data_path).sha256
    assert json.loads(json.dumps(described)) == described


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "other configuration"])
def test_a_damaged_checkpoint_is_reported_once_and_the_trial_falls_back(setup, monkeypatch, caplog, tmp_path, damage):
    spec, options = setup('hidden_size = [4]\n', max_epochs=3)
    real_train = vadsearch.train.train
    synchronous_checkpoints(monkeypatch)
    monkeypatch.setattr(vadsearch.train, "train", ctrl_c_after_epoch(2))
    Worker(spec, options).run()
    monkeypatch.setattr(vadsearch.train, "train", real_train)
    [run_dir] = [p for p in (tmp_path / "art" / "s").iterdir() if p.is_dir()]
    newest = run_dir / "epoch-0002.pt"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:100])
    elif damage == "random bytes":
        newest.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        other = real_train(spec.config_for({"hidden_size": 8}).replace(max_epochs=2), load_corpus(spec.data_path),
                           run_dir=tmp_path / "other")
        assert other.best_epoch
        for name in ("epoch-0001.pt", "epoch-0002.pt"):
            (run_dir / name).write_bytes((tmp_path / "other" / name).read_bytes())

    caplog.set_level(logging.WARNING, logger="vadsearch.checkpoint")
    assert Worker(spec, options).run().stopped == "finished"
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    done = load(options).get_trials(states=(TrialState.COMPLETE,))[0]
    if damage == "other configuration":
        # Both foreign, one warning for the two: back to epoch 0.
        assert len(rejected) == 1 and done.user_attrs["resumed_from"] == 0
        assert "checkpoints epoch-0002.pt, epoch-0001.pt in" in rejected[0].getMessage()
    else:
        assert len(rejected) == 1 and done.user_attrs["resumed_from"] == 1  # the previous good checkpoint
    uninterrupted = real_train(spec.config_for({"hidden_size": 4}), load_corpus(spec.data_path))
    assert [done.intermediate_values[e] for e in (1, 2, 3)] == [h.dev.mse for h in uninterrupted.history]


def test_missing_word_vectors_stop_the_worker_before_any_trial(setup, monkeypatch, tmp_path):
    import urllib.error
    import urllib.request

    from vadsearch.errors import ConfigError

    monkeypatch.setenv("VADSEARCH_CACHE", str(tmp_path / "empty-cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    spec, options = setup('embedding = ["internal", "external"]\nhidden_size = [4]', vectors="glove.6B.300d")
    with pytest.raises(ConfigError, match="glove.6B.300d unavailable.*--set vectors=PATH \\(worker, launch\\)"):
        Worker(spec, options).run()
    assert not (tmp_path / "s.db").exists()  # said before the first trial, not 36 failures later


def test_a_baseline_study_still_rejects_a_mistyped_device_before_any_trial(setup, tmp_path):
    from vadsearch.errors import ConfigError

    spec, options = setup('baseline = ["constant", "mean"]', model="baseline")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        Worker(spec, dataclasses.replace(options, device="gpu0")).run()
    assert not (tmp_path / "s.db").exists()
    assert Worker(spec, dataclasses.replace(options, device="cuda:3")).run().stopped == "finished"  # unused


def test_external_vectors_from_a_file(setup, tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{w} {i * 0.1:.1f} 0.5 -0.5\n" for i, w in enumerate(["happy", "sad", "the", "dog"])))
    spec, options = setup('embedding = ["internal", "external"]\nhidden_size = [4]', vectors=str(vectors))
    assert Worker(spec, options).run().stopped == "finished"
    study = load(options)
    assert len(points_finished(study)) == 2
    external = [t for t in study.trials if t.params["embedding"] == "external"][0]
    assert external.user_attrs["config"]["vectors"] == str(vectors)


def test_a_baseline_study_runs_without_loading_torch(tmp_path, tiny_csv):
    """A worker with nothing to train skips torch's seconds of import: many such workers start at once
    (the constant baseline of every comparison), and none of them needs a device."""
    import subprocess
    import sys

    study = write_study(tmp_path / "b.toml", name="b", data=tiny_csv, search='baseline = ["constant", "mean"]',
                        model="baseline")
    script = (
        "import sys; from pathlib import Path\n"
        "from vadsearch.studyfile import load_study_file\n"
        "from vadsearch.worker import Worker, WorkerOptions\n"
        "options = WorkerOptions(storage=sys.argv[2], artifacts=Path(sys.argv[3]), device='cpu', progress=False)\n"
        "summary = Worker(load_study_file(Path(sys.argv[1])), options).run()\n"
        "print(summary.states['COMPLETE'], 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(study), f"sqlite:///{tmp_path}/b.db", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "False"]
    scores = {t.user_attrs["dev"]["mse"] for t in optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path}/b.db").trials}
    assert len(scores) == 2 and min(scores) > 0  # each baseline really scored


# Sampled studies: every worker draws configurations of its own, and none is trained twice.


@pytest.fixture
def sampled(tmp_path, tiny_csv):
    def make(search: str, max_trials: int, sampler: str = "random", study: str = ""):
        path = tmp_path / "r.toml"
        path.write_text(f'[study]\nname = "r"\nsampler = "{sampler}"\nmax_trials = {max_trials}\n{study}\n'
                        f"[data]\npath = {json.dumps(str(tiny_csv))}\n\n"
                        '[train]\nmodel = "lstm"\nmax_epochs = 1\nbatch_size = 16\nembedding_dim = 8\nlayers = 1\n'
                        f"hidden_size = 4\n\n[search]\n{search}\n")
        options = WorkerOptions(storage=f"sqlite:///{tmp_path}/r.db", artifacts=tmp_path / "art", device="cpu",
                                progress=False, grace_period=2, heartbeat_interval=1)
        return load_study_file(path), options

    return make


def test_a_sampled_study_takes_the_latest_trial_count_and_ignores_the_order_of_its_axes(sampled):
    spec, options = sampled("lr = [0.001, 0.01]\ndropout = [0.0, 0.2]", max_trials=1)
    assert len(Worker(spec, options).run().trials) == 1
    more, _ = sampled("dropout = [0.0, 0.2]\nlr = [0.001, 0.01]", max_trials=2)
    assert len(Worker(more, options).run().trials) == 1  # the second of two, from a file with its axes swapped
    [row] = vadsearch.report.status(open_storage(options.storage))
    assert (row["complete"], row["max_trials"]) == (2, 2)


def test_a_retry_queued_beyond_a_lowered_max_trials_waits_for_it_to_be_raised(sampled, monkeypatch, tmp_path):
    # Status said "1 waiting" of a finished study: a retry no worker would run.
    from typer.testing import CliRunner

    from vadsearch.cli import app

    spec, options = sampled("lr = [0.001, 0.01, 0.1]", max_trials=3)
    spec = spec.with_overrides(train={"max_epochs": 2})
    assert Worker(spec, dataclasses.replace(options, n_trials=1)).run().trials == [0]
    interrupt_after(1, spec, options, monkeypatch)  # trial 1, queued again as trial 2
    lowered, _ = sampled("lr = [0.001, 0.01, 0.1]", max_trials=1)
    lowered = lowered.with_overrides(train={"max_epochs": 2})
    assert Worker(lowered, options).run().trials == []  # finished: the retry is not run
    shown = CliRunner().invoke(app, ["status", "--storage", options.storage]).output
    assert "1/1 trials done (1 complete, 0 pruned), 0 running, 1 waiting (not run: max_trials = 1 is reached; " \
           "raise it to run them), 1 failed (1 retried)" in shown
    assert Worker(spec, options).run().stopped == "finished"  # raised again: the retry resumes where it stopped
    trials = load(options, "r").trials
    assert trials[2].state == TrialState.COMPLETE and trials[2].user_attrs["resumed_from"] == 1
    shown = CliRunner().invoke(app, ["status", "--storage", options.storage]).output
    assert "not run" not in shown


def test_a_trial_is_never_pruned_on_its_last_epoch(sampled, monkeypatch):
    # A pruner that would stop every trial: an epoch before the last is pruned, the last one is scored in full
    # (pruned there, a fully trained run lost its best epoch and its test score).
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    spec, options = sampled("lr = [0.001, 0.01]", max_trials=2)
    Worker(spec.with_overrides(train={"max_epochs": 2}), dataclasses.replace(options, n_trials=1)).run()
    [pruned] = load(options, "r").trials
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]

    Worker(dataclasses.replace(spec, name="s", max_trials=1), options).run()  # one epoch: its last
    [done] = load(options, "s").trials
    assert done.state == TrialState.COMPLETE and done.user_attrs["test"]["mse"] > 0


def test_two_sampled_configurations_of_one_training_run_are_trained_once(sampled):
    # Warm-up changes nothing under a constant learning rate: (constant, 0.0) and (constant, 0.1) are one
    # run, in one checkpoint directory. The study holds three runs, and each is trained exactly once.
    spec, options = sampled('schedule = ["constant", "linear"]\nwarmup_ratio = [0.0, 0.1]', max_trials=3)
    summary = Worker(spec, options).run()
    assert summary.stopped == "finished"
    study = load(options, "r")
    trained = study.get_trials(states=(TrialState.COMPLETE,))
    runs = {spec.config_for(t.params).fingerprint() for t in trained}
    assert len(trained) == len(runs) == 3
    assert len({t.user_attrs["checkpoint_dir"] for t in trained}) == 3
    repeats = [t for t in study.trials if t.user_attrs.get("repeat_of") is not None]
    assert {t.user_attrs["point"] for t in repeats} <= {t.user_attrs["point"] for t in trained}  # one run's key


def test_workers_of_one_seeded_study_draw_streams_of_their_own(sampled):
    spec, _ = sampled("lr = { low = 0.0001, high = 0.01, log = true }", max_trials=4)

    def first(sampler) -> float:
        return optuna.create_study(sampler=sampler).ask().suggest_float("lr", 1e-4, 1e-2, log=True)

    assert first(spec.make_sampler("host:1")) == first(spec.make_sampler("host:1"))  # still seeded
    assert first(spec.make_sampler("host:1")) != first(spec.make_sampler("host:2"))


@pytest.mark.parametrize("keep", ["best", "all"])
def test_a_pruned_trial_leaves_what_a_completed_one_leaves(sampled, monkeypatch, keep):
    # A pruned configuration is never resumed: under --keep best its epoch checkpoints went nowhere before.
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    spec, options = sampled("lr = [0.001, 0.01]", max_trials=1)
    Worker(spec.with_overrides(train={"max_epochs": 3}), dataclasses.replace(options, keep=keep)).run()
    [pruned] = load(options, "r").trials
    assert pruned.state == TrialState.PRUNED
    names = [p.name for p in Path(pruned.user_attrs["checkpoint_dir"]).iterdir()]
    epochs, bests = ([n for n in names if n.startswith(kind)] for kind in ("epoch-", "best-"))
    assert (bool(epochs), len(bests)) == ((False, 1) if keep == "best" else (True, len(bests))), names


def test_a_resumed_trial_is_judged_at_each_restored_epoch_as_at_each_trained_one(setup, monkeypatch):
    # A pruner is asked after every epoch, at its own step; a Hyperband rung is recorded as it is asked. The
    # epochs a retry restored from its checkpoint used to be passed over, and a rung took a later epoch's score.
    judged = []

    def should_prune(self) -> bool:
        frozen = self.study._storage.get_trial(self._trial_id)
        judged.append((frozen.number, max(frozen.intermediate_values)))
        if judged[-1] == (0, 2):
            raise RuntimeError("worker lost after epoch 2")  # its epoch-2 checkpoint is on disk by now
        return False

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
    spec, options = setup("hidden_size = [4]", max_epochs=4)
    assert Worker(spec, options).run().stopped == "finished"
    [failed, retry] = load(options).trials
    # Epoch 3 may have been saved too: the report of epoch 2 waits for its checkpoint while training goes on.
    assert failed.state == TrialState.FAIL and retry.user_attrs["resumed_from"] in (2, 3)
    assert judged == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]  # not at epoch 4, the last


def test_another_pruner_is_another_study(sampled):
    # It decides which trials run to the end: a study's trials must not mix two pruners' verdicts.
    median = '[pruner]\nkind = "median"\nwarmup_epochs = 0\nstartup_trials = {}'
    spec, options = sampled("lr = [0.001, 0.01]", max_trials=2, study=median.format(2))
    Worker(spec, dataclasses.replace(options, n_trials=0)).run()
    for study, said in [(median.format(3), "median startup_trials=3 warmup_epochs=0"), ("", "none")]:
        other, _ = sampled("lr = [0.001, 0.01]", max_trials=2, study=study)
        with pytest.raises(StudyFileError, match=re.escape(
                f"([pruner] was median startup_trials=2 warmup_epochs=0, now {said})")):
            Worker(other, options).run()
    Worker(spec, dataclasses.replace(options, n_trials=0)).run()  # the same pruner joins


def test_a_seeded_study_run_again_from_an_empty_database_proposes_the_same(sampled, tmp_path):
    # Each worker's stream is its turn to join the study: the first worker of a fresh study draws the same
    # configurations every time (a stream named after the host and the clock drew others each run).
    spec, options = sampled("lr = { low = 0.0001, high = 0.01, log = true }", max_trials=2, sampler="tpe")
    proposed = []
    for run in ("a", "b"):
        again = dataclasses.replace(options, storage=f"sqlite:///{tmp_path}/{run}.db", artifacts=tmp_path / run)
        Worker(spec, again).run()
        proposed.append([t.params["lr"] for t in load(again, "r").trials])
    assert proposed[0] == proposed[1] and len(set(proposed[0])) == 2
    assert load(again, "r").user_attrs["workers_joined"] == 1


def test_a_restarted_worker_of_a_seeded_study_draws_new_configurations(sampled):
    """Sampler state is not in the database: seeded alike, a worker started again proposed again what the
    one before it had run (and several workers started at once proposed the same configurations)."""
    spec, options = sampled("lr = { low = 0.0001, high = 0.01, log = true }", max_trials=4)
    assert Worker(spec, dataclasses.replace(options, n_trials=2)).run().trials == [0, 1]
    assert Worker(spec, options).run().stopped == "finished"
    study = load(options, "r")
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert set(points_finished(study).values()) == {1} and len(points_finished(study)) == 4


def test_a_repeated_configuration_is_not_trained_and_a_stuck_sampler_is_overcome(sampled, monkeypatch, caplog):
    from vadsearch import report, studyfile, worker as worker_module

    spec, options = sampled("dropout = [0.0, 0.5]", max_trials=2, sampler="tpe")
    stuck = optuna.samplers.PartialFixedSampler({"dropout": 0.0}, optuna.samplers.RandomSampler(seed=0))
    monkeypatch.setattr(studyfile.StudySpec, "make_sampler", lambda self, stream="": stuck)
    caplog.set_level(logging.INFO, logger="vadsearch.worker")
    summary = Worker(spec, dataclasses.replace(options, n_trials=10)).run()  # repeats do not count
    assert summary.stopped == "finished" and summary.states["COMPLETE"] == 2 == len(summary.trials)
    study = load(options, "r")
    assert sorted(points_finished(study).values()) == [1, 1]
    repeats = [t for t in study.trials if t.user_attrs.get("orphan")]
    assert len(repeats) >= worker_module.REPEATS_BEFORE_RANDOM  # then drawn at random, until 0.5 came up
    first = study.trials[0]
    assert first.params == {"dropout": 0.0} and first.state == TrialState.COMPLETE
    assert all(t.state == TrialState.FAIL and t.user_attrs["repeat_of"] == 0 and "config" not in t.user_attrs
               for t in repeats)
    assert sum("resumed from" in m for m in caplog.messages) == 0  # nothing trained twice
    assert len(report.leaderboard(study)) == 2  # left out of tables and counts, as orphans are
    assert report.status(open_storage(options.storage))[0]["fail"] == 0


def test_a_configuration_running_elsewhere_is_waited_for_not_trained_beside_it(sampled, monkeypatch):
    """Two trials of one configuration would train in one run directory at once."""
    import threading
    import time

    from vadsearch import studyfile

    spec, options = sampled("dropout = [0.0, 0.5]", max_trials=2, sampler="tpe")
    assert Worker(spec, dataclasses.replace(options, n_trials=0)).run().trials == []  # creates the study
    storage = open_storage(options.storage)
    study = optuna.load_study(study_name="r", storage=storage)
    elsewhere = study.ask({"dropout": optuna.distributions.CategoricalDistribution([0.0, 0.5])})
    study._storage.set_trial_user_attr(elsewhere._trial_id, "point", point_key({"dropout": 0.0}))

    def its_worker() -> None:  # beats while the worker below draws its configuration twice, then dies
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(
                t.user_attrs.get("repeat_of") == elsewhere.number for t in study.get_trials(deepcopy=False)) < 2:
            storage.record_heartbeat(elsewhere._trial_id)
            time.sleep(0.2)

    stuck = optuna.samplers.PartialFixedSampler({"dropout": 0.0}, optuna.samplers.RandomSampler(seed=0))
    monkeypatch.setattr(studyfile.StudySpec, "make_sampler", lambda self, stream="": stuck)
    beating = threading.Thread(target=its_worker)
    beating.start()
    assert Worker(spec, options).run().stopped == "finished"  # once it went stale: failed, requeued, run here
    beating.join()
    study = load(options, "r")
    assert study.trials[elsewhere.number].state == TrialState.FAIL
    assert sorted(points_finished(study).values()) == [1, 1]
    waited = [t for t in study.trials if t.user_attrs.get("repeat_of") == elsewhere.number]
    assert len(waited) >= 2  # drawn while it ran, each after a pause
    trained = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.params == {"dropout": 0.0}]
    assert trained[0].datetime_start > study.trials[elsewhere.number].datetime_complete  # only once it failed


def test_a_configuration_given_up_on_is_not_proposed_to_training_again(sampled, monkeypatch):
    from vadsearch import studyfile

    spec, options = sampled("dropout = [0.0, 0.5]", max_trials=2, sampler="tpe", study="max_retries = 0")
    real_train, trained = vadsearch.train.train, []

    def failing(config, *args, **kwargs):
        trained.append(config.dropout)
        if config.dropout == 0.0:
            raise ValueError("this configuration cannot train")
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(vadsearch.train, "train", failing)
    stuck = optuna.samplers.PartialFixedSampler({"dropout": 0.0}, optuna.samplers.RandomSampler(seed=0))
    monkeypatch.setattr(studyfile.StudySpec, "make_sampler", lambda self, stream="": stuck)
    summary = Worker(spec, dataclasses.replace(options, n_trials=10)).run()
    assert summary.stopped == "finished" and trained.count(0.0) == 1 and trained.count(0.5) == 1
    study = load(options, "r")
    assert study.trials[0].user_attrs["fail_reason"] == "ValueError: this configuration cannot train"
    repeats = [t for t in study.trials if t.user_attrs.get("orphan")]
    assert repeats and {t.user_attrs["repeat_of"] for t in repeats} == {0}


def test_a_trial_beyond_max_trials_is_not_trained(sampled, monkeypatch):
    """Workers that surveyed a study at the same moment each started one more trial than it had left."""
    import threading
    import time

    spec, options = sampled("lr = { low = 0.0001, high = 0.01, log = true }", max_trials=2)
    assert Worker(spec, dataclasses.replace(options, n_trials=0)).run().trials == []  # creates the study
    storage = open_storage(options.storage)
    study = optuna.load_study(study_name="r", storage=storage)
    held = []

    def another_worker_starts() -> None:
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        study._storage.set_trial_user_attr(trial._trial_id, "point", point_key(trial.params))
        held.append(trial)

    another_worker_starts()
    real_survey = Worker._survey_and_queue

    def survey_then_another_starts(self, study):  # one slot left when surveyed, none when its trial starts
        found = real_survey(self, study)
        if len(held) == 1:
            another_worker_starts()
        return found

    monkeypatch.setattr(Worker, "_survey_and_queue", survey_then_another_starts)

    def other_workers() -> None:  # beat until the worker below has started a trial, then finish
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(study.get_trials(deepcopy=False)) < 3:
            for trial in held:
                storage.record_heartbeat(trial._trial_id)
            time.sleep(0.3)
        time.sleep(0.5)
        for trial in held:
            study.tell(trial, 0.1)

    beating = threading.Thread(target=other_workers)
    beating.start()
    summary = Worker(spec, options).run()
    beating.join()
    assert summary.stopped == "finished" and summary.trials == []
    study = load(options, "r")
    assert study.trials[2].user_attrs.get("surplus") and study.trials[2].state == TrialState.FAIL
    assert "config" not in study.trials[2].user_attrs  # never trained: no run directory was named
    assert sorted(points_finished(study)) == sorted(point_key(t.params) for t in held)  # no third


def test_optuna_says_nothing_of_a_trial_that_ctrl_c_stopped():
    # Its two lines ("failed ... because of the following error: KeyboardInterrupt()") stood beside the
    # worker's own "interrupted: run the same command again" as if the trial had an error.
    from vadsearch.worker import _NoTracebacks

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("optuna.study._optimize", logging.WARNING, __file__, 1, message, None, None)

    quiet = _NoTracebacks()
    lines = ["Trial 12 failed with parameters: {'lr': 0.01} because of the following error: KeyboardInterrupt().",
             "Trial 12 failed with value None.",
             "Trial 13 failed with parameters: {'lr': 0.1} because of the following error: ValueError('x').",
             "Trial 13 failed with value None.", "Trial 14 finished with value: 0.1"]
    assert [quiet.filter(record(line)) for line in lines] == [False, False, True, True, True]


def test_a_changed_range_axis_reads_as_the_study_file_writes_it():
    from vadsearch.studyfile import Param
    from vadsearch.worker import _changes

    was = {"sampler": "tpe", "space": [Param("lr", low=1e-4, high=1e-2, log=True).to_dict()]}
    now = {"sampler": "tpe", "space": [Param("lr", low=1e-4, high=3e-2, log=True).to_dict()]}
    assert _changes(was, now) == ["[search] lr was { low = 0.0001, high = 0.01, log = true }, "
                                  "now { low = 0.0001, high = 0.03, log = true }"]


def test_the_artifact_marker_that_cannot_be_written_is_one_line_and_a_damaged_one_is_rewritten(setup, tmp_path):
    import os

    from vadsearch.errors import CheckpointError

    spec, options = setup('hidden_size = [4]\n', max_epochs=1)
    marker = tmp_path / "art" / "s" / ".study-id"
    (tmp_path / "art" / "s" / f".study-id.{os.getpid()}.tmp").mkdir(parents=True)  # the write fails there
    with pytest.raises(CheckpointError, match=rf"^cannot write {marker}: .*; free disk space or fix its permissions"):
        Worker(spec, options).run()
    (tmp_path / "art" / "s" / f".study-id.{os.getpid()}.tmp").rmdir()
    marker.write_text("{not json")  # cut short by a crash, say: nothing to go by, so it is written anew
    assert Worker(spec, options).run().stopped == "finished"
    assert json.loads(marker.read_text())["id"] == load(options).user_attrs["vadsearch_id"]


def test_a_study_made_anew_in_a_deleted_database_does_not_resume_the_old_checkpoints(setup, monkeypatch, tmp_path):
    spec, options = setup('hidden_size = [4]\n', max_epochs=3)
    interrupt_after(2, spec, options, monkeypatch)
    (tmp_path / "s.db").unlink()  # "start over", the artifacts kept
    with pytest.raises(StudyFileError, match=rf"^{tmp_path}/art/s holds the checkpoints of an earlier study named "
                                             rf"'s' in sqlite:///{tmp_path}/s.db, since deleted: remove "):
        Worker(spec, options).run()
    shutil.rmtree(tmp_path / "art" / "s")
    assert Worker(spec, options).run().stopped == "finished"


def test_two_relative_sqlite_files_of_the_same_name_are_two_databases(setup, monkeypatch, tmp_path):
    # `sqlite:///vadsearch.db` names a file in each directory: not "an earlier study, since deleted".
    spec, options = setup('hidden_size = [4]\n', max_epochs=1)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    relative = dataclasses.replace(options, storage="sqlite:///vadsearch.db")
    monkeypatch.chdir(tmp_path / "a")
    assert Worker(spec, relative).run().stopped == "finished"
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(StudyFileError, match=rf"another study named 's' \(in sqlite:///{tmp_path}/a/vadsearch.db\), "
                                             rf"not the one in sqlite:///{tmp_path}/b/vadsearch.db"):
        Worker(spec, relative).run()
