"""What a finished trial leaves on disk: `vadsearch worker --keep all|best|study-best`.

A run directory holds epoch checkpoints (`epoch-*.pt`: model, optimizer, scheduler and RNG state, only
needed to resume) and best weights (`best-*.pt`: the weights of the best epoch with the config and
vocabulary, enough to predict and export). A completed or pruned configuration is never resumed, so:

- `all`: the run directory stays as training left it: its newest two epoch checkpoints (training keeps
  no more) and best weights, so the run can still be continued by hand with `vadsearch train --checkpoint-dir`;
- `best` (the default): a completed or pruned trial's epoch checkpoints go; its best weights stay, so any
  finished trial can still be predicted with or exported;
- `study-best`: as `best`, and the weights of every other completed (or pruned) trial of the study go too,
  leaving the study's best model only. The best is judged by dev MSE when a trial completes; a trial that
  beats it later takes its place, and the old best's weights go at the next completion.

Run directories are shared by configuration, not by trial: a directory that a running or waiting trial
names is never touched.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from vadsearch.checkpoint import RunDirectory
from vadsearch.errors import ConfigError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

KEEP = ("all", "best", "study-best")


def check_keep(keep: str) -> str:
    if keep not in KEEP:
        raise ConfigError(f"--keep must be one of {', '.join(KEEP)}; got {keep!r}")
    return keep


def finish_run(run_dir: str | Path) -> list[Path]:
    """A completed run keeps its best weights only: the epoch checkpoints and older best files go."""
    run = RunDirectory(run_dir)
    return run.remove("epoch") + run.remove("best", keep_newest=1) + run.sweep_temporaries()


def retain(
    study: optuna.Study,
    keep: str,
    *,
    trial_number: int,
    run_dir: str | Path,
    dev_mse: float,
    root: str | Path,
) -> list[Path]:
    """Apply `keep` after trial `trial_number` finished training in `run_dir` with `dev_mse`.

    Called by the worker once the trial is stored as COMPLETE or PRUNED (`dev_mse` inf: never the best): a
    worker killed before that must find the epoch checkpoints when the trial is retried.
    `root` is this worker's directory of the study's runs (`ARTIFACTS/STUDY`): other trials' run
    directories are found there by name, so nothing outside it is ever deleted. A file that cannot be
    deleted is logged and left; the trial still completes.
    """
    check_keep(keep)
    if keep == "all":
        return []
    try:
        removed = finish_run(run_dir)
        if keep == "study-best":
            removed += _sweep(study, trial_number, Path(run_dir), dev_mse, Path(root))
    except OSError as exc:
        log.warning("retention (--keep %s) left files in place: %s", keep, exc)
        return []
    if removed:
        log.info("retention (--keep %s): removed %d checkpoint file(s)", keep, len(removed))
    return removed


def _sweep(study: optuna.Study, trial_number: int, run_dir: Path, dev_mse: float, root: Path) -> list[Path]:
    """Delete the checkpoints of every settled run of the study, and the weights of all but the best one."""
    from optuna.trial import TrialState

    candidates = [(_rank(dev_mse), trial_number, run_dir.name)]
    settled, in_use = [], set()
    trials = study.get_trials(deepcopy=False)
    finished = {t.user_attrs.get("point") for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    for trial in trials:
        name = _run_name(trial)
        if name is None or trial.number == trial_number:
            continue
        if trial.state == TrialState.COMPLETE:
            settled.append(name)
            if trial.value is not None:
                candidates.append((_rank(trial.value), trial.number, name))
        elif trial.state == TrialState.PRUNED:
            settled.append(name)
        elif trial.state in (TrialState.RUNNING, TrialState.WAITING):
            in_use.add(name)
        elif trial.user_attrs.get("point") is None or trial.user_attrs["point"] not in finished:
            # FAIL: may be retried, and a retry resumes from these files. One whose configuration finished
            # since (Ctrl-C, then its retry completed) never is: else those weights would stay for ever.
            in_use.add(name)
    best = min(candidates)[2]
    removed = []
    for name in dict.fromkeys([run_dir.name, *settled]):
        if name not in in_use:
            run = RunDirectory(root / name)
            removed += run.remove("epoch") + run.remove("best", keep_newest=1 if name == best else 0)
    return removed


def _run_name(trial: optuna.trial.FrozenTrial) -> str | None:
    checkpoint_dir = trial.user_attrs.get("checkpoint_dir")
    if not checkpoint_dir or trial.user_attrs.get("orphan"):
        return None
    return Path(checkpoint_dir).name


def _rank(value: float) -> float:
    return math.inf if value is None or math.isnan(value) else value
