"""`--keep all|best|study-best`: what a completed trial leaves on disk, and nothing else is touched."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from results_fixtures import run_study
from vadsearch.cli import app
from vadsearch.errors import ConfigError
from vadsearch.predict import best_trial, load_best
from vadsearch.retention import finish_run, retain


def touch(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"x")
    return directory


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


def test_a_finished_run_keeps_its_newest_best_weights_only(tmp_path):
    run = touch(tmp_path / "run", "epoch-0002.pt", "epoch-0003.pt", "best-0001.pt", "best-0003.pt",
                "epoch-0001.pt.rejected", "notes.txt")
    removed = finish_run(run)
    assert {p.name for p in removed} == {"epoch-0002.pt", "epoch-0003.pt", "best-0001.pt"}
    assert files(run) == {"best-0003.pt", "epoch-0001.pt.rejected", "notes.txt"}
    assert finish_run(tmp_path / "missing") == []


def trial(state, number_dir: str | None, value=None):
    attrs = {"checkpoint_dir": f"/elsewhere/{number_dir}"} if number_dir else {}
    return optuna.create_trial(state=state, value=value, params={}, distributions={}, user_attrs=attrs)


@pytest.fixture
def study_with_runs(tmp_path):
    """Run directories of settled, running and failed trials under tmp_path/root."""
    root = tmp_path / "root"
    study = optuna.create_study()
    study.add_trials([
        trial(TrialState.COMPLETE, "good", 0.10),
        trial(TrialState.COMPLETE, "worse", 0.30),
        trial(TrialState.PRUNED, "pruned"),
        trial(TrialState.RUNNING, "running"),
        trial(TrialState.FAIL, "failed"),  # may be retried: its checkpoints are its retry's start
        trial(TrialState.COMPLETE, "retried", 0.40),  # shares its run directory with a failed trial
        trial(TrialState.FAIL, "retried"),
        trial(TrialState.COMPLETE, None, 0.01),  # a baseline-like trial with no run directory
    ])
    for name in ("good", "worse", "pruned", "running", "failed", "retried", "current"):
        touch(root / name, "best-0002.pt", "epoch-0002.pt")
    return study, root


@pytest.mark.parametrize("current_mse, survivor", [(0.20, "good"), (0.05, "current")])
def test_study_best_leaves_one_model_and_never_touches_runs_in_use(study_with_runs, current_mse, survivor):
    study, root = study_with_runs
    removed = retain(study, "study-best", trial_number=99, run_dir=root / "current", dev_mse=current_mse, root=root)
    assert all(p.is_relative_to(root) for p in removed)
    assert files(root / survivor) == {"best-0002.pt"}  # epoch checkpoints of the current run went; best stays
    for gone in {"good", "worse", "pruned", "current"} - {survivor}:
        assert files(root / gone) == set(), gone
    for in_use in ("running", "failed", "retried"):
        assert files(root / in_use) == {"best-0002.pt", "epoch-0002.pt"}, in_use


def test_best_and_all_touch_only_the_finished_run(study_with_runs):
    study, root = study_with_runs
    assert retain(study, "all", trial_number=99, run_dir=root / "current", dev_mse=0.2, root=root) == []
    assert files(root / "current") == {"best-0002.pt", "epoch-0002.pt"}
    retain(study, "best", trial_number=99, run_dir=root / "current", dev_mse=0.2, root=root)
    assert files(root / "current") == {"best-0002.pt"}
    assert all(files(root / n) == {"best-0002.pt", "epoch-0002.pt"} for n in ("good", "worse", "pruned"))


def test_an_unknown_policy_is_refused(study_with_runs):
    study, root = study_with_runs
    with pytest.raises(ConfigError, match="--keep must be one of all, best, study-best"):
        retain(study, "none", trial_number=0, run_dir=root / "current", dev_mse=0.2, root=root)
    result = CliRunner().invoke(app, ["worker", "x.toml", "--keep", "none"])
    assert result.exit_code == 2 and "--keep must be one of" in result.output


@pytest.mark.parametrize("keep", ["all", "best", "study-best"])
def test_workers_apply_the_policy_and_the_best_model_stays_usable(tmp_path, tiny_csv, keep):
    study = run_study(tmp_path, tiny_csv, name="keep", search="hidden_size = [4, 8]\nlr = [0.001, 0.01]",
                      max_epochs=3, keep=keep)
    loaded = study.load()
    runs = {t.number: Path(t.user_attrs["checkpoint_dir"]) for t in loaded.get_trials(states=(TrialState.COMPLETE,))}
    assert len(set(runs.values())) == 4
    winner = runs[best_trial(loaded).number]
    for number, run in runs.items():
        names = files(run)
        epochs = {n for n in names if n.startswith("epoch-")}
        bests = {n for n in names if n.startswith("best-")}
        if keep == "all":
            assert epochs and bests
        elif keep == "best" or run == winner:
            assert (epochs, len(bests)) == (set(), 1), (number, names)
        else:
            assert names == set(), (number, names)
    assert load_best(loaded, device="cpu").predict(["happy dog"]).shape == (1, 3)


def test_study_best_sweeps_a_configuration_that_finished_after_a_ctrl_c(tmp_path):
    # Ctrl-C fails a trial as interrupted and its retry completes the same configuration in the same run
    # directory. The failed trial will never be retried again: its directory is not "in use", and its
    # weights go once another trial is better (before, they stayed for ever, one file per such run).
    root = tmp_path / "root"
    study = optuna.create_study()
    point = {"point": '{"hidden_size": 16}'}
    study.add_trials([
        optuna.create_trial(state=TrialState.FAIL, params={}, distributions={},
                            user_attrs={"checkpoint_dir": "x/resumed", "interrupted": True, **point}),
        optuna.create_trial(state=TrialState.COMPLETE, value=0.3, params={}, distributions={},
                            user_attrs={"checkpoint_dir": "x/resumed", **point}),
        optuna.create_trial(state=TrialState.FAIL, params={}, distributions={},  # still to be retried
                            user_attrs={"checkpoint_dir": "x/open", "point": '{"hidden_size": 8}'}),
    ])
    for name in ("resumed", "open", "current"):
        touch(root / name, "best-0002.pt", "epoch-0002.pt")
    retain(study, "study-best", trial_number=99, run_dir=root / "current", dev_mse=0.1, root=root)
    assert files(root / "resumed") == set()
    assert files(root / "current") == {"best-0002.pt"}
    assert files(root / "open") == {"best-0002.pt", "epoch-0002.pt"}
