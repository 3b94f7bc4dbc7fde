"""Trials → pandas tables: a study's leaderboard and best trial, the comparison across studies, status.

Reads only what workers store (see the study and trial user attributes below); never writes. Model
selection uses the dev split alone: a test score is shown only for a study's best trial.

What a worker stores, and what this module reads:
- study user attr `vadsearch`: `name`, `sampler`, `description`, `max_trials`, `base` (with `model`);
- objective value: dev MSE of the trial's best epoch (lower is better);
- trial user attrs: `point`, `worker`, `config`, `checkpoint_dir`, `epochs_done`, `best_epoch`,
  `dev` / `test` (`Scores.as_dict`), `seconds`, how a failed trial failed (`vadsearch.failures`), and
  `orphan` on trials that trained nothing: a sampled configuration that another trial ran or runs
  (`repeat_of` names it), or a stray trial of a race between grid workers in earlier versions. Orphans
  are left out of every table and count.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from vadsearch import failures
from vadsearch.errors import ConfigError, StorageError, TrainingError
from vadsearch.storage import GRACE_PERIOD_S

log = logging.getLogger(__name__)

FORMATS = ("table", "markdown", "csv", "json")
STATES = ("COMPLETE", "RUNNING", "WAITING", "FAIL", "PRUNED")
PARAM_PREFIX = "param."
DIMENSIONS = ("v", "a", "d")  # valence, arousal, dominance

# Columns that hold counts or trial numbers: nullable integers, so a missing value is not shown as 3.0000.
_INT_COLUMNS = ("number", "rank", "trial", "epochs_done", "best_epoch", "best_trial", "complete", "trials")


# Loading.


def list_studies(storage: optuna.storages.BaseStorage | str) -> list[str]:
    """Names of every study in the storage, sorted."""
    return sorted(optuna.get_all_study_names(storage))


def load(storage: optuna.storages.BaseStorage | str, name: str, where: str = "the storage") -> optuna.Study:
    """The study called `name`. `where` names the storage in the error (a masked URL, never a password)."""
    names = list_studies(storage)
    if name not in names:
        existing = ", ".join(names) if names else "none yet (start one with `vadsearch worker STUDY_FILE`)"
        raise StorageError(f"no study named {name!r} in {where}; studies: {existing}")
    study = _open(storage, name)
    if not _spec(study):  # its objective need not be a dev MSE, nor minimized, nor single
        raise StorageError(f"study {name!r} in {where} was not made by vadsearch (it has no vadsearch description):"
                           " read it with Optuna's own tools (`vadsearch dashboard`, `optuna trials`)")
    return study


def _open(storage: optuna.storages.BaseStorage | str, name: str) -> optuna.Study:
    # A read-only look needs no TPE: the random sampler is the cheapest one to build.
    return optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())


def _spec(study: optuna.Study) -> dict[str, Any]:
    """The study's `vadsearch` user attr; empty for a study some other tool created."""
    spec = study.user_attrs.get("vadsearch")
    return spec if isinstance(spec, dict) else {}


def _model(spec: Mapping[str, Any]) -> str | None:
    """The study's model; its choices (`lstm/bert`) where it searches the model, since the [train] value
    is then only TrainConfig's default."""
    for param in spec.get("space") or []:
        if isinstance(param, Mapping) and param.get("name") == "model" and isinstance(param.get("choices"), list):
            return "/".join(map(str, param["choices"]))
    base = spec.get("base")
    return base.get("model") if isinstance(base, Mapping) else None


def _retried(failed: FrozenTrial, of_point: Mapping[str, list[FrozenTrial]]) -> dict[str, Any]:
    """The next trial of the same configuration, if any: `retried_as` (its number) and `retry_state`.
    `of_point`: each configuration's trials in order (`_by_point`)."""
    later = (t for t in of_point.get(failed.user_attrs.get("point"), ()) if t.number > failed.number)
    retry = next(later, None)
    return {"retried_as": retry.number if retry else None, "retry_state": retry.state.name if retry else None}


