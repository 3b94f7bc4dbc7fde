"""Disk full and an unwritable artifact directory: the trial fails with a reason that says what to fix,
the study survives, and once the fault is gone the same study finishes with every point once.

We run as root in CI, so `chmod` cannot make a directory read-only; an artifact root *below a regular
file* cannot be created by anyone, which is the same fault as far as the worker can tell.
"""

from __future__ import annotations

import errno

import optuna
import pytest
import torch
from optuna.trial import TrialState

from search_helpers import points_finished, vadsearch, write_study
from vadsearch.errors import CheckpointError
from vadsearch.storage import open_storage
from vadsearch.studyfile import load_study_file
from vadsearch.worker import Worker, WorkerOptions, point_key


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def study(tmp_path, tiny_csv):
    path = write_study(tmp_path / "faults.toml", name="faults", data=tiny_csv, search="hidden_size = [4, 8]",
                       max_epochs=1)
    return path, f"sqlite:///{tmp_path}/faults.db"


def load(url: str) -> optuna.Study:
    return optuna.load_study(study_name="faults", storage=open_storage(url, create=False))


def test_disk_full_fails_the_trial_with_its_reason_and_the_study_finishes_after(study, tmp_path, monkeypatch):
    path, url = study
    spec = load_study_file(path)
    options = WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False, n_trials=1)

    monkeypatch.setattr(torch, "save", _disk_full)
    try:
        assert dict(Worker(spec, options).run().states) == {"FAIL": 1}
    except CheckpointError as exc:  # a worker may also stop at once with the reason (docs/reliability.md)
        assert "No space left on device" in str(exc)
    failed = load(url).trials[0]
    assert failed.state == TrialState.FAIL
    reason = failed.user_attrs["fail_reason"]
    assert reason.startswith("CheckpointError: cannot write checkpoint ")
    assert "No space left on device" in reason and "free disk space" in reason  # what happened, what to do
    assert not [p for p in (tmp_path / "art").rglob("*.pt*") if p.is_file()], "a partial checkpoint was left"

    monkeypatch.undo()  # the disk has room again
    rest = Worker(spec, WorkerOptions(**{**options.__dict__, "n_trials": None})).run()
    assert rest.stopped == "finished"
    finished = points_finished(load(url))
    assert len(finished) == 2 and set(finished.values()) == {1}


@pytest.mark.slow  # two worker processes
def test_unwritable_artifact_directory_through_the_cli(study, tmp_path):
    path, url = study
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file: nothing can be created below it\n")
    unwritable = blocker / "sub"
    result = vadsearch("worker", str(path), "--storage", url, "--device", "cpu", "-q", "--n-trials", "1",
                       "--artifacts", str(unwritable), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    # The worker's output names the directory, the problem, and what to do about it.
    assert str(unwritable) in output and "Not a directory" in output, output
    advice = output.replace(str(tmp_path), "")  # the test's own path says "unwritable"
    assert "--artifacts" in advice or "point the artifact directory at a writable place" in advice, output

    # At most the one trial failed (none, if the worker checks the directory before its first trial),
    # with the reason stored; its point is queued again for when the fault is fixed.
    failed = load(url).get_trials(states=(TrialState.FAIL,)) if (tmp_path / "faults.db").exists() else []
    assert len(failed) <= 1
    for trial in failed:
        assert trial.user_attrs["fail_reason"].startswith(
            f"CheckpointError: cannot create checkpoint directory {unwritable}/faults/")
        assert "point the artifact directory at a writable place" in trial.user_attrs["fail_reason"]

    # The study survives: with a writable artifact directory the same study finishes, each point once.
    again = vadsearch("worker", str(path), "--storage", url, "--device", "cpu", "-q",
                      "--artifacts", str(tmp_path / "art"), cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "worker stopped (finished)" in again.stdout
    finished = points_finished(load(url))
    assert len(finished) == 2 and set(finished.values()) == {1}


@pytest.mark.slow
def test_an_unwritable_artifact_root_stops_the_worker_before_any_trial(study, tmp_path):
    path, url = study
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = vadsearch("worker", str(path), "--storage", url, "--device", "cpu", "-q",
                       "--artifacts", str(blocker / "sub"), cwd=tmp_path)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 4  # CheckpointError's exit code
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker / "sub") in lines[0]
    # No configuration was given up on: nothing ran, so nothing spent a retry.
    if (tmp_path / "faults.db").exists():
        assert not load(url).get_trials(states=(TrialState.FAIL,))


def test_disk_full_never_gives_up_on_a_configuration(tmp_path, tiny_csv, monkeypatch):
    path = write_study(tmp_path / "faults.toml", name="faults", data=tiny_csv, search="hidden_size = [4]",
                       max_epochs=1, study="max_retries = 0")
    url = f"sqlite:///{tmp_path}/faults.db"
    spec = load_study_file(path)
    options = WorkerOptions(storage=url, artifacts=tmp_path / "art", device="cpu", progress=False)
    monkeypatch.setattr(torch, "save", _disk_full)
    try:
        Worker(spec, options).run()
    except CheckpointError:
        pass
    monkeypatch.undo()
    assert Worker(spec, options).run().stopped == "finished"
    assert points_finished(load(url)) == {point_key({"hidden_size": 4}): 1}


def test_a_replaced_file_is_the_old_one_or_the_new_one_never_a_part(tmp_path):
    # Checkpoints, the token cache, extracted vectors and the artifact marker are all written this way.
    import os

    from vadsearch.outdir import replacing

    target = tmp_path / "checkpoint"
    target.write_text("old")
    with replacing(target) as temporary:
        temporary.write_text("new")
        assert target.read_text() == "old"  # what a reader finds meanwhile
    assert target.read_text() == "new"
    with pytest.raises(OSError, match="No space left"):
        with replacing(target) as temporary:
            temporary.write_text("cut sh")
            _disk_full()
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # the part is gone
    with replacing(tmp_path / ".study-id") as temporary:
        assert temporary.name == f".study-id.{os.getpid()}.tmp"  # hidden, as the file it replaces
        temporary.write_text("{}")
