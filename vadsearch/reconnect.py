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
import logging
import time

import optuna
from optuna.storages import RDBStorage

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


class ReconnectingRDBStorage(RDBStorage):
    outage_limit: float = 600.0
    gave_up: str = ""  # the reason, once the limit was passed

    @property
    def masked_url(self) -> str:
        from vadsearch.storage import mask

        return mask(self.url)

    def record_heartbeat(self, trial_id: int) -> None:
        # Runs in Optuna's heartbeat thread: an exception there would kill the thread with a traceback
        # and let the trial go stale while the worker still trains it. The main thread reports outages.
        try:
            retrying(RDBStorage.record_heartbeat)(self, trial_id)
        except (DatabaseUnreachable, optuna.exceptions.StorageInternalError):
            pass


_NO_DATABASE = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback",
                "remove_session", "record_heartbeat"}
for _name in [n for n in vars(optuna.storages.BaseStorage) if not n.startswith("_")] + [
    "_get_stale_trial_ids", "upgrade", "get_current_version", "get_all_versions",
]:
    if _name not in _NO_DATABASE and callable(getattr(RDBStorage, _name, None)):
        setattr(ReconnectingRDBStorage, _name, retrying(getattr(RDBStorage, _name)))