def _by_point(trials: Sequence[FrozenTrial]) -> dict[str, list[FrozenTrial]]:
    """Each configuration's trials, in order: a scan of every trial for each failed one took 36 s at 40,000."""
    grouped: dict[str, list[FrozenTrial]] = {}
    for trial in trials:
        point = trial.user_attrs.get("point")
        if point is not None:
            grouped.setdefault(point, []).append(trial)
    return grouped


def _max_epochs(trial: FrozenTrial, spec: Mapping[str, Any]) -> int | None:
    """Searched, else in the trial's stored configuration, else the study file's [train] value."""
    for source in (trial.params, trial.user_attrs.get("config"), spec.get("base")):
        if isinstance(source, Mapping) and isinstance(source.get("max_epochs"), int):
            return source["max_epochs"]
    return None


def _is_orphan(trial: FrozenTrial) -> bool:
    return bool(trial.user_attrs.get("orphan"))


def _trials(study: optuna.Study, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
    """The study's trials in number order, orphans left out."""
    trials = study.get_trials(deepcopy=False, states=tuple(states) if states is not None else None)
    return sorted((t for t in trials if not _is_orphan(t)), key=lambda t: t.number)


def _complete_by_dev(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials, best dev MSE first; ties go to the earlier trial."""
    complete = [t for t in _trials(study, (TrialState.COMPLETE,)) if t.value is not None]
    return sorted(complete, key=lambda t: (_nan_last(t.value), t.number))


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value


# One study.


def _param_names(trials: Iterable[FrozenTrial]) -> list[str]:
    return sorted({name for t in trials for name in t.params})


def _chosen_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters; a queued trial has none in Optuna until it starts, but carries its point."""
    if trial.params or not isinstance(trial.user_attrs.get("point"), str):
        return dict(trial.params)
    try:
        point = json.loads(trial.user_attrs["point"])
    except json.JSONDecodeError:
        return {}
    return point if isinstance(point, dict) else {}


def _score(scores: Mapping[str, Any] | None, key: str) -> float:
    """One number from a `Scores.as_dict` dict; nan where the dict or the key is missing or None."""
    if not isinstance(scores, Mapping) or scores.get(key) is None:
        return math.nan
    return float(scores[key])


def _dev_mse(trial: FrozenTrial) -> float:
    """The objective value where the trial has one, else the dev MSE a running trial reported so far."""
    if trial.value is not None:
        return float(trial.value)
    return _score(trial.user_attrs.get("dev"), "mse")


def _frame(records: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=columns)
    for column in _INT_COLUMNS:
        if column in frame.columns:
            frame[column] = frame[column].astype("Int64")
    return frame


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial but orphans, one row each, in number order; params as `param.NAME` columns, and why
    each failed trial failed (`failures.describe`)."""
    trials = _trials(study)
    chosen = {t.number: _chosen_params(t) for t in trials}
    params = sorted({name for p in chosen.values() for name in p})
    columns = ["number", "state", "point", *(PARAM_PREFIX + p for p in params), "epochs_done", "best_epoch",
               "dev_mse", *(f"dev_r_{d}" for d in DIMENSIONS), "worker", "seconds", "peak_gpu_mib", "failure"]
    records = []
    for t in trials:
        attrs = t.user_attrs
        dev = attrs.get("dev")
        epochs_done, best_epoch, dev_mse = _so_far(t)
        records.append({
            "number": t.number,
            "state": t.state.name,
            "point": attrs.get("point"),
            **{PARAM_PREFIX + p: chosen[t.number].get(p) for p in params},
            "epochs_done": epochs_done,
            "best_epoch": best_epoch,
            "dev_mse": dev_mse,
            **{f"dev_r_{d}": _score(dev, f"r_{d}") for d in DIMENSIONS},
            "worker": attrs.get("worker"),
            "seconds": attrs.get("seconds"),
            "peak_gpu_mib": attrs.get("peak_gpu_mib"),
            "failure": failures.describe(attrs) if t.state == TrialState.FAIL
            else f"pruned after epoch {epochs_done}" if t.state == TrialState.PRUNED else None,
        })
    return _frame(records, columns)


def _so_far(trial: FrozenTrial) -> tuple[int | None, int | None, float]:
    """Epochs done, the best epoch and its dev MSE: as a finished trial stored them, else from the dev
    scores a running, pruned or failed trial reported epoch by epoch."""
    steps = trial.intermediate_values
    if "epochs_done" in trial.user_attrs or not steps:
        return trial.user_attrs.get("epochs_done"), trial.user_attrs.get("best_epoch"), _dev_mse(trial)
    best = min(steps, key=lambda step: (_nan_last(steps[step]), step))
    return max(steps), best, steps[best]


def leaderboard(study: optuna.Study, top: int | None = None) -> pd.DataFrame:
    """COMPLETE trials ranked by dev MSE (rank 1 is best); `top` keeps the first rows only."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ConfigError(f"--top must be a positive number of rows; got {top!r}")
    complete = _complete_by_dev(study)  # one read of the study
    ranked = complete[:top]
    params = _param_names(complete)
    columns = ["rank", "trial", *(PARAM_PREFIX + p for p in params), "best_epoch", "dev_mse",
               *(f"dev_mse_{d}" for d in DIMENSIONS), *(f"dev_r_{d}" for d in DIMENSIONS)]
    records = []
    for rank, t in enumerate(ranked, start=1):
        dev = t.user_attrs.get("dev")
        records.append({
            "rank": rank,
            "trial": t.number,
            **{PARAM_PREFIX + p: t.params.get(p) for p in params},
            "best_epoch": t.user_attrs.get("best_epoch"),
            "dev_mse": float(t.value),
            **{f"dev_mse_{d}": _score(dev, f"mse_{d}") for d in DIMENSIONS},
            **{f"dev_r_{d}": _score(dev, f"r_{d}") for d in DIMENSIONS},
        })
    return _frame(records, columns)


def require_complete(study: optuna.Study) -> None:
    """Raise, in words, when `study` has no COMPLETE trial: none yet (a StorageError), or every trial
    failed and none is left to run (a TrainingError, with the latest reason)."""
    trials = _trials(study, None)
    if any(t.state == TrialState.COMPLETE for t in trials):
        return
    failed = [t for t in trials if t.state == TrialState.FAIL]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    settled = not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    if failed and not pruned and settled:
        latest = failures.describe(failed[-1].user_attrs)
        raise TrainingError(f"every trial of study {study.study_name!r} failed ({len(failed)}); the latest: {latest} "
                            f"(`vadsearch report {study.study_name} --trials` lists them all)")
    if pruned and settled:  # not "none yet": no worker will finish one
        raise StorageError(
            f"no trial of study {study.study_name!r} ran to its end: {len(pruned)} pruned"
            + (f", {len(failed)} failed" if failed else "") + "; a pruned trial has no best weights or test score. "
            "A new study with a gentler pruner (or none) trains its configurations through "
            f"(`vadsearch report {study.study_name} --trials` shows where each stopped)")
    counts = Counter(t.state.name.lower() for t in trials)
    held = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trial"
    raise StorageError(f"no finished trial in study {study.study_name!r} yet ({held}): `vadsearch status` shows how "
                       f"far each is, `vadsearch report {study.study_name} --trials` lists them")


def best(study: optuna.Study) -> dict[str, Any]:
    """The study's best trial by dev MSE, JSON-able, with its test score (the only test score reported)."""
    ranked = _complete_by_dev(study)
    if not ranked:
        require_complete(study)  # says why
    trial = ranked[0]
    attrs = trial.user_attrs
    return {
        "study": study.study_name,
        "trial": trial.number,
        "params": dict(trial.params),
        "best_epoch": attrs.get("best_epoch"),
        "dev": attrs.get("dev"),
        "test": attrs.get("test"),
        "config": attrs.get("config"),
        # A baseline keeps no weights: its run directory is named, never made.
        "checkpoint_dir": None if (attrs.get("config") or {}).get("model") == "baseline"
        else attrs.get("checkpoint_dir"),
    }


# Several studies.


def compare(studies: Sequence[optuna.Study]) -> pd.DataFrame:
    """One row per study, in the order given: the dev and test scores of each study's best trial.

    Studies whose best trials were scored on different sentences (another data file, a `quick-*` subset
    beside a full run) are logged as a warning: their rows are not comparable.
    """
    columns = ["study", "model", "complete", "trials", "best_trial", "dev_mse", "test_mse",
               *(f"dev_r_{d}" for d in DIMENSIONS), *(f"test_r_{d}" for d in DIMENSIONS)]
    records = []
    scored_on: dict[str, tuple] = {}
    for study in studies:
        trials = _trials(study)
        ranked = _complete_by_dev(study)
        winner = ranked[0] if ranked else None
        if winner and _spec(study):
            scored_on[study.study_name] = _scored_on(_spec(study), winner)
        dev = winner.user_attrs.get("dev") if winner else None
        test = winner.user_attrs.get("test") if winner else None
        records.append({
            "study": study.study_name,
            # the model the scores are of: the winner's, where the study searches the model
            "model": (winner.params if winner else {}).get("model") or _model(_spec(study)),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "trials": len(trials),
            "best_trial": winner.number if winner else None,
            "dev_mse": float(winner.value) if winner else math.nan,
            "test_mse": _score(test, "mse"),
            **{f"dev_r_{d}": _score(dev, f"r_{d}") for d in DIMENSIONS},
            **{f"test_r_{d}": _score(test, f"r_{d}") for d in DIMENSIONS},
        })
    # Subsets stored before the file's checksum was kept beside them: subsets are compared by seed alone.
    if not all(key[2] for key in scored_on.values() if key[0] == "subset"):
        scored_on = {name: key[:2] + (None,) + key[3:] if key[0] == "subset" else key
                     for name, key in scored_on.items()}
    if len(set(scored_on.values())) > 1:
        log.warning("these studies were scored on different sentences, so their scores are not comparable: %s",
                    "; ".join(f"{name}: {_describe_data(key)}" for name, key in scored_on.items()))
    return _frame(records, columns)


def _scored_on(spec: Mapping[str, Any], winner: FrozenTrial) -> tuple:
    """What decides the dev and test sentences: for a subset its seed and the file it was drawn from (its
    own checksum also covers the training size, which the dev and test sentences do not depend on), else
    the file; and how many sentences the best trial was scored on."""
    from vadsearch.data import described_file_sha256

    data = ("subset", spec.get("seed", 0)) if spec.get("data_subset") else ("file", 0)
    data += (described_file_sha256(spec),)
    sizes = tuple((winner.user_attrs.get(split) or {}).get("n") for split in ("dev", "test"))
    return (*data, *sizes)


def _describe_data(key: tuple) -> str:
    kind, seed, file, dev_n, test_n = key
    data = f"data {file[:12]}" if file else "data"
    data = f"a subset (seed {seed}) of {data}" if kind == "subset" else data
    return f"{dev_n} dev and {test_n} test sentences of {data}"


def status(storage: optuna.storages.BaseStorage) -> list[dict[str, Any]]:
    """Per study: trials by state, the planned trial count, each running trial's epoch (of how many), time
    running and heartbeat age, and why each failed trial failed.

    `heartbeat_age_s` is None where the trial has no heartbeat (heartbeats off, or not recorded yet) or the
    storage is not a database. `stale`: silent for longer than its worker's grace period (the default for
    a trial that does not record one), so its worker is most likely gone and the next worker on the study
    takes it over.
    """
    ages = _heartbeat_ages(storage)
    now = datetime.datetime.now()  # Optuna stores a trial's start in local time, without a zone
    rows = []
    for name in list_studies(storage):
        study = _open(storage, name)
        spec = _spec(study)
        trials = _trials(study)
        counts = {state: sum(t.state.name == state for t in trials) for state in STATES}
        of_point = _by_point(trials)
        rows.append({
            "name": name,
            "vadsearch": bool(spec),  # False: another tool's study in the same database
            "given_up": _given_up(spec, trials),
            "model": _model(spec),
            "sampler": spec.get("sampler"),
            "trials": len(trials),
            **{state.lower(): counts[state] for state in STATES},
            "max_trials": spec.get("max_trials"),
            "peak_gpu_mib": max(gpu_peaks(trials), default=None),  # what --workers-per-gpu must fit
            "running_trials": [
                {
                    "number": t.number,
                    "worker": t.user_attrs.get("worker"),
                    "epochs_done": _so_far(t)[0] or 0,
                    "max_epochs": _max_epochs(t, spec),
                    "running_s": (now - t.datetime_start).total_seconds() if t.datetime_start else None,
                    "heartbeat_age_s": ages.get((name, t.number)),
                    "stale": _stale(ages.get((name, t.number)), t, now, _grace(t)),
                }
                for t in trials
                if t.state == TrialState.RUNNING
            ],
            "failed_trials": [
                {"number": t.number, "failure": failures.describe(t.user_attrs), **_retried(t, of_point)}
                for t in trials
                if t.state == TrialState.FAIL
            ],
        })
    return rows


def _given_up(spec: Mapping[str, Any], trials: list[FrozenTrial]) -> int:
    """Configurations failed beyond the study's retries: settled, though not done (`worker.given_up`)."""
    from vadsearch.errors import VadsearchError
    from vadsearch.studyfile import StudySpec
    from vadsearch.worker import given_up

    if not spec:  # another tool's study: no retries of ours to have spent
        return 0
    try:
        return given_up(StudySpec.from_dict(dict(spec)), trials)
    except (KeyError, TypeError, ValueError, VadsearchError):  # a description older than this reading of it
        return 0


def gpu_peaks(trials: list[optuna.trial.FrozenTrial]) -> list[float]:
    """The peak GPU memory (MiB) each finished trial's worker held; none off CUDA."""
    return [t.user_attrs["peak_gpu_mib"] for t in trials
            if t.state == TrialState.COMPLETE and t.user_attrs.get("peak_gpu_mib")]


def _stale(heartbeat_age: float | None, trial: FrozenTrial, now: datetime.datetime, grace_period: float) -> bool:
    # A trial that never sent a heartbeat is judged by its start, as workers judge it (`reconnect`).
    if heartbeat_age is None and trial.datetime_start is not None:
        heartbeat_age = (now - trial.datetime_start).total_seconds()
    return heartbeat_age is not None and heartbeat_age > grace_period


def live_trials(storage: optuna.storages.BaseStorage, names: Sequence[str],
                grace_period: float | None = None) -> list[dict[str, Any]]:
    """The RUNNING trials of `names` whose heartbeat (or start, before the first) is younger than
    `grace_period`: their workers are most likely still training them. None: each trial's own worker's
    grace period (`_grace`). 0: none (the caller knows every worker is gone; a heartbeat sent this very
    second must not count as younger)."""
    if grace_period is not None and grace_period <= 0:
        return []
    ages = _heartbeat_ages(storage)
    now = datetime.datetime.now()
    live = []
    for name in names:
        for t in _trials(_open(storage, name), (TrialState.RUNNING,)):
            grace = _grace(t) if grace_period is None else grace_period
            age = ages.get((name, t.number))
            if not _stale(age, t, now, grace):
                live.append({"study": name, "number": t.number, "worker": t.user_attrs.get("worker"),
                             "heartbeat_age_s": age, "grace_period_s": grace})
    return live


def _grace(trial: FrozenTrial) -> float:
    """The grace period of the worker that runs `trial`, recorded as it started; the default before."""
    return trial.user_attrs.get("grace_period_s", GRACE_PERIOD_S)


def _heartbeat_ages(storage: optuna.storages.BaseStorage) -> dict[tuple[str, int], float]:
    """Seconds since the last heartbeat of every RUNNING trial that has one, keyed by (study, number)."""
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    rdb = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a _CachedStorage
    engine = getattr(rdb, "engine", None)
    if engine is None:
        return {}
    query = (
        sa.select(
            models.StudyModel.study_name, models.TrialModel.number, models.TrialHeartbeatModel.heartbeat
        )
        .join(models.TrialModel, models.TrialModel.study_id == models.StudyModel.study_id)
        .join(models.TrialHeartbeatModel, models.TrialHeartbeatModel.trial_id == models.TrialModel.trial_id)
        .where(models.TrialModel.state == TrialState.RUNNING)
    )
    with engine.connect() as connection:
        # The database's clock, not ours: heartbeats are written with its CURRENT_TIMESTAMP. Optuna drops
        # the time zone the same way when it looks for stale trials (PostgreSQL returns an aware value):
        # https://github.com/optuna/optuna/pull/2190#issuecomment-766605088
        now = connection.execute(sa.select(sa.func.now())).scalar_one().replace(tzinfo=None)
        rows = connection.execute(query).all()
    return {(study, number): (now - beat).total_seconds() for study, number, beat in rows}


# Output.


def render(data: pd.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]], fmt: str) -> str:
    """A frame, a record (`best`) or a list of records (`status`) as table, markdown, csv or json.

    table and markdown show floats with 4 decimals (parameters and config values in general format, so a
    learning rate of 2e-05 is not shown as 0.0000); csv keeps full precision; json of a frame is a list
    of records, with NaN as null. In csv, table and markdown nested values are flattened to dotted names.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(_jsonable(_records(data)), indent=2, allow_nan=False)
    if isinstance(data, Mapping) and fmt != "csv":
        # One record reads best as a column of fields.
        flat = _flatten(data)
        frame = pd.DataFrame({"field": list(flat), "value": list(flat.values())}, dtype=object)
        return _text_table(frame, markdown=fmt == "markdown", general=_general_rows(flat))
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame([_flatten(r) for r in _as_list(data)])
    if fmt == "csv":
        return frame.to_csv(index=False)
    return _text_table(frame, markdown=fmt == "markdown")


def _as_list(data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [data] if isinstance(data, Mapping) else list(data)


def _records(data: Any) -> Any:
    if isinstance(data, pd.DataFrame):
        return data.astype(object).to_dict(orient="records")
    return data


def _jsonable(value: Any) -> Any:
    """Plain JSON types: NaN and pandas' NA become None, numpy scalars become Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become dotted keys (`dev.mse`); lists stay whole, shown as JSON."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(_jsonable(value), separators=(",", ":"))
        else:
            flat[name] = value
    return flat


