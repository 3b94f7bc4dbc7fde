"""Workers: join (or create) a study, keep its queue of configurations complete, run trials until done.

Optuna is the whole distributed engine: the study, its trials and their states live in the SQL store,
and any number of workers on any number of machines share it. A configuration is a *point* (its
searched parameters as canonical JSON). Each point's trials tell its story:

- COMPLETE or PRUNED: settled, never run again;
- WAITING or RUNNING: in hand;
- FAIL with `fail_reason`: the configuration raised; requeued until `max_retries` is spent;
- FAIL with `interrupted` or `machine_fault` (Ctrl-C; a checkpoint that could not be written, a GPU
  shared by too many workers): always requeued, and the worker stops;
- FAIL with neither: its worker died and its heartbeat went stale; requeued up to `max_stale_retries`
  (`vadsearch.failures` tells these apart, for reports too);
- FAIL with `orphan` and `repeat_of` or `surplus`: a sampler proposed a configuration that another trial
  ran, runs or gave up on, or one beyond `max_trials`; nothing was trained, and it counts nowhere.

Requeuing happens only in `reconcile`, under a lock on the study, so two workers never queue the same
point twice. A requeued point resumes from the epoch checkpoints in its run directory, which is named
after the configuration's fingerprint, not after the trial.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vadsearch import failures, interrupts
from vadsearch.errors import CheckpointError, GpuMemoryError, MachineFault, StudyFileError, TrainingError
from vadsearch.fit import fit
from vadsearch.outdir import replacing
from vadsearch.storage import (
    DB_OUTAGE_LIMIT_S,
    GRACE_PERIOD_S,
    HEARTBEAT_INTERVAL_S,
    mask,
    open_storage,
    set_user_attrs,
    set_user_attrs_with_final_state,
    sqlite_path,
    storage_url,
    study_lock,
)
from vadsearch.studyfile import StudySpec

if TYPE_CHECKING:
    import optuna

    from vadsearch.data import Corpus

log = logging.getLogger(__name__)

STUDY_ATTR = "vadsearch"
REPEATS_BEFORE_RANDOM = 5
"""Sampled trials in a row that repeat a configuration before the worker's next ones draw at random."""


class NotTrained(Exception):
    """A sampled trial that is a repeat of another, or beyond the study's max_trials."""


def point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


@dataclass(frozen=True)
class WorkerOptions:
    storage: str | None = None
    artifacts: Path = Path("vadsearch-artifacts")
    """Root of the run directories (epoch checkpoints, best weights); shared by all workers."""
    data: Path | None = None
    device: str = "auto"
    n_trials: int | None = None
    """Trials this worker runs at most; None: until the study is finished."""
    timeout: float | None = None
    """Seconds after which this worker starts no new trial."""
    heartbeat_interval: int = HEARTBEAT_INTERVAL_S
    grace_period: int = GRACE_PERIOD_S
    """A RUNNING trial whose heartbeat is older than this is stale: its worker is taken for dead."""
    max_stale_retries: int = 10
    db_outage_limit: float = DB_OUTAGE_LIMIT_S
    """Seconds to wait out an unreachable database before exiting (the running trial stays resumable)."""
    progress: bool = True
    keep: str = "best"
    """What a completed trial leaves on disk: all, best or study-best (see vadsearch.retention)."""

    def __post_init__(self) -> None:
        from vadsearch.errors import ConfigError

        if self.heartbeat_interval < 1:
            raise ConfigError(f"--heartbeat-interval must be at least 1 second, got {self.heartbeat_interval}")
        if self.grace_period <= self.heartbeat_interval:
            # Shorter than the time between two heartbeats, every running trial would look dead.
            raise ConfigError(f"--grace-period ({self.grace_period} s) must be longer than --heartbeat-interval "
                              f"({self.heartbeat_interval} s)")
        if self.n_trials is not None and self.n_trials < 0:  # 0: create or join the study, queue it, run none
            raise ConfigError(f"--n-trials must be 0 or more, got {self.n_trials}")
        for flag, value in (("--timeout", self.timeout), ("--db-timeout", self.db_outage_limit)):
            if value is not None and not value >= 0:
                raise ConfigError(f"{flag} must be a number of seconds >= 0, got {value}")

    @property
    def poll_interval(self) -> float:
        """While every open point runs elsewhere, look for stale trials this often."""
        return min(5.0, max(0.5, self.grace_period / 4))


@dataclass
class WorkerSummary:
    study: str
    trials: list[int] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stopped: str = ""  # why the worker stopped: finished, n-trials, timeout, interrupted


@dataclass
class _Outcome:
    """How the objective of one trial ended: what the worker does once Optuna has stored it."""

    number: int
    state: str = "FAIL"  # or COMPLETE, PRUNED; REPEAT or SURPLUS: not trained (see _refuse_repeat_or_surplus)
    value: float | None = None
    run_dir: Path | None = None
    repeats_running: bool = False  # REPEAT of a trial still running


@dataclass
class _Point:
    params: dict[str, Any]
    settled: bool = False
    active: bool = False
    failures: int = 0
    stale: int = 0


