"""Copy studies between storages (SQLite file → PostgreSQL, usually) without losing a trial.

The copy is `optuna.copy_study`'s, made through the storages' public calls so that it can say how far it
got (`_copy_study`). It creates the study with the same directions, copies
the study's user and system attributes, then re-creates every trial from its `FrozenTrial`: state,
value, params with their distributions, user attributes, system attributes (an enqueued trial's
`fixed_params`, the grid sampler's ids), per-epoch intermediate values and start/complete times. Trial
numbers come out the same because trials are added in order; trial ids are new.

What it leaves out, and what this module adds:

- Heartbeats are not copied. A RUNNING trial (its worker was stopped, or killed, before the copy)
  would arrive as RUNNING with no heartbeat row, and Optuna's stale-trial check skips such a trial for
  ever (`_get_stale_trial_ids` ignores trials without a heartbeat): its configuration would count as
  "in hand" and the study would never finish. We fail it as `interrupted`, which is what Ctrl-C
  leaves, so that the first worker on the target queues the configuration again without spending a
  retry, and the retry continues from the configuration's epoch checkpoint.
- It refuses a duplicate name only after it has connected and created nothing; we check every name
  before copying the first study, so a refused migration writes nothing.
- A copy that fails halfway leaves a half-copied study behind; we delete it, so that the same
  command can be run again.
- The target study is written under the same study lock that workers take to create or join a study,
  so a worker started on the target at the same moment waits for the whole copy instead of queuing
  grid points that the copy is about to bring.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vadsearch import failures
from vadsearch.errors import ConfigError, StorageError
from vadsearch.storage import mask, open_storage, scrub, sqlite_path, study_lock

log = logging.getLogger(__name__)

INTERRUPTED_ATTR = "interrupted"  # the worker's mark for a trial to queue again without spending a retry
MIGRATED_ATTR = failures.MIGRATED  # why the copy of a RUNNING trial is a FAIL: it was running in the source


@dataclass
class MigratedStudy:
    name: str
    trials: int
    states: dict[str, int] = field(default_factory=dict)
    """Trials by state in the target, after running trials were failed as interrupted."""
    interrupted: int = 0
    """Trials that were RUNNING in the source: failed as interrupted, to be resumed by a worker."""


def migrate(source_url: str, target_url: str, studies: Sequence[str] | None = None,
            grace_period: float | None = None,
            on_copied: Callable[[str, int, int], None] | None = None) -> list[MigratedStudy]:
    """Copy `studies` (default: every study of the source) from one storage to another. `on_copied(name,
    done, total)` follows each trial copied: a study of 30,000 trials takes a quarter of an hour.

    Raises `StorageError`, before anything is written, when a study is missing from the source or
    already in the target, or has a trial whose heartbeat is younger than `grace_period` (None: the
    grace period its worker runs with): a worker still training it would finish it in the source alone,
    and a worker on the target train it again.
    """
    import optuna

    if _same_database(source_url, target_url):
        raise ConfigError(f"{mask(source_url)} is both the source and the target: give the database to copy into")
    path = sqlite_path(source_url)
    if path is not None and not path.is_file():
        raise StorageError(f"no study database at {path}: check SOURCE_URL")
    source = open_storage(source_url, create=False)
    available = optuna.get_all_study_names(source)
    names = list(dict.fromkeys(studies)) if studies else sorted(available)
    if not names:
        raise StorageError(f"no studies in {mask(source_url)}: nothing to migrate")
    missing = [n for n in names if n not in available]
    if missing:
        raise StorageError(f"no study named {', '.join(map(repr, missing))} in {mask(source_url)}; "
                           f"studies there: {', '.join(sorted(available)) or 'none'}")
    _refuse_live_workers(source, names, grace_period)
    target = open_storage(target_url)  # only now: a refused migration leaves no new database behind
    taken = sorted(set(names) & set(optuna.get_all_study_names(target)))
    if taken:
        raise StorageError(f"{mask(target_url)} already has a study named {', '.join(map(repr, taken))}; "
                           "nothing was copied: delete it there (optuna delete-study) or migrate the others "
                           "with --study")
    return [_copy(source, target, name, target_url, on_copied) for name in names]


def _refuse_live_workers(source, names: Sequence[str], grace_period: float | None) -> None:
    from vadsearch.report import live_trials

    live = live_trials(source, names, grace_period)
    if live:
        t = live[0]
        heard = f"heartbeat {t['heartbeat_age_s']:.0f} s ago" if t["heartbeat_age_s"] is not None else "just started"
        raise StorageError(
            f"trial {t['number']} of study {t['study']!r} is being trained ({heard}, worker {t['worker'] or '?'})"
            + (f", and {len(live) - 1} more" if len(live) > 1 else "") + ": stop the workers first, then migrate "
            f"(a killed worker's trial counts as stopped {t['grace_period_s']:g} s after its last heartbeat; "
            "--grace-period 0 if you know its worker is gone)")


def _same_database(a: str, b: str) -> bool:
    """Whether two URLs name one database: one SQLite file, or one PostgreSQL database on one server
    (whatever the driver, user or password)."""
    from sqlalchemy.engine import make_url

    paths = sqlite_path(a), sqlite_path(b)
    if paths[0] is not None or paths[1] is not None:
        return None not in paths and paths[0].resolve() == paths[1].resolve()
    where = [(u.get_backend_name(), u.host or "localhost", u.port or 5432, u.database) for u in map(make_url, (a, b))]
    return where[0] == where[1]


def _copy(source, target, name: str, target_url: str,
          on_copied: Callable[[str, int, int], None] | None = None) -> MigratedStudy:
    import optuna

    with study_lock(target, name):
        try:
            _copy_study(source, target, name, on_copied)
            interrupted = _interrupt_running(target, name)
        except optuna.exceptions.DuplicatedStudyError:
            raise StorageError(f"{mask(target_url)} got a study named {name!r} while we were copying; "
                               "nothing of ours was written for it") from None
        except BaseException as exc:
            _delete_quietly(target, name)
            if isinstance(exc, Exception):
                reason = " ".join(scrub(str(exc), target_url).split()[:40]) or type(exc).__name__
                raise StorageError(f"copying study {name!r} to {mask(target_url)} failed, and its partial "
                                   f"copy was deleted: {reason}") from None
            raise
    study = optuna.load_study(study_name=name, storage=target, sampler=optuna.samplers.RandomSampler())
    trials = study.get_trials(deepcopy=False)
    states = dict(sorted(Counter(t.state.name for t in trials).items()))
    log.info("copied study %s to %s: %d trial(s)", name, mask(target_url), len(trials))
    return MigratedStudy(name, len(trials), states, interrupted)


def _copy_study(source, target, name: str, on_copied: Callable[[str, int, int], None] | None) -> None:
    """What `optuna.copy_study` does, through the storages' public calls, telling `on_copied` of each trial:
    copy_study is silent until it ends, a quarter of an hour for 30,000 trials."""
    study_id = source.get_study_id_from_name(name)
    copy_id = target.create_new_study(source.get_study_directions(study_id), name)  # raises if there is one
    for key, value in source.get_study_system_attrs(study_id).items():
        target.set_study_system_attr(copy_id, key, value)
    for key, value in source.get_study_user_attrs(study_id).items():
        target.set_study_user_attr(copy_id, key, value)
    trials = sorted(source.get_all_trials(study_id, deepcopy=False), key=lambda t: t.number)
    for done, trial in enumerate(trials, start=1):  # in order: the copies get the same numbers
        target.create_new_trial(copy_id, template_trial=trial)
        if on_copied is not None:
            on_copied(name, done, len(trials))


def _interrupt_running(storage, name: str) -> int:
    """Fail the copies of RUNNING trials as interrupted; return how many there were."""
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(name)
    running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
        storage.set_trial_user_attr(trial._trial_id, MIGRATED_ATTR, True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(running)


def _delete_quietly(storage, name: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except Exception as exc:  # noqa: BLE001 — nothing was created, or the database is gone: the error raised says why
        log.debug("could not delete the partial copy of %s: %s", name, exc)


def default_target(target_url: str | None) -> str:
    """TARGET_URL, else $VADSEARCH_STORAGE; never the SQLite default, which is usually the source."""
    url = target_url or os.environ.get("VADSEARCH_STORAGE")
    if not url:
        raise StorageError("no target database: pass TARGET_URL or set VADSEARCH_STORAGE")
    return url
