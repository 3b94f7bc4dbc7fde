"""The real entry point, end to end: a worker killed with SIGKILL (or stopped with Ctrl-C) mid-trial,
started again, finishes the study with nothing run twice and the killed trial resumed from its
checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from helpers import synthetic_rows, write_csv
from search_helpers import points_finished, vadsearch, write_study
from vadsearch.storage import open_storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slow_csv(tmp_path_factory) -> Path:
    # Large enough that an epoch takes a noticeable fraction of a second: a kill lands mid-trial.
    return write_csv(tmp_path_factory.mktemp("e2e") / "corpus.csv", synthetic_rows(3000, 100, 100, seed=1))


def start_worker(cwd: Path, study: Path, *extra: str) -> subprocess.Popen:
    # Under a shell's `cmd &` SIGINT is ignored, an ignored signal stays ignored in a child, and Python
    # keeps it so: the test's Ctrl-C would never reach the worker. A handled one starts as the default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "vadsearch.cli", "worker", str(study), "--device", "cpu", "-q",
             "--heartbeat-interval", "1", "--grace-period", "2", *extra],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for_checkpoint(cwd: Path, epoch: int, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(cwd.glob(f"vadsearch-artifacts/*/*/epoch-{epoch:04d}.pt"))
        if found:
            return found[0].parent
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} appeared")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_worker_resumes_from_checkpoint_and_runs_nothing_twice(tmp_path, slow_csv, stop):
    study_file = write_study(tmp_path / "e2e.toml", name="e2e", data=slow_csv, max_epochs=6,
                             search="hidden_size = [32, 48]", embedding_dim=32)
    worker = start_worker(tmp_path, study_file)
    run_dir = wait_for_checkpoint(tmp_path, epoch=2)
    worker.send_signal(stop)
    output = worker.communicate(timeout=60)[0]
    if stop == signal.SIGINT:
        assert worker.returncode == 130, output
        assert "resume" in output and "Traceback" not in output
    else:
        assert worker.returncode == -signal.SIGKILL

    storage = open_storage(f"sqlite:///{tmp_path}/vadsearch.db", create=False)
    killed = optuna.load_study(study_name="e2e", storage=storage).trials[0]
    assert killed.state in (TrialState.RUNNING, TrialState.FAIL)  # RUNNING until its heartbeat goes stale
    assert len(killed.intermediate_values) >= 1  # the kill may land between checkpoint and report

    again = start_worker(tmp_path, study_file)
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output
    assert "worker stopped (finished)" in output

    study = optuna.load_study(study_name="e2e", storage=storage)
    assert set(points_finished(study).values()) == {1} and len(points_finished(study)) == 2
    resumed = [t for t in study.get_trials(states=(TrialState.COMPLETE,))
               if t.user_attrs["point"] == killed.user_attrs["point"]][0]
    assert resumed.user_attrs["resumed_from"] >= 2, "the killed trial started again from epoch 0"
    assert resumed.user_attrs["checkpoint_dir"] == str(run_dir.relative_to(tmp_path))
    assert sorted(resumed.intermediate_values) == [1, 2, 3, 4, 5, 6]
    # The restored epochs carry the killed trial's numbers: nothing was re-trained or lost.
    for epoch, value in killed.intermediate_values.items():
        assert resumed.intermediate_values[epoch] == value

    # The report agrees with the storage.
    result = vadsearch("best", "e2e", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    best = json.loads(result.stdout)
    assert best["dev"]["mse"] == min(t.value for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert best["test"]["n"] == 100