def survey(spec: StudySpec, trials: list[optuna.trial.FrozenTrial], max_stale_retries: int) -> dict[str, _Point]:
    """Every known point of the study and where it stands."""
    from optuna.trial import TrialState

    points: dict[str, _Point] = {}
    if spec.sampler == "grid":
        for params in spec.grid():
            points[point_key(params)] = _Point(params)
    for trial in trials:
        attrs = trial.user_attrs
        if attrs.get("orphan") or "point" not in attrs:
            continue
        point = points.setdefault(attrs["point"], _Point(json.loads(attrs["point"])))
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            point.settled = True
        elif trial.state in (TrialState.RUNNING, TrialState.WAITING):
            point.active = True
        else:  # FAIL
            cause = failures.kind(attrs)
            if cause == failures.ERROR:
                point.failures += 1
            elif cause == failures.LOST:
                point.stale += 1
            # interrupted, or a machine fault: not the configuration's fault, requeued without spending a retry
    for point in points.values():
        if point.failures > spec.max_retries or point.stale > max_stale_retries:
            point.settled = True  # given up on: a failed point in the report, not an endless loop
    return points


def reconcile(study: optuna.Study, spec: StudySpec, max_stale_retries: int) -> int:
    """Queue every point that is neither settled nor in hand; return how many were queued."""
    # A study's first read is of every trial (a minute at 30,000), made here outside the lock that every other
    # worker's start waits on; the read inside it is then of the trials that changed since (Optuna's cache).
    study.get_trials(deepcopy=False)
    with study_lock(study._storage, study.study_name):
        points = survey(spec, study.get_trials(deepcopy=False), max_stale_retries)
        queued = 0
        for key, point in points.items():
            if not (point.settled or point.active):
                study.enqueue_trial(point.params, user_attrs={"point": key})
                queued += 1
    if queued:
        log.info("queued %d configuration(s) of study %s", queued, study.study_name)
    return queued


def finished(spec: StudySpec, points: dict[str, _Point]) -> bool:
    settled = sum(p.settled for p in points.values())
    if spec.sampler == "grid":
        return settled == len(points)
    return settled >= spec.max_trials


def progress(study: optuna.Study, spec: StudySpec) -> tuple[int, int, int]:
    """(settled configurations, running trials, configurations given up on) of a study (`watched`), for a
    bar. A study kept from one call to the next reads only the trials that changed since (Optuna's cache):
    `launch`'s bar read all of them each second, 30 s a read at 30,000 trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    points = survey(spec, trials, max_stale_retries=WorkerOptions.max_stale_retries)
    running = sum(t.state == TrialState.RUNNING and not t.user_attrs.get("orphan") for t in trials)
    return sum(p.settled for p in points.values()), running, _given_up(points, trials)


def watched(storage: optuna.storages.BaseStorage, spec: StudySpec) -> optuna.Study:
    """The study, loaded to be read (by `progress`), not run: no sampler of its own to build."""
    import optuna

    return optuna.load_study(study_name=spec.name, storage=storage, sampler=optuna.samplers.RandomSampler())


def given_up(spec: StudySpec, trials: list[optuna.trial.FrozenTrial]) -> int:
    """Configurations no worker will run again: they failed more than the study's retries allow."""
    return _given_up(survey(spec, trials, max_stale_retries=WorkerOptions.max_stale_retries), trials)


def _given_up(points: dict[str, _Point], trials) -> int:
    from optuna.trial import TrialState

    # One pass: a scan of every trial for each failed point took 36 s at 40,000 trials (launch's bar, status).
    completed = {t.user_attrs.get("point") for t in trials if t.state == TrialState.COMPLETE}
    return sum(p.settled and bool(p.failures or p.stale) and key not in completed for key, p in points.items())


def open_study(
    spec: StudySpec, storage: optuna.storages.RDBStorage, max_stale_retries: int, corpus: Corpus
) -> optuna.Study:
    """Create the study or join it; refuse to join one whose search space or data differ from ours. Its
    sampler is seeded by the study's seed alone: a worker sets its own stream (`join_turn`)."""
    import optuna

    description = _description(spec, corpus)
    sampler = spec.make_sampler()
    with study_lock(storage, spec.name):
        try:
            study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                      pruner=spec.make_pruner())
        except KeyError:
            study = optuna.create_study(study_name=spec.name, storage=storage, direction="minimize",
                                        sampler=sampler, pruner=spec.make_pruner())
            log.info("created study %s (%s)", spec.name, mask(storage.url))
        if STUDY_ATTR not in study.user_attrs:
            # New, or its creator stopped (Ctrl-C, a kill) before describing it: described now, or any
            # study file could join it.
            study.set_user_attr(STUDY_ATTR, description)
    stored = study.user_attrs.get(STUDY_ATTR)
    _check_join(spec, stored, description)
    if stored is not None and stored.get("max_trials") != spec.max_trials:
        # More (or fewer) trials of the same search is the same study: the latest file's count is the one
        # `status` and the other workers' progress show.
        with study_lock(storage, spec.name):
            study.set_user_attr(STUDY_ATTR, {**study.user_attrs[STUDY_ATTR], "max_trials": spec.max_trials})
        log.info("study %s now runs %s trials (was %s)", spec.name, spec.max_trials, stored.get("max_trials"))
    reconcile(study, spec, max_stale_retries)
    return study


def resume_first(study: optuna.Study) -> None:
    """Make `study` take, of its waiting trials, first those whose configuration already trained epochs (a
    trial stopped by Ctrl-C, or taken over from a dead worker, queued again): Optuna takes the oldest, and a
    configuration requeued behind a 72-point grid resumed last, its checkpoints idle on disk meanwhile."""
    import types

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    def pop(self: optuna.Study) -> int | None:  # Optuna's Study._pop_waiting_trial_id, in another order
        storage = self._storage
        waiting = storage.get_all_trials(self._study_id, deepcopy=False, states=(TrialState.WAITING,))
        if not waiting:
            return None
        failed = storage.get_all_trials(self._study_id, deepcopy=False, states=(TrialState.FAIL,))
        begun = {t.user_attrs["point"] for t in failed if t.intermediate_values and "point" in t.user_attrs}
        for trial in sorted(waiting, key=lambda t: t.user_attrs.get("point") not in begun):  # stable: by number
            try:
                if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                    return trial._trial_id
            except UpdateFinishedTrialError:
                pass  # another worker took it and finished it meanwhile
        return None

    study._pop_waiting_trial_id = types.MethodType(pop, study)