def _is_setting(name: str) -> bool:
    """Hyperparameters and config values: shown in general format, since 4 decimals hide a small lr."""
    return name.startswith((PARAM_PREFIX, "params.", "config."))


def _general_rows(flat: Mapping[str, Any]) -> list[bool]:
    return [_is_setting(name) for name in flat]


def _cell(value: Any, general: bool) -> str:
    value = _jsonable(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}" if general else f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _is_number(value: Any) -> bool:
    value = _jsonable(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _text_table(frame: pd.DataFrame, markdown: bool, general: list[bool] | None = None) -> str:
    """An aligned plain-text or GitHub-markdown table; numeric columns are right-aligned.

    `general` marks rows (of a field/value table) whose floats use general format; otherwise the columns
    named like parameters do.
    """
    headers = [str(c) for c in frame.columns]
    cells = []
    for i, row in enumerate(frame.itertuples(index=False, name=None)):
        cells.append([
            _cell(v, general[i] if general is not None else _is_setting(h)) for h, v in zip(headers, row)
        ])
    numeric = [
        bool(len(frame)) and all(_is_number(v) or _jsonable(v) is None for v in frame.iloc[:, j])
        and any(_is_number(v) for v in frame.iloc[:, j])
        for j in range(len(headers))
    ]
    # One record, one line: a text may hold line breaks (a quoted CSV field given to `predict`).
    if markdown:
        cells = [[_LINE_BREAK.sub("<br>", c.replace("|", "\\|")) for c in row] for row in cells]
    else:
        cells = [[_LINE_BREAK.sub(r"\\n", c) for c in row] for row in cells]
    widths = [max([len(h), 3, *(len(row[j]) for row in cells)]) for j, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:
        dashes = [("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric)]
        rule = "| " + " | ".join(dashes) + " |"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in cells)]) + "\n"
