"""Storage URL → Optuna `RDBStorage`: SQLite by default, PostgreSQL for many workers on many machines.

Everything a study holds stays readable by stock Optuna tools (`optuna trials`, `optuna-dashboard`).
Passwords never leave this module: every message shows the URL through `mask`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from vadsearch.errors import StorageError, StorageUrlError

if TYPE_CHECKING:
    import optuna

DEFAULT_STORAGE = "sqlite:///vadsearch.db"
SQLITE_BUSY_TIMEOUT_S = 60  # writers queue behind each other instead of failing with "database is locked"
GRACE_PERIOD_S = 60  # by default, a RUNNING trial whose heartbeat is older is taken for dead (workers, status)
HEARTBEAT_INTERVAL_S = 10  # a worker's default time between its running trial's heartbeats
DB_OUTAGE_LIMIT_S = 600.0  # a worker's default wait for an unreachable database before it exits
POOL_RECYCLE_S = 300  # PostgreSQL servers and proxies drop idle connections; replace them before that
IDLE_IN_TRANSACTION_S = 60  # PostgreSQL ends a session of ours that sits inside a transaction this long
PG_CONNECT_ARGS = {
    "connect_timeout": 10,  # seconds
    "keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 20_000,  # ms: unacknowledged data this long means the peer is gone
}


def storage_url(url: str | None = None) -> str:
    """`--storage`, else `$VADSEARCH_STORAGE`, else a SQLite file in the working directory."""
    return url or os.environ.get("VADSEARCH_STORAGE") or DEFAULT_STORAGE


def _parse(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise StorageUrlError(f"not a database URL: {_mask_text(url)!r}; expected sqlite:///FILE or "
                              "postgresql+psycopg://USER:PASSWORD@HOST/DB") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StorageUrlError(f"unsupported database {parsed.get_backend_name()!r} in {mask(url)}: "
                           "use sqlite:///FILE or postgresql+psycopg://…")
    return parsed


def mask(url: str) -> str:
    """The URL with its password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return _mask_text(url)


def _mask_text(text: str) -> str:
    # For strings SQLAlchemy cannot parse: hide anything between "://user:" and "@".
    import re

    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


def scrub(message: str, url: str) -> str:
    """`message` with the URL's password removed wherever a driver quoted it."""
    try:
        password = _parse(url).password
    except StorageError:
        password = None
    message = _mask_text(message)
    return message.replace(password, "***") if password else message


def sqlite_path(url: str) -> Path | None:
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_storage(
    url: str | None = None,
    *,
    create: bool = True,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    outage_limit: float | None = None,
) -> optuna.storages.RDBStorage:
    """Connect to the study store. With `create=False` (reports), a missing SQLite file is an error
    instead of a new empty database. With `outage_limit` (workers), calls wait out a database that
    is unreachable for up to that many seconds (see reconnect.py)."""
    url = storage_url(url)
    path = sqlite_path(url)
    if path is None and _parse(url).get_backend_name() == "sqlite":
        raise StorageError(f"{_mask_text(url)} is an in-memory database, gone when this process ends and unseen by "
                           "any other: give a file, sqlite:///PATH")
    if path is not None:
        if not create and not path.is_file():
            raise StorageError(f"no study database at {path}: run a worker first, or pass --storage")
        if not path.parent.is_dir():
            raise StorageError(f"cannot create {path}: directory {path.parent} does not exist")
        _check_sqlite_file(path)  # before the lock file beside it is made
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        # pre-ping: a connection that died with a database restart is replaced, not handed out.
        # TCP timeouts: behind a cut network a query would otherwise wait for the kernel's
        # retransmissions (many minutes) instead of failing into the reconnect loop (reconnect.py).
        engine_kwargs = {"pool_pre_ping": True, "pool_recycle": POOL_RECYCLE_S, "connect_args": PG_CONNECT_ARGS}
    import warnings

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with warnings.catch_warnings(), _schema_lock(url, path):
            # Heartbeats are "experimental" in Optuna 5; we depend on them knowingly (see DESIGN.md).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if outage_limit is None:
                kind = optuna.storages.RDBStorage
            else:
                from vadsearch.reconnect import ReconnectingRDBStorage as kind
            storage = kind(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=on_stale,
            )
            if path is not None and create:
                _begin_immediate(storage.engine)
            elif path is None and storage.engine.name == "postgresql":
                _end_abandoned_transactions(storage.engine)
            if outage_limit is not None:
                storage.outage_limit = outage_limit
            return storage
    except ImportError as exc:  # postgresql+psycopg2://, +asyncpg, …: a driver not installed
        raise StorageUrlError(f"cannot open {mask(url)}: {exc}; vadsearch connects to PostgreSQL with psycopg 3: "
                              "postgresql+psycopg://USER:PASSWORD@HOST/DB") from None
    except SQLAlchemyError as exc:
        where = "the file" if path is not None else \
            "the URL (--storage or $VADSEARCH_STORAGE) and that the server is up"
        raise StorageError(f"cannot open {mask(url)}: {_first_line(scrub(str(exc), url))}; check {where}") from None
    except RuntimeError as exc:  # Optuna's schema-version check
        raise StorageError(f"{mask(url)}: {_first_line(scrub(str(exc), url))}") from None


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path) -> None:
    """An existing path that is no SQLite database (a directory, a CSV) is refused before anything is
    written beside it."""
    if path.is_dir():
        raise StorageError(f"{path} is a directory, not a study database: give a file, sqlite:///PATH")
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return  # a new database
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if header and header != SQLITE_HEADER:  # an empty file is what SQLite makes of a new database
        raise StorageError(f"{path} is not an SQLite database (a study database is made by `vadsearch "
                           "worker`): give another file")