JOINED_ATTR = "workers_joined"


def join_turn(storage: optuna.storages.BaseStorage, study: optuna.Study) -> int:
    """How many workers joined `study` before this one (0 for the first), counted under the study lock."""
    with study_lock(storage, study.study_name):
        turn = int(study.user_attrs.get(JOINED_ATTR, 0))
        study.set_user_attr(JOINED_ATTR, turn + 1)
    return turn


def study_corpus(spec: StudySpec, data: Path | None = None) -> Corpus:
    """The sentences a study trains on: `data` (--data), else its file's [data] path or the default
    corpus, cut to its [data] subset."""
    from vadsearch.data import SPLITS, load_emobank

    corpus = load_emobank(data or spec.data_path)
    if not spec.data_subset:
        return corpus
    short = [f"{n} {name} sentences, the file has {len(corpus.splits[name])}"
             for name, n in zip(SPLITS, spec.data_subset) if n > len(corpus.splits[name])]
    if short:
        log.warning("%s: [data] subset asks for %s: all of them are used", spec.path, "; ".join(short))
    return corpus.subset(*spec.data_subset, seed=spec.seed)


def check_study(spec: StudySpec, storage: optuna.storages.BaseStorage, corpus: Corpus) -> None:
    """Refuse, as a worker would, a study file that the stored study of the same name does not admit
    (for `launch`, before it starts workers that would each refuse it); nothing is written."""
    import optuna

    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        return
    _check_join(spec, study.user_attrs.get(STUDY_ATTR), _description(spec, corpus))


def _description(spec: StudySpec, corpus: Corpus) -> dict[str, Any]:
    """What a study stores of itself: its file's settings and its sentences (for a subset, also the file's
    checksum: two files' subsets drawn with one seed are different sentences)."""
    return {**spec.to_dict(), "data_sha256": corpus.sha256, "file_sha256": corpus.file_sha256}


def check_models(configs: list) -> None:
    """The word vectors (downloaded once, if named and missing), encoders and layer windows that `configs` (a
    study's `checked_points`) reach: one of them missing would fail every trial of a worker, and every worker."""
    from vadsearch.vectors import resolve_vectors

    for vectors in sorted({c.vectors for c in configs if c.model == "lstm" and c.embedding == "external"}):
        resolve_vectors(vectors)
    bert = sorted({(c.model_name, c.trainable_layers) for c in configs if c.model == "bert"})
    for model_name in sorted({name for name, _ in bert}):
        from vadsearch.encoding import load_tokenizer

        load_tokenizer(model_name)
    for model_name, window in bert:
        from vadsearch.models.bert import check_trainable_layers

        check_trainable_layers(model_name, window)


def check_artifacts(root: Path, spec: StudySpec) -> None:
    """An artifact directory that cannot be written would fail every trial: say so once, before the first."""
    from vadsearch.outdir import writable_dir

    writable_dir(root / spec.name, "the artifact directory", CheckpointError,
                 "fix its permissions or free space, or pass --artifacts DIR")


STUDY_ID_ATTR = "vadsearch_id"
ARTIFACTS_MARKER = ".study-id"


