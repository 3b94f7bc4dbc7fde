"""A storage that rides out database outages: restarts, failovers, a network cut of a few minutes.

Every storage call that fails because the database cannot be reached is retried with exponential
backoff, for up to `outage_limit` seconds in all; then `DatabaseUnreachable` is raised and every later
call fails at once, so a worker exits with one clear message instead of waiting again at each step.
The trial it was running stays RUNNING in the database; when its heartbeat goes stale another worker
requeues it, and the retry resumes from the last epoch checkpoint.

Retrying a write whose commit reached the server just before the connection died could apply it twice;
Optuna's writes of states and values are idempotent, and this is accepted for the rest.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from vadsearch import interrupts
from vadsearch.errors import StorageError

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 15.0


class DatabaseUnreachable(StorageError):
    """The database stayed unreachable for longer than the configured limit."""


def _transient(exc: BaseException) -> bool:
    """Connection lost or refused (any backend), or SQLite busy: worth waiting for."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (OperationalError, InterfaceError)):
            message = str(seen).lower()
            if "sqlite" not in type(seen.orig).__module__:
                return True  # PostgreSQL drivers raise OperationalError for connection problems
            return "locked" in message or "busy" in message
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(method):
    @functools.wraps(method)
    def call(self: ReconnectingRDBStorage, *args, **kwargs):
        if self.gave_up:
            raise DatabaseUnreachable(self.gave_up)
        started, delay = None, FIRST_DELAY_S
        while True:
            try:
                with interrupts.deferred():  # each attempt, not the waits between them
                    result = method(self, *args, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning("database %s unreachable; retrying for up to %.0f s", self.masked_url,
                                self.outage_limit)
                if now - started > self.outage_limit:
                    self.gave_up = (
                        f"lost the database {self.masked_url} for more than {self.outage_limit:.0f} s; "
                        "the running trial stays resumable: start the worker again once the database is back"
                    )
                    raise DatabaseUnreachable(self.gave_up) from None
                time.sleep(delay)
                delay = min(2 * delay, MAX_DELAY_S)
                continue
            if started is not None:
                log.warning("database %s reachable again after %.0f s", self.masked_url, time.monotonic() - started)
            return result

    return call


class QueueEmpty(Exception):
    """`ask` found no queued trial in a storage that runs only queued ones."""


class ReconnectingRDBStorage(RDBStorage):
    """The storage a worker uses. Every database call rides out an outage, and a trial's attributes ride
    with its state changes instead of costing transactions of their own: those that say who runs it
    (`on_start`) are written as it starts, those that say how it ended as it ends."""

    outage_limit: float = 600.0
    gave_up: str = ""  # the reason, once the limit was passed
    on_start: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    """A queued trial's fixed parameters -> the attributes to write in the transaction that starts it."""
    queue_only: bool = False
    """With no queued trial waiting, `ask` raises QueueEmpty instead of creating a trial of its own: two
    grid workers racing for the last waiting point leave no stray trial behind, and a worker need not
    look for a waiting trial before each `ask`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._final_attrs: dict[int, dict[str, Any]] = {}

    def _create_new_trial(self, study_id: int, template_trial=None):
        if template_trial is not None:
            # Enqueueing is not retried: after a commit whose answer was lost, a retry would queue the
            # point twice. A failure here stops the worker; the next reconcile queues what is missing.
            with interrupts.deferred():
                return super()._create_new_trial(study_id, template_trial)
        if self.queue_only:  # `ask` found nothing to pop
            raise QueueEmpty
        # A fresh trial of a sampled study: one created twice is never run; an empty trial without a
        # configuration, which the queue ignores, is the cost of that rare case.
        return retrying(RDBStorage._create_new_trial)(self, study_id, None)

    def attrs_with_final_state(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Hold `attrs` until the trial's final state is written, then write them with it."""
        self._final_attrs.setdefault(trial_id, {}).update(attrs)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        attrs = self._final_attrs.pop(trial_id, None) if state.is_finished() else None
        return self._state_with_attrs(trial_id, state, values, attrs)

    @retrying
    def _state_with_attrs(self, trial_id: int, state: TrialState, values, attrs: dict[str, Any] | None) -> bool:
        starting = state == TrialState.RUNNING and self.on_start is not None
        if not (attrs or starting):
            return RDBStorage.set_trial_state_values(self, trial_id, state, values)
        from optuna.storages._rdb import models

        from vadsearch.storage import upsert_user_attrs

        session = self.scoped_session()  # thread-local: Optuna's write below continues this session
        try:
            # The trial's row first, as Optuna's own write locks it: two workers lock in one order.
            trial, fixed = models.TrialModel, models.TrialSystemAttributeModel
            found = (session.query(trial.state, fixed.value_json)
                     .outerjoin(fixed, (fixed.trial_id == trial.trial_id) & (fixed.key == "fixed_params"))
                     .filter(trial.trial_id == trial_id).with_for_update(of=trial).one_or_none())
            if found is None:
                raise KeyError(f"no trial with id {trial_id}")
            current, fixed_params = found
            if starting:
                attrs = self._start_attrs(trial_id, current, fixed_params)
            # Only onto a trial that Optuna's write below will accept: on its refusal path Optuna reads the
            # trial through this same session and commits it, which would keep the attributes.
            if attrs and not current.is_finished():
                upsert_user_attrs(session, models, self.engine.name, trial_id, attrs)
            # Commits the attributes with the state, or rolls both back (a trial another worker took).
            return RDBStorage.set_trial_state_values(self, trial_id, state, values)
        except BaseException:
            session.rollback()  # a retry starts a clean transaction
            session.close()
            raise

    def _start_attrs(self, trial_id: int, state: TrialState, fixed_params: str | None) -> dict[str, Any] | None:
        if state != TrialState.WAITING or fixed_params is None:
            return None  # another worker took it (Optuna's write below declines too), or it was not queued
        try:
            return self.on_start(json.loads(fixed_params))
        except Exception:  # the objective writes them itself, and reports a bad configuration as the trial's
            log.debug("no start attributes for trial %d", trial_id, exc_info=True)
            return None

    @retrying
    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (a heartbeat older than the grace period), and RUNNING ones that never sent
        a heartbeat and started more than a grace period ago: Optuna passes over those, but a worker killed
        (or stopped by Ctrl-C) between starting a trial and its first heartbeat leaves one, which a study
        would wait for forever. One query, as Optuna's own: this runs before every trial."""
        from datetime import datetime, timedelta, timezone

        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        grace = timedelta(seconds=self.grace_period if self.grace_period is not None
                          else 2 * (self.heartbeat_interval or 0))
        trial, beat = models.TrialModel, models.TrialHeartbeatModel
        with _create_scoped_session(self.scoped_session, True) as session:
            running = (session.query(trial.trial_id, beat.heartbeat, trial._datetime_start_utc,
                                     sqlalchemy.func.now())
                       .outerjoin(beat, beat.trial_id == trial.trial_id)
                       .filter(trial.study_id == study_id, trial.state == TrialState.RUNNING).all())
        # Heartbeats are stamped by the database's clock (as Optuna compares them); datetime_start is naive
        # UTC from the starting host's, and a trial lies without a heartbeat for milliseconds only while its
        # worker lives, so clocks a little apart do no harm.
        utc_now = datetime.now(timezone.utc).replace(tzinfo=None)
        return [trial_id for trial_id, heartbeat, started, db_now in running
                if (heartbeat is not None and db_now.replace(tzinfo=None) - heartbeat > grace)
                or (heartbeat is None and started is not None and utc_now - started > grace)]

    @property
    def masked_url(self) -> str:
        from vadsearch.storage import mask

        return mask(self.url)

    def record_heartbeat(self, trial_id: int) -> None:
        # Runs in Optuna's heartbeat thread: an exception there would kill the thread with a traceback
        # and let the trial go stale while the worker still trains it. The main thread reports outages.
        if not threading.main_thread().is_alive():
            # The worker is exiting, and this thread was never told to stop: a Ctrl-C landed between its start
            # and Optuna's `with` around the trial. Without this it beat on, and the process never exited.
            raise SystemExit
        try:
            retrying(RDBStorage.record_heartbeat)(self, trial_id)
        except (DatabaseUnreachable, optuna.exceptions.StorageInternalError):
            pass


_NO_DATABASE = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback",
                "remove_session"}
# Optuna's study cache calls four private methods of the storage directly; they are retried too.
for _name in [n for n in vars(optuna.storages.BaseStorage) if not n.startswith("_")] + [
    "_get_stale_trial_ids", "_get_trials", "_set_trial_param", "_get_best_trial_id",
    "upgrade", "get_current_version", "get_all_versions",
]:
    if _name not in _NO_DATABASE and _name not in vars(ReconnectingRDBStorage) and callable(
        getattr(RDBStorage, _name, None)
    ):
        setattr(ReconnectingRDBStorage, _name, retrying(getattr(RDBStorage, _name)))