@contextlib.contextmanager
def _schema_lock(url: str, path: Path | None) -> Iterator[None]:
    """Serialise opening the storage across processes. `RDBStorage()` creates Optuna's tables and then
    inserts its version rows without any lock, so workers that open a fresh database at the same moment
    collide ("UNIQUE constraint failed: alembic_version.version_num", "table studies already exists";
    found by tests/test_concurrency.py with 16 workers). Opening an existing database is quick, so
    holding the lock for every open costs little."""
    if path is not None:
        try:
            handle = open(path.with_name(path.name + ".lock"), "a")
        except OSError:  # a read-only directory: nothing can be created there, so nothing can collide
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases the lock
        return
    if not url.startswith("postgresql"):
        yield  # in-memory SQLite: one process
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:  # closing the session releases the advisory lock
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _lock_key("vadsearch:schema")})
            yield
    finally:
        engine.dispose()


def _begin_immediate(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (`BEGIN IMMEDIATE`).

    Optuna hands a WAITING trial to one worker by reading its state `FOR UPDATE` and setting it to
    RUNNING. SQLite ignores `FOR UPDATE`, and Python's sqlite3 starts a transaction only at the first
    write, so two workers could both read WAITING and both run the trial (found by
    tests/test_concurrency.py: "Cannot tell a COMPLETE trial"). With the lock taken at BEGIN, the read
    and the write are one atomic step; other workers wait up to the busy timeout. This is SQLAlchemy's
    documented recipe for pysqlite transactions (docs: "Serializable isolation / Savepoints /
    Transactional DDL").
    """
    from sqlalchemy import event

    engine.dispose()  # connections opened while Optuna created its tables predate the hooks below

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own: we do, below

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        # Straight to the driver: through SQLAlchemy's statement path this line took about 6% of a no-op
        # trial's time (cProfile of benchmarks/bench_orchestration.py), on every transaction.
        connection.connection.driver_connection.execute("BEGIN IMMEDIATE")


def _end_abandoned_transactions(engine) -> None:
    """Have PostgreSQL end any session of this storage that sits inside a transaction for longer than
    `IDLE_IN_TRANSACTION_S`, releasing its locks.

    A worker whose network is cut in the middle of a transaction (an epoch's report, say) keeps that
    transaction's locks on its trial until the server notices the dead connection, which with TCP's
    defaults takes hours; meanwhile the worker that fails the trial as stale waits on those locks (found
    by tests/test_network_cut.py). vadsearch's transactions last milliseconds; one that is ended by
    mistake fails with a lost connection, which is retried. Set per session with SET, because PgBouncer
    refuses the `options` startup parameter.
    """
    from sqlalchemy import event

    engine.dispose()  # connections opened while Optuna checked its tables predate the hook below

    @event.listens_for(engine, "connect")
    def _timeout(dbapi_connection, _record) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET idle_in_transaction_session_timeout = {int(IDLE_IN_TRANSACTION_S * 1000)}")
        dbapi_connection.autocommit = autocommit


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Serialise the few writes that must not interleave across workers (creating a study, enqueuing
    its grid points): Optuna's `enqueue_trial(skip_if_exists=True)` is not atomic across processes.

    SQLite lives on one machine, so a file lock beside it does; PostgreSQL gets an advisory lock, which
    blocks only other holders of the same lock, never Optuna's own queries.
    """
    storage = getattr(storage, "_backend", storage)  # a study wraps its RDBStorage in a cache
    url = storage.url
    path = sqlite_path(url)
    if path is not None:
        with open(path.with_name(path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    if storage.engine.name != "postgresql":
        yield  # in-memory SQLite: one process
        return
    from sqlalchemy import text

    key = _lock_key(f"vadsearch:{study_name}")
    with storage.engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Several user attributes of a running trial in ONE transaction: a read of its state, one upsert.

    Every commit is a disk flush on SQLite and a round trip on PostgreSQL, and Optuna's own per-attribute
    path re-reads the trial and the attribute for each one. Optuna has no public batch call, so this
    writes through RDBStorage's models (the same checks: the trial must still be running), and falls back
    to `set_user_attr` for any other storage.
    """
    trial_id = trial._trial_id

    def write(session, models, backend) -> None:  # idempotent: safe to repeat after a lost connection
        state = session.query(models.TrialModel.state).filter(models.TrialModel.trial_id == trial_id).scalar()
        if state is None:
            raise KeyError(f"no trial with id {trial_id}")
        backend.check_trial_is_updatable(trial_id, state)
        upsert_user_attrs(session, models, backend.engine.name, trial_id, attrs)

    if _in_one_session(trial.storage, write) is NotImplemented:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)


def set_user_attrs_with_final_state(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Attributes that describe how a trial ended, written in the transaction that stores its final state
    (when the objective returns or raises): one commit fewer per trial, and no trial is ever seen finished
    without them, or with them and still running. Written at once where the storage cannot do that."""
    backend = getattr(trial.storage, "_backend", trial.storage)
    if hasattr(backend, "attrs_with_final_state"):
        backend.attrs_with_final_state(trial._trial_id, attrs)
    else:
        set_user_attrs(trial, attrs)


def upsert_user_attrs(session, models, dialect: str, trial_id: int, attrs: dict[str, Any]) -> None:
    """Add or overwrite a trial's user attributes in `session`, without committing."""
    import json

    rows = [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)} for key, value in attrs.items()]
    if dialect == "postgresql" or (dialect == "sqlite" and _sqlite_upserts()):
        session.execute(_upsert_statement(dialect), rows)  # one statement: insert, or update those there
        return
    # Other databases: read the existing ones, then update or add. Only a trial's own worker writes
    # its attributes while it runs, so no other insert can race these.
    attribute = models.TrialUserAttributeModel
    existing = {row.key: row for row in session.query(attribute).filter(
        attribute.trial_id == trial_id, attribute.key.in_(list(attrs)))}
    for row in rows:
        if row["key"] in existing:
            existing[row["key"]].value_json = row["value_json"]
        else:
            session.add(attribute(**row))


@functools.cache
def _upsert_statement(dialect: str):
    # Built once: building and compiling the statement cost more than running it.
    from optuna.storages._rdb import models

    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    attribute = models.TrialUserAttributeModel
    statement = insert(attribute)
    return statement.on_conflict_do_update(index_elements=[attribute.trial_id, attribute.key],
                                           set_={"value_json": statement.excluded.value_json})


def _in_one_session(storage, work: Callable[[Any, Any, Any], Any]) -> Any:
    """`work(session, models, backend)` in one session of `storage`'s RDBStorage, committed as it ends, waiting
    out a lost database like every other call of a reconnecting storage; NotImplemented for any other storage."""
    backend = getattr(storage, "_backend", storage)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        session_factory = backend.scoped_session
    except (ImportError, AttributeError):
        return NotImplemented

    def run(_backend) -> Any:
        with _create_scoped_session(session_factory) as session:  # an integrity error is raised, not ignored
            return work(session, models, backend)

    from vadsearch.reconnect import ReconnectingRDBStorage, retrying

    return retrying(run)(backend) if isinstance(backend, ReconnectingRDBStorage) else run(backend)


def _sqlite_upserts() -> bool:
    import sqlite3

    return sqlite3.sqlite_version_info >= (3, 24, 0)  # ON CONFLICT ... DO UPDATE