def claim_artifacts(root: Path, study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """Tie `root/<study name>` to this study. Run directories are named by study and configuration, so a
    study of the same name in another database (another --storage, or $VADSEARCH_STORAGE forgotten in a
    new shell) resumed from this one's checkpoints, then its retention deleted them."""
    import uuid

    with study_lock(storage, study.study_name):
        ident = study.user_attrs.get(STUDY_ID_ATTR)
        if ident is None:  # new, or made before studies had one: copies (`migrate`) keep it
            ident = uuid.uuid4().hex
            study.set_user_attr(STUDY_ID_ATTR, ident)
    marker = Path(root) / study.study_name / ARTIFACTS_MARKER
    found = _artifacts_owner(marker)
    if found is None:
        try:
            with replacing(marker) as temporary:  # two workers of the study write the same
                temporary.write_text(json.dumps({"id": ident, "storage": _database(storage)}), encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"cannot write {marker}: {exc.strerror or exc}; free disk space or fix its "
                                  "permissions, or pass --artifacts DIR") from None
        return
    if found.get("id") != ident:
        _refuse_artifacts(marker, found, storage)


def refuse_others_artifacts(root: Path, name: str, storage: optuna.storages.RDBStorage) -> None:
    """Refuse, before the study is made or a worker starts, a `root/<name>` that holds the checkpoints of
    another study of that name (`claim_artifacts`)."""
    import optuna

    marker = Path(root) / name / ARTIFACTS_MARKER
    found = _artifacts_owner(marker)
    if found is None:
        return
    if name in optuna.get_all_study_names(storage):
        ident = storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(STUDY_ID_ATTR)
        if ident is None or ident == found.get("id"):  # ours, or one made before studies had an id
            return
    _refuse_artifacts(marker, found, storage)


def _artifacts_owner(marker: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: nothing to go by, as before markers existed
        return None
    return found if isinstance(found, dict) else None


def _refuse_artifacts(marker: Path, found: dict[str, Any], storage: optuna.storages.RDBStorage) -> None:
    ours = _database(storage)
    if found.get("storage") == ours:  # the database was deleted, or the study, and made anew
        raise StudyFileError(
            f"{marker.parent} holds the checkpoints of an earlier study named {marker.parent.name!r} in "
            f"{ours}, since deleted: remove {marker.parent} to start over, or pass another --artifacts")
    raise StudyFileError(
        f"{marker.parent} holds the checkpoints of another study named {marker.parent.name!r} (in "
        f"{found.get('storage', 'another database')}), not the one in {ours}: pass that "
        "--storage, another --artifacts, or give this study another [study] name")


def _database(storage: optuna.storages.RDBStorage) -> str:
    """The storage's URL, password masked; a SQLite file's path made absolute: `sqlite:///vadsearch.db`
    names another file in each directory."""
    path = sqlite_path(storage.url)
    return f"sqlite:///{path.resolve()}" if path is not None else mask(storage.url)


def _check_join(spec: StudySpec, stored: dict[str, Any] | None, ours: dict[str, Any]) -> None:
    if stored is None:
        return
    changed = _changes(stored, ours)
    if changed:
        raise StudyFileError(
            f"{spec.path}: study {spec.name!r} already exists in the storage with other settings "
            f"({'; '.join(changed)}); give the study a new [study] name, or use the original file"
        )
    if stored.get("data_sha256") != ours["data_sha256"]:
        raise StudyFileError(f"{spec.path}: study {spec.name!r} was run on {_other_data(stored, ours)}, "
                             "or give the study a new [study] name")


def _changes(stored: dict[str, Any], ours: dict[str, Any], shown: int = 3) -> list[str]:
    """What decides the trials and differs between a study's stored description and a study file's, in
    words. The epoch budget counts: a finished trial is not trained further under a larger max_epochs
    (its epoch checkpoints are gone under the default --keep), and a leaderboard must not mix budgets.
    Free text, the file's path, the trial count, the axes' order and options that change no run (the
    evaluation batch, a baseline's hidden_size) may change."""
    found = []
    if stored.get("sampler") != ours.get("sampler"):
        found.append(f"sampler was {stored.get('sampler')!r}, now {ours.get('sampler')!r}")
    pruners = [_pruner(d.get("pruner")) for d in (stored, ours)]
    if pruners[0] != pruners[1]:  # which trials run to the end
        found.append(f"[pruner] was {pruners[0]}, now {pruners[1]}")
    axes = [{p["name"]: p for p in d.get("space") or []} for d in (stored, ours)]
    for name in sorted(axes[0].keys() | axes[1].keys()):
        was, now = (a.get(name) for a in axes)
        if was is None or now is None:
            found.append(f"[search] {name} {'is new' if was is None else 'is gone'}")
        elif was != now:
            # Optuna keeps a categorical axis's choices in order: the same values reordered are another axis.
            same = _sorted_choices(was)
            reordered = " (the same values in another order)" if same and same == _sorted_choices(now) else ""
            found.append(f"[search] {name} was {_axis_words(was)}, now {_axis_words(now)}{reordered}")
    bases = [d.get("base") or {} for d in (stored, ours)]
    decisive = _decisive(stored, ours)
    for key in sorted((bases[0].keys() | bases[1].keys()) & decisive):
        if bases[0].get(key) != bases[1].get(key):
            found.append(f"[train] {key} was {bases[0].get(key)!r}, now {bases[1].get(key)!r}")
    return found[:shown] + ([f"{len(found) - shown} more"] if len(found) > shown else [])


def _axis_words(axis: dict[str, Any]) -> str:
    """A stored axis as the study file writes it: `[8, 16]`, `{ low = 0.0001, high = 0.01, log = true }`."""
    if axis.get("kind") == "categorical":
        return json.dumps(axis.get("choices"))
    extra = {key: axis.get(key) for key in ("step", "log") if axis.get(key)}
    fields = {"low": axis.get("low"), "high": axis.get("high"), **extra}
    return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in fields.items()) + " }"


def _sorted_choices(axis: dict[str, Any]) -> list[str] | None:
    choices = axis.get("choices") if axis.get("kind") == "categorical" else None
    return None if choices is None else sorted(json.dumps(c) for c in choices)


def _decisive(*descriptions: dict[str, Any]) -> set[str]:
    """The [train] options that change some run of either study: one that changes none (a baseline's
    hidden_size, warm-up under a constant schedule, the evaluation batch) may differ."""
    found: set[str] = set()
    for description in descriptions:
        try:
            found |= StudySpec.from_dict(description).decisive_options()
        except Exception:  # a description this version cannot read: every option counts
            found |= set(description.get("base") or {}) - {"eval_batch_size"}
    return found


def _pruner(pruner: dict[str, Any] | None) -> str:
    if not pruner or pruner.get("kind") == "none":
        return "none"
    return " ".join(f"{k}={v}" if k != "kind" else str(v) for k, v in pruner.items())


def _other_data(stored: dict[str, Any], ours: dict[str, Any]) -> str:
    """Which data a study was run on, against ours, in words (a subset's key is no file's checksum)."""
    subsets = [(d.get("data_subset"), d.get("seed", 0)) for d in (stored, ours)]
    if any(subset for subset, _ in subsets) and subsets[0] != subsets[1]:
        said = ["the whole file" if subset is None else f"subset {'/'.join(map(str, subset))} drawn with seed {seed}"
                for subset, seed in subsets]
        return f"other sentences ({said[0]}; this file: {said[1]}): use the original [data] subset and [study] seed"
    from vadsearch.data import described_file_sha256

    file = described_file_sha256(stored)
    checksum = f" (sha256 {file[:12]})" if file else ""
    return f"another data file{checksum}: pass the same --data or [data] path"


class _NoTracebacks(logging.Filter):
    """Optuna logs a failed trial with its traceback; the reason is stored on the trial and one line
    is enough in a worker's log. A Ctrl-C is no error, and a repeated configuration no failure at all:
    Optuna's lines about them are dropped, the worker logs its own."""

    def __init__(self) -> None:
        super().__init__()
        self.untrained: set[int] = set()  # numbers of the trials in hand that end untrained (repeat, surplus)
        self.interrupted: set[str] = set()  # numbers of the trials a stop signal ended, as Optuna writes them

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        message = record.getMessage() if record.name.startswith("optuna.") else ""
        if message.startswith("Trial ") and " failed " in message:
            number = message.split()[1]
            if "KeyboardInterrupt" in message:  # Ctrl-C, SIGTERM: the worker says it stopped, and why
                self.interrupted.add(number)
            return number not in self.interrupted and number not in map(str, self.untrained)
        return True


_NO_TRACEBACKS = _NoTracebacks()


# What a worker adds to a machine fault's message: what happens to it and to its trial.
_STOPS_BECAUSE = {
    GpuMemoryError: "; this worker stops so that the others can go on, and its trial is queued again without "
                    "spending a retry",
}


class Worker:
    def __init__(self, spec: StudySpec, options: WorkerOptions) -> None:
        self.spec = spec
        self.options = options
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.summary = WorkerSummary(spec.name)
        self._corpus: Corpus | None = None
        self._taken_over: int | None = None  # a trial another worker took over from this one
        self._machine_fault: MachineFault | None = None  # disk full, GPU oversubscribed: stop after the trial
        self._storage = None
        self._outcome: _Outcome | None = None  # of the trial in hand; settled after Optuna stored it
        self._last_identity: tuple[str | None, dict[str, Any]] = (None, {})
        self._device = "none (no model to train)"
        self._repeats = 0  # trials in a row whose sampled configuration was run or running already
        self._repeat_active = False  # the last one repeats a trial still running: wait before asking again
        self._torch_device = None  # where trials train, once torch is loaded: its memory is released after each

    # --- before the first trial: everything that could fail for every trial fails here, once -----
    def preflight(self) -> None:
        from vadsearch.config import check_device

        configs = self.spec.checked_configs()  # no search: the base alone
        check_device(self.options.device)  # by name, without torch: a baseline-only study needs no device
        if {c.model for c in configs} != {"baseline"}:
            with interrupts.deferred():  # a Ctrl-C raised while torch loads could abort the process
                from vadsearch.train import describe_device, resolve_device  # loads torch

            self._torch_device = resolve_device(self.options.device)  # and the device exists
            self._device = describe_device(self._torch_device)
        self._corpus = study_corpus(self.spec, self.options.data)
        check_artifacts(self.options.artifacts, self.spec)  # after the input checks: bad input leaves nothing behind
        check_models(configs)

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> WorkerSummary:
        try:
            study = self._start()
        except KeyboardInterrupt:  # before any trial: nothing to queue again, and the same words as after one
            self.summary.stopped = "interrupted"
            return self.summary
        started = time.monotonic()
        try:
            self.summary.stopped = self._loop(study, started)
        except KeyboardInterrupt:
            self.summary.stopped = "interrupted"
            self._interrupt_own_trials(study)
            reconcile(study, self.spec, self.options.max_stale_retries)  # requeue the trial Ctrl-C stopped
        return self.summary

    def _start(self) -> optuna.Study:
        """Check everything, open the storage, create or join the study."""
        import optuna

        self.preflight()
        optuna_root = optuna.logging.get_logger("optuna")  # creates Optuna's own handler if not there yet
        for handler in optuna_root.handlers + logging.getLogger().handlers:
            handler.addFilter(_NO_TRACEBACKS)  # one shared instance: adding it again is a no-op
        opts = self.options
        storage = self._storage = open_storage(
            storage_url(opts.storage),
            heartbeat_interval=opts.heartbeat_interval,
            grace_period=opts.grace_period,
            on_stale=lambda study, trial: reconcile(study, self.spec, opts.max_stale_retries),
            outage_limit=opts.db_outage_limit,
        )
        # A queued trial's identity is written in the transaction that starts it, not in one of its own.
        storage.on_start = self._start_attrs
        storage.queue_only = self.spec.sampler == "grid"  # a grid samples nothing: it runs queued points
        refuse_others_artifacts(opts.artifacts, self.spec.name, storage)  # before the study is made here
        study = open_study(self.spec, storage, opts.max_stale_retries, self._corpus)
        claim_artifacts(opts.artifacts, study, storage)
        resume_first(study)
        self._samplers = (study.sampler, study.sampler)  # a grid samples nothing: it runs queued points
        if self.spec.sampler != "grid":
            # A stream of the study's seed for this worker alone (see StudySpec.make_sampler), numbered by
            # its turn to join: the same study file run again from an empty database proposes the same.
            stream = f"worker-{join_turn(storage, study)}"
            self._samplers = (self.spec.make_sampler(stream),
                              optuna.samplers.RandomSampler(seed=self.spec.stream_seed(f"{stream}:random")))
        log.info("worker %s on study %s (%s), device %s", self.name, self.spec.name, mask(storage.url), self._device)
        return study

    def _interrupt_own_trials(self, study: optuna.Study) -> None:
        """Fail as interrupted this worker's trials that are still RUNNING: one Ctrl-C stopped between its
        start and Optuna's own handling is queued again now, not once it goes stale."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("worker") == self.name:
                self._storage.attrs_with_final_state(trial._trial_id, {"interrupted": True})
                try:
                    self._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                except UpdateFinishedTrialError:
                    pass

    def _loop(self, study: optuna.Study, started: float) -> str:
        import optuna

        from vadsearch.reconnect import QueueEmpty

        opts = self.options
        queue_empty = waiting = False
        while True:
            interrupts.check()  # a Ctrl-C that a finalizer swallowed stops the worker here, not at the study's end
            if opts.n_trials is not None and len(self.summary.trials) >= opts.n_trials:
                return "n-trials"
            if opts.timeout is not None and time.monotonic() - started >= opts.timeout:
                return "timeout"
            # A grid worker takes the next queued point straight away, and reads every trial (a read that
            # grows with the study) only once the queue ran dry; a sampled study counts them every time.
            if self.spec.sampler != "grid" or queue_empty:
                queue_empty = False
                state = self._survey_and_queue(study)
                if state == "finished":
                    return "finished"
                if state == "wait":
                    # Every open point runs elsewhere: wait, in case one of those workers dies.
                    if not waiting:
                        self._say_waiting(study)
                    waiting = True
                    with warnings.catch_warnings():  # "experimental" in Optuna 5, used knowingly (DESIGN.md)
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
                    time.sleep(opts.poll_interval)
                    continue
            self._taken_over = self._machine_fault = None
            if self._repeat_active:
                self._repeat_active = False
                time.sleep(opts.poll_interval)  # the configuration it drew runs elsewhere: let it go on
            # A sampler that keeps proposing what was run (TPE in a small discrete space) draws at random
            # until a trial trains: each draw then hits one of the configurations not run yet.
            study.sampler = self._samplers[self._repeats >= REPEATS_BEFORE_RANDOM]
            try:
                self._outcome = None
                # A stop signal is held through the trial's whole life and raised at its stop points (between
                # training steps, train.py) or once the trial is stored and settled: raised inside Optuna (as it
                # started the trial's heartbeat thread, say) or in a finalizer, it left a thread beating on,
                # an "Exception ignored" traceback, or Optuna's own UnboundLocalError.
                with interrupts.deferred():
                    study.optimize(self._objective, n_trials=1, catch=(Exception,))
                    waiting = False  # a trial was started: a wait from now on is a new one
                    if self._torch_device is not None:
                        from vadsearch.gpumemory import release

                        release(self._torch_device)  # not held through a wait, nor counted against the next trial
                    self._settle(study)  # a finished trial's retention, before a stop held meanwhile
                if self._machine_fault is not None:
                    # Every trial here would fail the same way: requeue this one and stop, saying why.
                    reconcile(study, self.spec, opts.max_stale_retries)
                    raise self._machine_fault
            except QueueEmpty:  # another worker took the last waiting point; no trial was created
                queue_empty = True
            except MachineFault:
                raise
            except Exception as exc:
                # A second stop signal (the user insisting) raises wherever it lands; inside Optuna's final
                # write, Optuna's _run_trial turns it into an UnboundLocalError of its own: still a stop.
                interrupts.check()
                gave_up = getattr(self._storage, "gave_up", "")
                if gave_up:
                    # Optuna 5's _run_trial turns a storage failure during its final bookkeeping into
                    # an UnboundLocalError of its own; the cause is the outage.
                    from vadsearch.reconnect import DatabaseUnreachable

                    raise DatabaseUnreachable(gave_up) from None
                if not (isinstance(exc, ValueError) and self._taken_over is not None):
                    raise
                # Optuna refused to finish a trial that another worker had already failed as stale
                # and requeued: that worker's result stands, ours is dropped.
                log.warning("trial %d was taken over by another worker while this one could not reach the "
                            "database; its result here is not recorded", self._taken_over)

    def _say_waiting(self, study: optuna.Study) -> None:
        """Once per wait: a worker that waits in silence (for a killed worker's heartbeat to go stale)
        looks hung."""
        from optuna.trial import TrialState

        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if not t.user_attrs.get("orphan")]
        grace = self._storage.grace_period if self._storage is not None else None
        log.info("waiting: every configuration left runs on another worker (trial%s %s); one whose worker "
                 "stopped is taken over once its heartbeat is %s s old", "s" * (len(running) != 1),
                 ", ".join(map(str, running)) or "-", grace)

    def _survey_and_queue(self, study: optuna.Study) -> str:
        """`finished`, `wait` (every open point runs elsewhere) or `run` (a trial waits to be run)."""
        from optuna.trial import TrialState

        max_stale = self.options.max_stale_retries
        trials = study.get_trials(deepcopy=False)
        points = survey(self.spec, trials, max_stale)
        if finished(self.spec, points):
            return "finished"
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and reconcile(study, self.spec, max_stale) == 0:
            in_hand = sum(p.settled or p.active for p in points.values())
            size = self.spec.space_size()  # None for a continuous space: never all in hand
            if self.spec.sampler == "grid" or in_hand >= self.spec.max_trials or (size and in_hand >= size):
                return "wait"
        return "run"

    def _settle(self, study: optuna.Study) -> None:
        """After Optuna stored the trial's final state (a kill before that must find the checkpoints).

        The outcome comes from the objective itself, not from an Optuna callback, which would read the
        whole trial back from the storage once more per trial. When `optimize` returns, the state the
        objective ended in is stored: a returned value as COMPLETE, a pruning as PRUNED, an error as FAIL.
        """
        outcome, self._outcome = self._outcome, None
        if outcome is None:  # a trial that never reached the objective
            return
        self._repeat_active = outcome.repeats_running
        if outcome.state in ("REPEAT", "SURPLUS"):  # trained nothing: not one of the trials --n-trials counts
            _NO_TRACEBACKS.untrained.discard(outcome.number)  # Optuna has logged it by now
            self._repeats += outcome.state == "REPEAT"
            return
        self._repeats = 0
        self.summary.trials.append(outcome.number)
        self.summary.states[outcome.state] += 1
        if outcome.state in ("COMPLETE", "PRUNED") and outcome.run_dir is not None:
            from vadsearch.retention import retain

            # A pruned configuration is never resumed either; it is never the study's best.
            retain(study, self.options.keep, trial_number=outcome.number, run_dir=outcome.run_dir,
                   dev_mse=outcome.value if outcome.state == "COMPLETE" else math.inf,
                   root=self.options.artifacts / self.spec.name)

    # --- one trial ---------------------------------------------------------------------------------
    def _objective(self, trial: optuna.Trial) -> float:
        self._outcome = _Outcome(trial.number)
        try:
            value = self._train_trial(trial)
        except KeyboardInterrupt:
            # Wherever it lands in the trial, before training too: a FAIL without it counts as a lost worker.
            set_user_attrs_with_final_state(trial, {"interrupted": True})
            raise
        self._outcome.state, self._outcome.value = "COMPLETE", value
        return value

    def _train_trial(self, trial: optuna.Trial) -> float:
        import optuna

        from vadsearch.reconnect import DatabaseUnreachable

        params = self.spec.suggest(trial)
        key = point_key(self.spec.canonical(params))  # a grid's points are canonical already (`StudySpec.grid`)
        if self.spec.sampler != "grid":
            self._refuse_repeat_or_surplus(trial, key)
        config = self.spec.config_for(params)
        identity = self._identity(params)
        run_dir = self._outcome.run_dir = Path(identity["checkpoint_dir"])
        if "point" not in trial.user_attrs:  # a queued point carries it from the queue already
            identity["point"] = key  # canonical: two configurations of one run read the same
        stored = trial.user_attrs  # a queued trial got its identity as it started (see `run`)
        unwritten = {key: value for key, value in identity.items()
                     if stored.get(key) != json.loads(json.dumps(value))}  # compared as stored: JSON
        if unwritten:
            set_user_attrs(trial, unwritten)
        log.info("trial %d: %s", trial.number, point_key(params))

        best = 0

        def on_epoch(epoch) -> None:
            nonlocal best
            trial.report(epoch.dev.mse, epoch.epoch)  # its step is the epoch count `status` shows
            interrupts.check()  # a Ctrl-C that a finalizer swallowed during the epoch stops the trial here
            best = epoch.epoch if epoch.best else best
            if not epoch.restored:
                if epoch.epoch == 1:
                    trial.set_user_attr("resumed_from", 0)  # known now, not only if the trial finishes
                # A worker's log (launch writes one per worker) shows how each trial is going, epoch by epoch.
                log.info("trial %d: epoch %d/%d  loss %.4f  dev %.4f%s  %.1f s", trial.number, epoch.epoch,
                         config.max_epochs, epoch.train_loss, epoch.dev.mse, "  best" if epoch.best else "",
                         epoch.seconds)
            # Restored epochs are judged too, each at its own step, as if the run had not been interrupted:
            # a pruner such as Hyperband records its rungs as it is asked, epoch by epoch.
            # A run that ends with this epoch (its budget, or its patience, is spent) has done its work: it
            # is scored, best epoch and test split, rather than pruned on its last dev score.
            last = epoch.epoch == config.max_epochs or config.out_of_patience(epoch.epoch, best)
            if not last and trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch.epoch} (dev {epoch.dev.mse:.4f})")

        def on_resume(epochs: int) -> None:
            trial.set_user_attr("resumed_from", epochs)
            log.info("trial %d: resumed from its epoch-%d checkpoint", trial.number, epochs)

        if config.model != "baseline":
            self._say_if_checkpoints_are_elsewhere(trial, key, run_dir)

        try:
            result = fit(config, self._corpus, run_dir=run_dir, device=self.options.device,
                         on_epoch=on_epoch, on_resume=on_resume, progress=self.options.progress)
            self._record_result(trial, result, len(self._corpus.train))
        except optuna.TrialPruned:
            self._outcome.state = "PRUNED"
            raise
        except DatabaseUnreachable:
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            # Failed as stale by another worker while we could not reach the database: stop here.
            self._taken_over = trial.number
            raise
        except MachineFault as exc:
            if isinstance(exc, GpuMemoryError) and self._gave_way_before(trial, key):
                # Out of memory on a shared card for the second time: most likely a configuration that needs
                # more than a share, so its own error from now on (retried, then given up), and the worker
                # goes on. Otherwise it would stop one worker after another, spending nothing.
                error = TrainingError(f"{exc}; this configuration ran out of GPU memory on a shared card before "
                                      "too, so it counts as its own error")
                set_user_attrs_with_final_state(trial, {"fail_reason": f"TrainingError: {error}"[:500]})
                raise error from None
            # A new exception, never raised here, holds no traceback: the one torch raised holds the
            # trial's model and optimizer on the GPU until the worker exits.
            fault = type(exc)(f"{exc}{_STOPS_BECAUSE.get(type(exc), '')}")
            set_user_attrs_with_final_state(
                trial, {"fail_reason": f"{type(fault).__name__}: {fault}"[:500], "machine_fault": True})
            self._machine_fault = fault
            raise
        except Exception as exc:
            # torch's errors from C++ carry the stack of its frames after the message: not for a report.
            reason = " ".join(str(exc).split("\nException raised from ")[0].split()) or type(exc).__name__
            set_user_attrs_with_final_state(trial, {"fail_reason": f"{type(exc).__name__}: {reason}"[:500]})
            raise
        return result.dev.mse

    @staticmethod
    def _say_if_checkpoints_are_elsewhere(trial: optuna.Trial, key: str, run_dir: Path) -> None:
        """Warn when an earlier trial of this configuration trained epochs but its checkpoints are not in
        this worker's run directory: started from another directory, or with another --artifacts, a worker
        trained the configuration again from epoch 1 without a word, the old checkpoints left on disk."""
        from optuna.trial import TrialState

        from vadsearch.checkpoint import RunDirectory

        if RunDirectory(run_dir).has_checkpoint():  # a look at the disk first: the read below grows with the study
            return
        earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.user_attrs.get("point") == key and t.intermediate_values]
        if not earlier:
            return
        last = max(earlier, key=lambda t: (max(t.intermediate_values), t.number))
        where = last.user_attrs.get("checkpoint_dir")
        moved = ""
        if where and where != str(run_dir):
            relative = "" if Path(where).is_absolute() else ", relative to where its worker ran"
            moved = f" (it wrote them to {where}{relative})"
        log.warning("trial %d: trial %d of this configuration trained %d epoch(s), but %s holds no checkpoint%s: "
                    "training starts over; to resume it, run workers where the study's first ran, or with its "
                    "--artifacts", trial.number, last.number, max(last.intermediate_values), run_dir, moved)

    def _refuse_repeat_or_surplus(self, trial: optuna.Trial, key: str) -> None:
        """End a sampled trial, untrained, whose configuration another trial settled (ran, or failed until
        given up) or runs (an earlier one of the two, where both run: exactly one of them trains), or that
        would go beyond `max_trials`, counting the configurations settled and those that earlier trials
        run. A repeat would share the other trial's run directory and add nothing; a surplus trial is
        what workers that surveyed the study at the same moment would otherwise all start. Failed, not
        given another's score, so the sampler learns nothing twice; left out of every count and table,
        like any orphan."""
        from optuna.trial import TrialState

        def key_of(t) -> str | None:
            return t.user_attrs.get("point") or (point_key(self.spec.canonical(t.params)) if t.params else None)

        others = [t for t in trial.study.get_trials(deepcopy=False)
                  if t.number != trial.number and not t.user_attrs.get("orphan")]
        points = survey(self.spec, others, self.options.max_stale_retries)
        earlier = [t for t in others if t.state in (TrialState.RUNNING, TrialState.WAITING) and t.number < trial.number]
        same = [t for t in others if key_of(t) == key]
        ran = [t for t in same if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        runs = [t for t in earlier if key_of(t) == key]
        if ran or runs or (key in points and points[key].settled):
            other, what = (ran[0], "ran") if ran else (runs[0], "runs") if runs else (
                same[-1], "failed, and the configuration was given up on,")
            self._outcome.state, self._outcome.repeats_running = "REPEAT", bool(runs) and not ran
            self._not_trained(trial, {"repeat_of": other.number, "point": key},
                              f"{key}, which trial {other.number} {what} already")
        ahead = {k for k, p in points.items() if p.settled} | ({key_of(t) for t in earlier} - {None})
        undecided = sum(key_of(t) is None for t in earlier)  # started, not yet sampled: each takes a place
        if len(ahead) + undecided >= self.spec.max_trials:
            self._outcome.state = "SURPLUS"
            self._not_trained(trial, {"surplus": True, "point": key},
                              f"{key}, beyond the study's {self.spec.max_trials} trials, all run or running")

    def _not_trained(self, trial: optuna.Trial, attrs: dict[str, Any], why: str) -> None:
        set_user_attrs_with_final_state(trial, {"orphan": True, **attrs})
        _NO_TRACEBACKS.untrained.add(trial.number)
        log.info("trial %d: %s; not trained", trial.number, why)
        raise NotTrained(why)

    @staticmethod
    def _gave_way_before(trial: optuna.Trial, key: str) -> bool:
        """Whether this configuration already stopped a worker by running out of memory on a shared GPU."""
        from optuna.trial import TrialState

        return any(t.number != trial.number and t.user_attrs.get("point") == key and failures.gave_way(t.user_attrs)
                   for t in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

    def _identity(self, params: dict[str, Any]) -> dict[str, Any]:
        """Who runs a configuration and where its checkpoints go: known before the trial trains."""
        from vadsearch.checkpoint import run_directory

        key = point_key(params)
        if self._last_identity[0] != key:  # computed as the trial starts, then again in its objective
            config = self.spec.config_for(params)
            run_dir = run_directory(self.options.artifacts, self.spec.name, config.fingerprint())
            identity = {"worker": self.name, "config": config.relevant(), "checkpoint_dir": str(run_dir),
                        # `status` judges the trial's silence by its own worker's grace period, not the default.
                        "grace_period_s": self.options.grace_period}
            self._last_identity = (key, identity)
        return dict(self._last_identity[1])

    def _start_attrs(self, fixed_params: dict[str, Any]) -> dict[str, Any]:
        # Only the searched options: a queued trial's parameters are exactly those.
        return self._identity({p.name: fixed_params[p.name] for p in self.spec.space})

    @staticmethod
    def _record_result(trial: optuna.Trial, result, n_train: int) -> None:
        set_user_attrs_with_final_state(trial, {
            "n_train": n_train,  # a subset larger than the file keeps it whole: what the model card says
            "best_epoch": result.best_epoch,
            "epochs_done": len(result.history),
            "dev": result.dev.as_dict(),
            "test": result.test.as_dict() if result.test else None,
            "trainable_params": result.trainable_params,
            "total_params": result.total_params,
            "resumed_from": result.resumed_from,
            "seconds": result.seconds,
            "peak_gpu_mib": result.peak_gpu_mib,  # what a worker of this configuration needs of a shared GPU
        })
